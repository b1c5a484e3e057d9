"""One registry of model names, each with what it needs to be built, fed and explained."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from xtl.errors import XtlError
from xtl.models.description import IMAGENET_MEAN, IMAGENET_STD, ModelDescription  # noqa: F401  (re-exported: hf.py, efficientnet_lite.py)

# builder(spec, n_classes, pretrained, weights_path) -> model with a fresh `n_classes` head
Builder = Callable[["ModelSpec", int, bool, "Path | None"], nn.Module]


@dataclass(frozen=True)
class ModelSpec(ModelDescription):
    """A registry entry: the model's description (`ModelDescription`, plain data) plus how the
    registry builds it (`builder`, `hub_id`) and where its weights come from, in words."""

    builder: Builder | None = field(default=None, repr=False, compare=False)
    weights: str = ""  # where pretrained weights come from, in words
    hub_id: str = ""  # the identifier passed to the hub library


_REGISTRY: dict[str, ModelSpec] = {}
# prefix ("timm", "torchvision", "hf") -> function(name after the colon) -> ModelSpec
_PREFIXES: dict[str, Callable[[str], ModelSpec]] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def register_prefix(prefix: str, resolver: Callable[[str], ModelSpec]) -> None:
    _PREFIXES[prefix] = resolver


def list_models() -> list[str]:
    return sorted(_REGISTRY) + [f"{p}:NAME" for p in sorted(_PREFIXES)]


def get_spec(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, _, rest = name.partition(":")
    if rest and prefix in _PREFIXES:
        return _PREFIXES[prefix](rest)
    raise XtlError(f"unknown model '{name}'; known: {', '.join(list_models())}")


def build_model(
    name: str,
    n_classes: int | None,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    input_size: int | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build a registered model with a new Xavier-initialised `n_classes` head
    (`None`: keep the pretrained classifier).

    `weights` is a local file (or, for `hf:` models, a directory) used instead of the hub.
    """
    spec = get_spec(name).with_input_size(input_size)
    weights_path = Path(weights) if weights else None
    if weights_path is not None and not weights_path.exists():
        raise XtlError(f"weights file {weights_path} does not exist")
    if spec.builder is None:
        raise XtlError(f"model {spec.name} has no builder: it describes a model, it cannot build one")
    model = spec.builder(spec, n_classes, pretrained, weights_path)
    model.xtl_spec = spec  # explanation methods read the hook layer and patch size from here
    return model, spec


# ----------------------------------------------------------------------------- helpers for builders


def submodule(model: nn.Module, path: str) -> nn.Module:
    """`model.blocks[-1].norm1` for path "blocks.-1.norm1"."""
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, last = path.rpartition(".")
    parent = submodule(model, parent_path) if parent_path else model
    if last.lstrip("-").isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def new_head(model: nn.Module, classifier: str, n_classes: int | None) -> nn.Module:
    """Replace the classifier with an `n_classes` Linear layer, Xavier-initialised (as the paper).

    `n_classes=None` keeps the pretrained classifier (e.g. to score ImageNet itself).
    """
    if n_classes is None:
        return model
    old = submodule(model, classifier)
    if not isinstance(old, nn.Linear):
        raise XtlError(f"classifier '{classifier}' of this model is a {type(old).__name__}, not a Linear layer")
    head = nn.Linear(old.in_features, n_classes)
    nn.init.xavier_uniform_(head.weight)
    nn.init.zeros_(head.bias)
    set_submodule(model, classifier, head)
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch state dict; one-line error if it is not one."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise XtlError(f"weights file {path} cannot be read: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise XtlError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path, model_name: str, classifier: str) -> None:
    """Load `state` into `model`; every backbone tensor must be present and fit.

    Call it after the new head is in place: the file's classifier is taken only when its shape
    fits (a fine-tuned run's own weights); otherwise the fresh head stays.
    """
    own = model.state_dict()
    head_keys = {k for k in own if k == classifier or k.startswith(classifier + ".")}
    missing = [k for k in own if k not in state and k not in head_keys and not _is_buffer_stat(k)]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape and k not in head_keys]
    unexpected = [k for k in state if k not in own]
    if missing or wrong or unexpected:
        raise _misfit(path, model_name, state, own, missing, wrong, unexpected)
    to_load = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(to_load, strict=False)


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a GPU that supports it, or a CPU with AMX-BF16 or
    AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later). CPUs without them emulate
    bf16 in software, slower than float32, so they keep float32."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    return bool(_cpu_flags() & {"amx_bf16", "avx512_bf16"})


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def inference_autocast(device: str | torch.device, bf16: bool | None = None):
    """Autocast for forward passes without gradients: bf16 where the device has it natively
    (`native_bf16`: 2-3x float32's rate on a GPU, 2-6x on an AMX or AVX512-BF16 CPU), float32
    elsewhere; `bf16` forces either."""
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16,
                          enabled=native_bf16(device) if bf16 is None else bf16)


@torch.no_grad()
def class_probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float32 softmax probabilities [B, classes] of a preprocessed batch, in the inference precision
    (`inference_autocast`: bf16 where the device has it natively). Every prediction xtl shows beside a
    map (the evaluation's `predictions.csv`, `xtl explain` figures, galleries, the report, the app)
    comes from here, and the map explains that prediction's class, passed to `explain()` as its target:
    the map's own float32 forward pass may rank two close classes the other way (issue 28)."""
    with inference_autocast(x.device):
        return model(x).float().softmax(1)


def load_run_weights(model: nn.Module, path: Path, model_name: str) -> None:
    """Load a run's own `model.safetensors`: every tensor, the classifier included, must be there and fit.

    A file of another architecture, or of the same one trained for another number of classes,
    is refused with one line naming the file (never a torch traceback).
    """
    state = read_state_dict(Path(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _is_buffer_stat(k)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or wrong):
        model.load_state_dict(state, strict=False)
        return
    spec = getattr(model, "xtl_spec", None)
    head = f"{spec.classifier}.weight" if spec is not None else None
    if head in wrong and set(wrong) <= {head, f"{spec.classifier}.bias"} and not missing and not unexpected:
        raise XtlError(f"weights file {path} is for {state[head].shape[0]} classes; model {model_name} of this run "
                       f"has {own[head].shape[0]}")
    raise _misfit(path, model_name, state, own, missing, wrong, unexpected)


def _misfit(path, model_name: str, state: dict, own: dict, missing: list, wrong: list, unexpected: list) -> XtlError:
    """One line saying how a weights file fails to fit the model, with an example of each problem."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    return XtlError(f"weights file {path} does not fit model {model_name}: {'; '.join(problems)}")


def _is_buffer_stat(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def find_local_weights(filename: str) -> Path | None:
    """Look for an offline weights file in $XTL_WEIGHTS_DIR and ../shared/weights."""
    here = Path(__file__).resolve()
    candidates = []
    if os.environ.get("XTL_WEIGHTS_DIR"):
        candidates.append(Path(os.environ["XTL_WEIGHTS_DIR"]))
    candidates += [Path.cwd() / "../shared/weights", here.parents[3] / "../shared/weights"]
    for folder in candidates:
        if (folder / filename).is_file():
            return (folder / filename).resolve()
    return None
