"""torchvision models: AlexNet and ResNet-34 (the paper's CNNs) and any `torchvision:NAME`."""

from __future__ import annotations

import functools
from pathlib import Path

from torch import nn

from xtl.errors import XtlError
from xtl.models.registry import ModelSpec, load_weights, new_head, read_state_dict, register, register_prefix


def _build(spec: ModelSpec, n_classes: int, pretrained: bool, weights_path: Path | None) -> nn.Module:
    import torchvision

    hub_weights = "DEFAULT" if pretrained and weights_path is None else None
    try:
        model = torchvision.models.get_model(spec.hub_id, weights=hub_weights)
    except ValueError as err:
        raise XtlError(f"unknown model 'torchvision:{spec.hub_id}': {err}") from None
    new_head(model, spec.classifier, n_classes)
    if weights_path is not None:
        load_weights(model, read_state_dict(weights_path), weights_path, spec.name, spec.classifier)
    return model


register(ModelSpec(
    name="alexnet", family="cnn", builder=_build, hub_id="alexnet",
    classifier="classifier.6", target_layer="features.11",
    weights="torchvision AlexNet_Weights.IMAGENET1K_V1",
))
register(ModelSpec(
    name="resnet34", family="cnn", builder=_build, hub_id="resnet34",
    classifier="fc", target_layer="layer4",
    weights="torchvision ResNet34_Weights.IMAGENET1K_V1",
))


@functools.lru_cache(maxsize=None)
def _resolve(name: str) -> ModelSpec:
    """Guess the classifier and CAM layer of any torchvision classification model, from an instance
    built once per process on the meta device (names and shapes only, no parameter memory)."""
    import torch
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise XtlError(f"unknown model 'torchvision:{name}'")
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(name, weights=None)
    except (NotImplementedError, RuntimeError):  # its construction reads values (the RegNets)
        model = torchvision.models.get_model(name, weights=None)
    classifier = _last_linear(model)
    is_vit = name.startswith(("vit_", "swin_", "maxvit"))
    target = "encoder.layers.-1.ln_1" if name.startswith("vit_") else _last_conv_parent(model)
    return ModelSpec(
        name=f"torchvision:{name}", family="vit" if is_vit else "cnn", builder=_build, hub_id=name,
        classifier=classifier, target_layer=target,
        patch_size=getattr(model, "patch_size", None), weights=f"torchvision {name} DEFAULT",
    )


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise XtlError(f"{type(model).__name__} has no Linear classifier")
    return names[-1]


def _last_conv_parent(model: nn.Module) -> str:
    """The top-level feature block that holds the last convolution (layer4, features, ...)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].rsplit(".", 1)[0] if convs else ""


register_prefix("torchvision", _resolve)
