"""Perturbation methods through Captum: the model's output when parts of the image are hidden.

- occlusion (Zeiler & Fergus 2014): a window of the image is replaced by `baseline` and slid over
  it with `stride`; a pixel's value is the mean drop of the target logit over the windows that
  cover it (Captum's `Occlusion`, one forward pass per window position, `perturbations_per_eval`
  positions per pass). The window defaults to the model's own grid: a ViT's patch (so that a
  window hides exactly one token), else an eighth of the image side. The map is signed: hiding a
  region can raise the logit.

Model-agnostic: any classifier, no gradients, no layer. Cost: (H / stride) x (W / stride) forward
passes per image.
"""

from __future__ import annotations

import torch
from torch import nn

from xtl.errors import XtlError
from xtl.explain.base import ExplainMethod, register_method
from xtl.models import ModelDescription


@register_method
class OcclusionMap(ExplainMethod):
    """Zeiler & Fergus 2014: the mean drop of the target logit when a `window` x `window` patch
    covering the pixel is replaced by `baseline` (0: the data set's mean colour after normalisation),
    slid with `stride` (default: the window; a ViT's window defaults to its patch)."""

    name = "occlusion"
    signed = True
    gradient_based = False
    reference = "Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014"

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription,
        window: int | None = None, stride: int | None = None, baseline: float = 0.0, perturbations_per_eval: int = 16,
    ) -> torch.Tensor:
        from captum.attr import Occlusion

        height, width = images.shape[-2:]
        side = window if window is not None else (spec.patch_size or max(1, min(height, width) // 8))
        step = stride if stride is not None else side
        for option, value in (("window", side), ("stride", step), ("perturbations_per_eval", perturbations_per_eval)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise XtlError(f"option {option} of method occlusion must be a whole number of pixels, not {value!r}")
        if not 1 <= side <= min(height, width):
            raise XtlError(f"option window of method occlusion must be between 1 and the image side {min(height, width)}, "
                           f"not {side}")
        if step < 1:
            raise XtlError(f"option stride of method occlusion must be at least 1, not {step}")
        if perturbations_per_eval < 1:
            raise XtlError(f"option perturbations_per_eval of method occlusion must be at least 1, not {perturbations_per_eval}")
        channels = images.shape[1]
        with torch.no_grad():
            attributions = Occlusion(model).attribute(
                images.detach(), sliding_window_shapes=(channels, side, side), strides=(channels, step, step),
                baselines=float(baseline), target=targets, perturbations_per_eval=perturbations_per_eval,
            )
        # the window spans every channel: each channel holds the same value, the logit drop
        return attributions.mean(1)
