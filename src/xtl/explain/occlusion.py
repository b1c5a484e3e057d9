"""Perturbation methods through Captum: the model's output when parts of the image are hidden.

- occlusion (Zeiler & Fergus 2014): a window of the image is replaced by `baseline` and slid over
  it with `stride`; a pixel's value is the mean drop of the target logit over the windows that
  cover it (Captum's `Occlusion`, one forward pass per window position, `perturbations_per_eval`
  positions per pass). The window defaults to the model's own grid: a ViT's patch (so that a
  window hides exactly one token), else an eighth of the image side. The map is signed: hiding a
  region can raise the logit.

- rise (Petsiuk et al. 2018): `n_masks` random smooth masks (a `cells` x `cells` grid of cells kept
  with probability `keep`, upsampled bilinearly and shifted by a random fraction of a cell), each
  multiplied into the image (a hidden pixel becomes 0: the data set's mean colour after
  normalisation); a pixel's value is the class probability averaged over the masks, weighted by how
  much each mask keeps the pixel, over `keep`. The masks come from a seeded generator and are the
  same for every image of every batch, so a batch gives the maps of its images one by one.

Model-agnostic: any classifier, no gradients, no layer. Cost: occlusion (H / stride) x (W / stride)
forward passes per image, RISE `n_masks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xtl.errors import XtlError
from xtl.explain.base import ExplainMethod, check_counts, register_method
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
        check_counts(self.name, stride=step, perturbations_per_eval=perturbations_per_eval)
        channels = images.shape[1]
        with torch.no_grad():
            attributions = Occlusion(model).attribute(
                images.detach(), sliding_window_shapes=(channels, side, side), strides=(channels, step, step),
                baselines=float(baseline), target=targets, perturbations_per_eval=perturbations_per_eval,
            )
        # the window spans every channel: each channel holds the same value, the logit drop
        return attributions.mean(1)


def rise_masks(n_masks: int, cells: int, keep: float, size: tuple[int, int], seed: int = 0,
               start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Masks `start`..`stop` of RISE's `n_masks` for images of `size` (H, W): float32 [k, H, W] in [0, 1].

    Petsiuk et al.'s construction: a binary `cells` x `cells` grid, each cell 1 with probability
    `keep`, upsampled bilinearly to (cells + 1) x the cell size and cropped at a random shift of up
    to one cell. Every grid and shift is drawn first from one CPU generator seeded with `seed`, so
    mask i is the same whatever part of the masks is asked for, on every device."""
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    grids = (torch.rand(n_masks, 1, cells, cells, generator=generator) < keep).float()
    cell_h, cell_w = -(-height // cells), -(-width // cells)
    shifts = torch.stack([torch.randint(0, cell_h, (n_masks,), generator=generator),
                          torch.randint(0, cell_w, (n_masks,), generator=generator)], dim=1)
    stop = n_masks if stop is None else stop
    up = F.interpolate(grids[start:stop], size=((cells + 1) * cell_h, (cells + 1) * cell_w), mode="bilinear",
                       align_corners=False)[:, 0].clamp(0, 1)  # bilinear rounding may pass 1 by an ulp
    return torch.stack([m[dy:dy + height, dx:dx + width] for m, (dy, dx) in zip(up, shifts[start:stop].tolist())])


@register_method
class RiseMap(ExplainMethod):
    """Petsiuk et al. 2018, RISE: the class probability under `n_masks` random smooth masks of a
    `cells` x `cells` grid (each cell kept with probability `keep`), each mask weighted by its
    probability, summed and divided by `n_masks` x `keep` (`rise_masks`; hidden pixels become 0, the
    mean colour after normalisation). Masks seeded by `seed`; `masks_per_eval` masks per image in
    one forward pass. Explains a class's softmax probability, as the paper does, so not a callable
    target (the probability of a one-number output is always 1)."""

    name = "rise"
    gradient_based = False
    callable_targets = False
    reference = "Petsiuk, Das & Saenko, RISE: Randomized Input Sampling for Explanation of Black-box Models, BMVC 2018"

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription,
        n_masks: int = 2000, cells: int = 7, keep: float = 0.5, seed: int = 0, masks_per_eval: int = 32,
    ) -> torch.Tensor:
        height, width = images.shape[-2:]
        check_counts(self.name, n_masks=n_masks, masks_per_eval=masks_per_eval)
        if not 1 <= cells <= min(height, width):
            raise XtlError(f"option cells of method rise must be between 1 and the image side {min(height, width)}, not {cells}")
        if not 0 < keep < 1:
            raise XtlError(f"option keep of method rise must be a probability strictly between 0 and 1, not {keep}")
        b = images.shape[0]
        total = torch.zeros(b, height, width, dtype=torch.float64, device=images.device)
        rows = torch.arange(b, device=images.device)
        with torch.no_grad():
            for start in range(0, n_masks, masks_per_eval):
                masks = rise_masks(n_masks, cells, keep, (height, width), seed, start,
                                   min(start + masks_per_eval, n_masks)).to(images.device, images.dtype)
                k = masks.shape[0]
                masked = (images[:, None] * masks[None, :, None]).reshape(b * k, *images.shape[1:])
                probabilities = model(masked).float().softmax(1).view(b, k, -1)[rows, :, targets]  # [B, k]
                total += torch.einsum("bk,khw->bhw", probabilities.double(), masks.double())
        return (total / (n_masks * keep)).float()
