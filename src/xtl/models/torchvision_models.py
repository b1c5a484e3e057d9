"""torchvision models: AlexNet and ResNet-34 (the paper's CNNs) and any `torchvision:NAME`."""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path

from torch import nn

from xtl.errors import XtlError
from xtl.models.description import _torchvision_description
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
    described = _torchvision_description(model)  # the same reading as for any torchvision model given to explain()
    if not described.classifier:
        raise XtlError(f"{type(model).__name__} has no Linear classifier")
    return ModelSpec(**{**asdict(described), "name": f"torchvision:{name}"}, builder=_build, hub_id=name,
                     weights=f"torchvision {name} DEFAULT")


register_prefix("torchvision", _resolve)
