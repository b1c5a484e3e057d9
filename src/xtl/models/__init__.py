"""Models: a registry of ImageNet-pretrained CNNs and ViTs, each built with a new head, and the
description (`ModelDescription`) that explanation and preprocessing read from any model."""

from xtl.models import efficientnet_lite, hf, timm_models, torchvision_models  # noqa: F401  (registers)
from xtl.models.description import (
    ModelDescription, attach_description, describe_model, inspect_model, preprocessing, resolve_data_config,
)
from xtl.models.registry import (
    ModelSpec, build_model, class_probabilities, get_spec, inference_autocast, list_models, load_run_weights, native_bf16,
    submodule,
)

__all__ = ["ModelDescription", "ModelSpec", "attach_description", "build_model", "describe_model", "get_spec",
           "class_probabilities", "inference_autocast", "inspect_model", "list_models", "load_run_weights", "native_bf16",
           "preprocessing", "resolve_data_config", "submodule"]
