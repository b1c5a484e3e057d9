"""torchvision models: AlexNet and ResNet-34 (the paper's CNNs) and any `torchvision:NAME`."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import asdict
from urllib.parse import urlsplit
from pathlib import Path

from torch import nn

from xtl.errors import XtlError
from xtl.models.description import _torchvision_description
from xtl.models.registry import ModelSpec, load_weights, new_head, read_state_dict, register, register_prefix


def _build(spec: ModelSpec, n_classes: int, pretrained: bool, weights_path: Path | None) -> nn.Module:
    import torchvision

    hub_weights = "DEFAULT" if pretrained and weights_path is None else None
    if hub_weights is not None:
        weights_path = _offline_copy(spec)  # $XTL_WEIGHTS_DIR or ../shared/weights, else the hub
        hub_weights = None if weights_path is not None else _check_download(spec)
    try:
        model = torchvision.models.get_model(spec.hub_id, weights=hub_weights)
    except ValueError as err:
        raise XtlError(f"unknown model 'torchvision:{spec.hub_id}': {err}") from None
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a cut download a RuntimeError
        if hub_weights is None:
            raise
        from xtl.data.fallback import short_reason

        _download_failed(spec, hub_weights, short_reason(err))
    new_head(model, spec.classifier, n_classes)
    if weights_path is not None:
        load_weights(model, read_state_dict(weights_path), weights_path, spec.name, spec.classifier)
    return model


def _weights_file(weights) -> str:
    """The file name torch.hub stores `weights` (a torchvision WeightsEnum member) under."""
    return os.path.basename(urlsplit(weights.url).path)


def _offline_copy(spec: ModelSpec) -> Path | None:
    """The model's DEFAULT weights file under its own name (as torch.hub names it) in
    $XTL_WEIGHTS_DIR or ../shared/weights, where one is; it is read instead of the hub."""
    import torchvision

    from xtl.models.registry import find_local_weights

    weights = torchvision.models.get_model_weights(spec.hub_id).DEFAULT
    found = find_local_weights(_weights_file(weights))
    if found is not None:
        _say(f"weights: {spec.name} from {found}")
    return found


def _check_download(spec: ModelSpec):
    """The DEFAULT weights, downloaded by torch.hub unless its cache has them; where the
    download server cannot be reached, one line saying what to provide (seconds, not a hang)."""
    import torch
    import torchvision

    from xtl.hub import unreachable

    weights = torchvision.models.get_model_weights(spec.hub_id).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / _weights_file(weights)
    if not cached.is_file():
        from xtl.data.fallback import shown_path

        reason = unreachable(weights.url)
        if reason is not None:
            _download_failed(spec, weights, f"not in {shown_path(cached.parent)}, and {reason}")
        _say(f"weights: {spec.name} from torchvision's {weights} (downloaded once to {shown_path(cached.parent)})")
    return weights


def _download_failed(spec: ModelSpec, weights, reason: str) -> None:
    from xtl.models.timm_models import weights_option

    raise XtlError(
        f"the weights of {spec.name} could not be downloaded from torchvision ({weights}: {reason}; no network?); "
        f"{weights_option(spec.name)}, put {_weights_file(weights)} in $XTL_WEIGHTS_DIR, "
        "or connect once to download them"
    )


_said: set[str] = set()


def _say(line: str) -> None:
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)


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
