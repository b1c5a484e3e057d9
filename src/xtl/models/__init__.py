"""Models: a registry of ImageNet-pretrained CNNs and ViTs, each built with a new head."""

from xtl.models import efficientnet_lite, hf, timm_models, torchvision_models  # noqa: F401  (registers)
from xtl.models.registry import (
    ModelSpec, build_model, get_spec, inference_autocast, list_models, load_run_weights, native_bf16,
    submodule,
)

__all__ = ["ModelSpec", "build_model", "get_spec", "inference_autocast", "list_models", "load_run_weights", "native_bf16",
           "submodule"]
