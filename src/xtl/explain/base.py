"""The shared core of every explanation method: targets, the result type, the method registry."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from xtl.errors import XtlError
from xtl.models import ModelDescription


@dataclass
class Explanation:
    """Maps of one batch: `raw` on the method's own grid (its sign kept where the method has one:
    `signed`), `maps` at input size in [0, 1] per image (min-max; a flat map is all zeros).

    `save(path)` writes one safetensors file and `Explanation.load(path)` reads it back."""

    method: str
    targets: torch.Tensor  # int64 [B], the class each map explains (0 for a callable target)
    raw: torch.Tensor  # float32 [B, h, w]: token grid (ViT) or feature/pixel grid (CNN)
    maps: torch.Tensor  # float32 [B, H, W], upsampled bilinearly, min-max normalised per image
    signed: bool = False  # raw keeps a sign: draw it zero-centred (xtl.explain.drawing)

    def __len__(self) -> int:
        return len(self.targets)

    def save(self, path: str | Path) -> Path:
        """Write `raw`, `maps` and `targets` to one safetensors file (atomically), the method and
        `signed` in its metadata."""
        from safetensors.torch import save_file

        from xtl.io import atomic_path

        path = Path(path)
        tensors = {"raw": self.raw.detach().float().cpu().contiguous(), "maps": self.maps.detach().float().cpu().contiguous(),
                   "targets": self.targets.detach().long().cpu().contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"method": self.method, "signed": str(self.signed).lower()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Explanation":
        """Read what `save` wrote; one line naming the file when it is not such a file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in ("raw", "maps", "targets")}
        except Exception as err:
            raise XtlError(f"explanation file {path} cannot be read: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return cls(method=metadata.get("method", ""), signed=metadata.get("signed") == "true", **tensors)


class ExplainMethod:
    """One method = one small subclass that says how the raw map is made (`attribute`).

    Its options are the keyword parameters of `attribute` after `spec` (`option_defaults`):
    `explain()` checks them once, by name and by the type of their defaults."""

    name: ClassVar[str]
    families: ClassVar[frozenset[str]] = frozenset({"cnn", "vit", "other"})
    class_discriminative: ClassVar[bool] = True  # does the map depend on the target class?
    gradient_based: ClassVar[bool] = True  # sensitive to the weights (model-randomisation check)
    signed: ClassVar[bool] = False  # raw maps keep a sign (evidence for and against): drawn zero-centred
    # raw maps are a relevance decomposition of the target logit at the pixels (LRP-type): their sum is
    # the part of the logit that reaches the pixels (`xtl.faithfulness` reports it as logit_share)
    decomposes_logit: ClassVar[bool] = False
    callable_targets: ClassVar[bool] = True  # can explain any scalar of the output (a callable target)
    reference: ClassVar[str] = ""  # the paper, in one line

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription, **options
    ) -> torch.Tensor:
        """Raw relevance [B, h, w] of `images` for `targets`."""
        raise NotImplementedError

    def option_defaults(self) -> dict[str, Any]:
        """Every option of the method with its default."""
        return keyword_defaults(self.attribute, skip=4)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """`options` if every one is known and of its default's type; else one line naming the known ones."""
        known = self.option_defaults()
        for key, value in options.items():
            if key not in known:
                listed = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
                raise XtlError(f"method {self.name} has no option '{key}'; its options: {listed}")
            check_option_type(self.name, key, value, known[key])
        return options

    def summary(self) -> str:
        """One paragraph: families, options with defaults, reference (for help() and --list-methods)."""
        families = ("any model" if {"cnn", "vit", "other"} <= self.families
                    else ", ".join({"cnn": "CNN", "vit": "ViT", "other": "other"}[f] for f in sorted(self.families)))
        options = ", ".join(f"{k}={v!r}" for k, v in self.option_defaults().items()) or "none"
        doc = (type(self).__doc__ or "").strip().split("\n\n")[0]
        doc = " ".join(line.strip() for line in doc.splitlines())
        sign = "signed" if self.signed else "non-negative"
        return f"{self.name} [{families}; {sign}] {doc} Options: {options}." + (f" Reference: {self.reference}." if self.reference else "")


def keyword_defaults(function: Callable, skip: int) -> dict[str, Any]:
    """The keyword parameters of `function` after its first `skip` ones, with their defaults."""
    parameters = list(inspect.signature(function).parameters.values())[skip:]
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in parameters
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def check_option_type(method: str, key: str, value: Any, default: Any) -> None:
    """An option must have its default's type (an int is a float too); None defaults take anything."""
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        kind = ("a finite " if isinstance(default, float) else "an " if isinstance(default, int) and not isinstance(default, bool)
                else "a ") + type(default).__name__
        raise XtlError(f"option {key} of method {method} must be {kind} like its default {default!r}, not {value!r}")


def check_counts(method: str, **counts: int) -> None:
    """Each count option (samples, masks, a batch) of `method` is at least 1 and at most `MAX_COUNT`
    (each is a forward or backward pass per image: a larger number is a typo, not a setting)."""
    from xtl.settings import MAX_COUNT

    for option, value in counts.items():
        if value < 1:
            raise XtlError(f"option {option} of method {method} must be at least 1, not {value}")
        if value > MAX_COUNT:
            raise XtlError(f"option {option} of method {method} must be at most {MAX_COUNT:,} (each is a pass through "
                           f"the model per image), not {value:,}")


METHODS: dict[str, ExplainMethod] = {}


def register_method(cls: type[ExplainMethod]) -> type[ExplainMethod]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> ExplainMethod:
    if name not in METHODS:
        raise XtlError(f"unknown explanation method '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@torch.no_grad()
def predicted_classes(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).argmax(1)


def upsample_and_normalise(raw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling to the input size, then min-max to [0, 1] per image (a flat map -> 0)."""
    maps = F.interpolate(raw.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = maps.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1)
    span = (flat.max(1).values.view(-1, 1, 1) - low)
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, N] patch values (CLS and other prefix tokens already dropped) -> [B, h, w], row-major."""
    return tokens.reshape(tokens.shape[0], height, width)


def patch_grid(spec: ModelDescription, images: torch.Tensor) -> tuple[int, int]:
    if spec.patch_size is None:
        raise XtlError(f"model {spec.name} has no patch grid")
    return images.shape[-2] // spec.patch_size, images.shape[-1] // spec.patch_size


# ----------------------------------------------------------------------------- targets and outputs

Target = Union[int, Sequence[int], torch.Tensor, Callable[[torch.Tensor], torch.Tensor], None]


class ScoreOf(nn.Module):
    """`model` whose output is `score(logits)` as one column [B, 1]: any callable target becomes
    class 0 of this model. Attribute lookups fall through to `model`, so that dotted layer paths
    ("layer4") and attributes such as `num_prefix_tokens` still resolve."""

    def __init__(self, model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.score = score

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        value = self.score(self.model(images))
        if not isinstance(value, torch.Tensor) or value.reshape(len(images), -1).shape[1] != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise XtlError(f"a callable target must return one number per image ([B]), not {shape}")
        return value.reshape(len(images), 1)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


def logits_model(model: nn.Module) -> nn.Module:
    """A model whose forward returns logits: Hugging Face models (which return an output object)
    are wrapped in `HFClassifier`; every other model is returned as it is."""
    from xtl.models.description import is_hf_model
    from xtl.models.hf import HFClassifier

    return HFClassifier(model) if is_hf_model(model) else model


def resolve_targets(
    model: nn.Module, images: torch.Tensor, targets: Target, method: ExplainMethod, spec: ModelDescription
) -> tuple[nn.Module, torch.Tensor]:
    """(the model to explain, int64 targets [B] on the images' device) for any kind of target:
    None (each image's predicted class), an int (the same class for every image), a list or
    tensor (one class per image) or a callable on the model output returning [B]."""
    n = images.shape[0]
    if callable(targets) and not isinstance(targets, torch.Tensor):
        if not method.callable_targets:
            raise XtlError(f"method {method.name} explains a class of the model, not a callable target; "
                           "pass a class index (an int, a list or a tensor)")
        return ScoreOf(model, targets), torch.zeros(n, dtype=torch.long, device=images.device)
    if targets is None:
        return model, predicted_classes(model, images)
    if isinstance(targets, bool) or not isinstance(targets, (int, list, tuple, torch.Tensor)):
        raise XtlError(f"targets must be None, an int, a list or tensor of ints, or a callable, not {type(targets).__name__}")
    tensor = torch.as_tensor(targets, device=images.device)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise XtlError(f"targets must be class indices (integers), not {tensor.dtype}")
    tensor = tensor.long()
    if tensor.ndim == 0:
        tensor = tensor.expand(n).clone()
    if tensor.shape != (n,):
        raise XtlError(f"targets must give one class per image: {n} images, targets of shape {tuple(tensor.shape)}")
    n_classes = _n_classes(model, spec)
    if n_classes is not None and len(tensor) and not (0 <= int(tensor.min()) and int(tensor.max()) < n_classes):
        bad = int(tensor.min()) if int(tensor.min()) < 0 else int(tensor.max())
        raise XtlError(f"target class {bad} does not exist: {spec.name} has {n_classes} classes (0 to {n_classes - 1})")
    return model, tensor


def _n_classes(model: nn.Module, spec: ModelDescription) -> int | None:
    if not spec.classifier:
        return None
    from xtl.models import submodule

    try:
        head = submodule(model, spec.classifier)
    except (AttributeError, IndexError, TypeError):
        return None
    return head.out_features if isinstance(head, nn.Linear) else None


def as_batch(images: torch.Tensor) -> torch.Tensor:
    """A preprocessed float batch [B, C, H, W] (one image [C, H, W] becomes a batch of one)."""
    if not isinstance(images, torch.Tensor):
        raise XtlError(f"images must be a tensor [B, 3, H, W], not {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise XtlError(f"images must be a batch [B, 3, H, W] (or one image [3, H, W]), not of shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise XtlError(f"images are {images.dtype}: explain() takes preprocessed float images; "
                       "convert them with xtl.models.preprocessing(model)(images)")
    if images.shape[0] == 0:
        raise XtlError("images: the batch is empty")
    return images
