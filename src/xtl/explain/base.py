"""The shared core of every explanation method: targets, the result type, the method registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from xtl.errors import XtlError
from xtl.models import ModelSpec


@dataclass
class Explanation:
    """Maps of one batch: `raw` on the method's own grid, `maps` at input size in [0, 1] per image."""

    method: str
    targets: torch.Tensor  # int64 [B], the class each map explains
    raw: torch.Tensor  # float32 [B, h, w]: token grid (ViT) or feature/pixel grid (CNN)
    maps: torch.Tensor  # float32 [B, H, W], upsampled bilinearly, min-max normalised per image


class ExplainMethod:
    """One method = one small subclass that says how the raw map is made (`attribute`)."""

    name: ClassVar[str]
    families: ClassVar[frozenset[str]] = frozenset({"cnn", "vit"})
    class_discriminative: ClassVar[bool] = True  # does the map depend on the target class?
    gradient_based: ClassVar[bool] = True  # sensitive to the weights (model-randomisation check)
    signed: ClassVar[bool] = False  # raw maps keep a sign (evidence for and against): drawn zero-centred

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelSpec, **options
    ) -> torch.Tensor:
        """Raw relevance [B, h, w] of `images` for `targets`."""
        raise NotImplementedError


METHODS: dict[str, ExplainMethod] = {}


def register_method(cls: type[ExplainMethod]) -> type[ExplainMethod]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> ExplainMethod:
    if name not in METHODS:
        raise XtlError(f"unknown explanation method '{name}'; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def model_spec(model: nn.Module, spec: ModelSpec | None = None) -> ModelSpec:
    spec = spec or getattr(model, "xtl_spec", None)
    if spec is None:
        raise XtlError("explain() needs the model's spec: build the model with xtl.models.build_model or pass spec=")
    return spec


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


def patch_grid(spec: ModelSpec, images: torch.Tensor) -> tuple[int, int]:
    if spec.patch_size is None:
        raise XtlError(f"model {spec.name} has no patch grid")
    return images.shape[-2] // spec.patch_size, images.shape[-1] // spec.patch_size
