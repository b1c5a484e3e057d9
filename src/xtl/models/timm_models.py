"""timm models: the paper's ViT-B/16 (ImageNet-21k), DINOv2 ViT-S/14 and any `timm:NAME`."""

from __future__ import annotations

import functools
import sys
from dataclasses import asdict
from pathlib import Path

from torch import nn

from xtl.errors import XtlError
from xtl.models.description import _timm_description
from xtl.models.registry import (
    ModelSpec,
    find_local_weights,
    load_weights,
    new_head,
    read_state_dict,
    register,
    register_prefix,
)

DINOV2_FILE = "vit_small_patch14_dinov2.imgfocus.safetensors"


def _build(spec: ModelSpec, n_classes: int, pretrained: bool, weights_path: Path | None) -> nn.Module:
    import timm

    kwargs = {} if n_classes is None else {"num_classes": n_classes}
    if spec.family == "vit":
        kwargs["img_size"] = spec.input_size
    if weights_path is None and pretrained and spec.name == "vit_s14_dinov2":
        weights_path = find_local_weights(DINOV2_FILE)  # offline copy when there is one
        if weights_path is not None:
            _say_weights_source(spec, weights_path)
    use_hub = pretrained and weights_path is None
    offline = _hub_check(spec.hub_id) if use_hub else None  # seconds, not a minute of retries, offline
    try:
        model = timm.create_model(spec.hub_id, pretrained=use_hub, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise XtlError(f"unknown model '{spec.name}'") from None
        raise
    except _hub_errors() as err:  # offline: huggingface_hub's errors are OSErrors (LocalEntryNotFoundError, ...)
        if not use_hub:
            raise
        _hub_failed(spec, err, offline)
    if use_hub:
        _say_weights_source(spec, None)
    new_head(model, spec.classifier, n_classes)
    if weights_path is not None:
        state = _timm_filter(model, read_state_dict(weights_path))
        load_weights(model, state, weights_path, spec.name, spec.classifier)
    return model


_said: set[str] = set()  # one line per model and process


def _say_weights_source(spec: ModelSpec, local: Path | None) -> None:
    """One line on stderr: where the pretrained weights come from (a local file or the timm hub)."""
    if spec.name in _said:
        return
    _said.add(spec.name)
    if local is not None:
        line = f"weights: {spec.name} from {local}"
    elif spec.name == "vit_s14_dinov2":
        line = (f"weights: {spec.name}: {DINOV2_FILE} not in $XTL_WEIGHTS_DIR or ../shared/weights; "
                f"using the timm hub's {spec.hub_id} (original DINOv2; downloaded once to the Hugging Face cache)")
    else:
        line = f"weights: {spec.name} from the timm hub's {spec.hub_id} (downloaded once to the Hugging Face cache)"
    print(line, file=sys.stderr, flush=True)


def _hub_errors() -> tuple[type[BaseException], ...]:
    try:
        import httpx  # huggingface_hub's transport; its errors are not OSErrors
    except ImportError:
        return (OSError,)
    return (OSError, httpx.HTTPError)


def _hub_check(model_name: str) -> str | None:
    """None where the hub that holds `model_name`'s weights can be reached, else why not (the
    Hugging Face hub: its libraries then go offline, so cached weights still load; `xtl.hub`)."""
    import timm
    from xtl.hub import hf_hub_check, unreachable

    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # noqa: BLE001  (an unknown name is reported by create_model)
        cfg = None
    url = getattr(cfg, "url", None) if cfg is not None else None
    if cfg is not None and not getattr(cfg, "hf_hub_id", None) and url:
        return None if _torch_hub_cached(url) else unreachable(url)
    return hf_hub_check()


def _torch_hub_cached(url: str) -> bool:
    import os
    from urllib.parse import urlsplit

    import torch

    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlsplit(url).path)))


def _hub_failed(spec: ModelSpec, err: BaseException, offline: str | None = None) -> None:
    """A failed hub download as one line that says what to provide instead (`offline`: why the
    hub could not be reached, when a check before the download found that)."""
    from xtl.data.fallback import short_reason

    reason = f"not in the local cache, and {offline}" if offline else short_reason(err)
    if spec.name == "vit_s14_dinov2":
        provide = f"put {DINOV2_FILE} in $XTL_WEIGHTS_DIR or ../shared/weights, or connect once to download it"
    else:
        provide = f"{weights_option(spec.name)} or connect once to download them"
    raise XtlError(f"the weights of {spec.name} could not be downloaded from the timm hub ({spec.hub_id}: "
                   f"{reason}; no network?); {provide}") from None


def weights_option(model_name: str) -> str:
    """How to give a model local weights instead of the hub's, in words."""
    return f"pass a local weights file (--weights FILE; in xtl run --per-model {model_name}.weights=FILE)"


def _timm_filter(model: nn.Module, state: dict) -> dict:
    """Apply the family's own checkpoint filter (position-embedding resampling and the like)."""
    family_module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(family_module, "checkpoint_filter_fn", None)
    return filter_fn(state, model) if filter_fn is not None else state


@functools.lru_cache(maxsize=None)
def _spec_from_timm(name: str, alias: str | None = None, input_size: int | None = None) -> ModelSpec:
    """Read a timm model's description off an instance built once per process (a `xtl run` asks
    for it many times), on the meta device: names and shapes only, no parameter memory."""
    import timm
    import torch

    try:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, num_classes=10)
        except (NotImplementedError, RuntimeError) as err:
            if "Unknown model" in str(err):
                raise
            model = timm.create_model(name, pretrained=False, num_classes=10)  # its construction reads values
    except RuntimeError as err:
        raise XtlError(f"unknown model 'timm:{name}': {err}") from None
    described = _timm_description(model)  # the same reading as for any timm model given to explain()
    fields = {**asdict(described), "name": alias or f"timm:{name}",
              "input_size": input_size or described.input_size}
    hub = model.pretrained_cfg.get("hf_hub_id") or name
    return ModelSpec(**fields, builder=_build, hub_id=name, weights=f"timm {hub}")


register(ModelSpec(
    name="vit_b16_in21k", family="vit", builder=_build, hub_id="vit_base_patch16_224.orig_in21k",
    input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), classifier="head",
    target_layer="blocks.-1.norm1", patch_size=16,
    weights="timm vit_base_patch16_224.orig_in21k (google/vit-base-patch16-224-in21k, ImageNet-21k)",
))
register(ModelSpec(
    name="vit_s14_dinov2", family="vit", builder=_build, hub_id="vit_small_patch14_dinov2.lvd142m",
    input_size=224, classifier="head", target_layer="blocks.-1.norm1", patch_size=14,
    weights=f"DINOv2 ViT-S/14: ../shared/weights/{DINOV2_FILE} offline, else timm vit_small_patch14_dinov2.lvd142m",
))
register_prefix("timm", _spec_from_timm)
