"""Explanations: one `explain()` for CNNs and ViTs; one module per method family.

    explanation = explain(model, images, targets=None, method="gradcam")

`images` is a preprocessed batch [B, 3, H, W]; `targets` the class to explain per image (the
predicted class when None). Methods register themselves by name in `METHODS`.
"""

from __future__ import annotations

import torch
from torch import nn

from xtl.errors import XtlError
from xtl.explain.base import (
    METHODS,
    ExplainMethod,
    Explanation,
    get_method,
    model_spec,
    predicted_classes,
    register_method,
    upsample_and_normalise,
)
from xtl.models import ModelSpec

__all__ = ["METHODS", "ExplainMethod", "Explanation", "explain", "methods_for", "register_method"]


def explain(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor | int | None = None,
    method: str = "gradcam",
    spec: ModelSpec | None = None,
    **options,
) -> Explanation:
    """Explain `model`'s output for `targets` on a preprocessed batch `images` with `method`."""
    spec = model_spec(model, spec)
    explainer = get_method(method)
    if spec.family not in explainer.families:
        raise XtlError(f"method {method} does not apply to {spec.family.upper()} model {spec.name}")
    was_training = model.training
    model.eval()
    try:
        if targets is None:
            targets = predicted_classes(model, images)
        elif isinstance(targets, int):
            targets = torch.full((images.shape[0],), targets, dtype=torch.long, device=images.device)
        targets = targets.to(images.device).long()
        raw = explainer.attribute(model, images, targets, spec, **options).detach().float()
    finally:
        model.train(was_training)
    return Explanation(method=method, targets=targets, raw=raw, maps=upsample_and_normalise(raw, images.shape[-2:]))


def methods_for(family: str) -> list[str]:
    return sorted(name for name, m in METHODS.items() if family in m.families)


from xtl.explain import transformer_attribution  # noqa: F401,E402
from xtl.explain import cam, cnn_lrp, gradients  # noqa: F401,E402
