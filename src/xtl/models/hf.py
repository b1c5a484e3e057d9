"""Hugging Face image classifiers (`hf:REPO` or `hf:DIR`), wrapped to return plain logits."""

from __future__ import annotations

import functools
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from xtl.errors import XtlError
from xtl.models.description import inspect_model
from xtl.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, new_head, register_prefix

class HFClassifier(nn.Module):
    """`model(x)` returns logits, like every other model in the registry."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixel_values).logits

    def __getattr__(self, name: str):
        """Attributes and layer paths of the wrapped model resolve as they do on it ("vit.layers.1")."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("hf"), name)


def _build(spec: ModelSpec, n_classes: int | None, pretrained: bool, weights_path: Path | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    source = str(weights_path) if weights_path is not None else spec.hub_id
    labels = {} if n_classes is None else {"num_labels": n_classes}
    offline = _hub_check(source)
    try:
        if pretrained or weights_path is not None:
            hf_model = AutoModelForImageClassification.from_pretrained(
                source, ignore_mismatched_sizes=True, attn_implementation="eager", **labels
            )
        else:
            config = AutoConfig.from_pretrained(source, **labels)
            hf_model = AutoModelForImageClassification.from_config(config, attn_implementation="eager")
    except OSError as err:
        if offline is not None:
            _offline_failed(spec.name, "weights", offline)
        raise XtlError(f"model {spec.name} cannot be loaded from {source}: {str(err).splitlines()[0]}") from None
    return new_head(HFClassifier(hf_model), spec.classifier, n_classes)


@functools.lru_cache(maxsize=None)
def _resolve(repo: str) -> ModelSpec:
    """The description of a Hugging Face classifier, read once per process (a `xtl run` asks for it
    many times); the layers are read, as for any model given to explain(), off one built on the meta device."""
    from transformers import AutoConfig

    offline = _hub_check(repo)
    try:
        config = AutoConfig.from_pretrained(repo)
    except (OSError, ValueError) as err:
        from xtl.hub import is_offline_error

        if offline is not None and is_offline_error(err):
            _offline_failed(f"hf:{repo}", "configuration", offline)
        raise XtlError(f"unknown model 'hf:{repo}': {str(err).splitlines()[0]}") from None
    from transformers import AutoModelForImageClassification

    with torch.device("meta"):  # layer names only: no parameter memory
        described = inspect_model(HFClassifier(AutoModelForImageClassification.from_config(config)))
    mean, std = _normalisation(repo, described.family == "vit")
    return ModelSpec(**{**asdict(described), "name": f"hf:{repo}", "mean": mean, "std": std}, builder=_build,
                     hub_id=repo, weights=f"Hugging Face {repo}" if not os.path.isdir(repo) else f"local {repo}")


def _hub_check(source: str) -> str | None:
    """None for a local folder or where the hub can be reached; else why not (the Hugging Face
    libraries are then offline: cached models load, missing ones fail at once; `xtl.hub`)."""
    if os.path.isdir(source):
        return None
    from xtl.hub import hf_hub_check

    return hf_hub_check()


def _offline_failed(name: str, what: str, reason: str) -> None:
    raise XtlError(
        f"model {name}: its {what} could not be downloaded from the Hugging Face hub (not in the local cache, "
        f"and {reason}; no network?); pass a local model folder (hf:DIR, saved with save_pretrained; "
        "or --weights DIR) or connect once to download it"
    )


def _normalisation(repo: str, is_vit: bool) -> tuple[tuple, tuple]:
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(repo)
        return tuple(processor.image_mean), tuple(processor.image_std)
    except Exception:  # no processor config: the family's usual values
        return ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if is_vit else (IMAGENET_MEAN, IMAGENET_STD)


register_prefix("hf", _resolve)
