"""Shapley values and LIME through Captum: game-theoretic and surrogate-model attributions.

- kernel_shap (Lundberg & Lee 2017): Captum's `KernelShap` over image segments: `n_samples`
  coalitions of segments are kept while the others are set to `baseline`, and a weighted linear
  regression with the Shapley kernel gives each segment's Shapley value. Cost: `n_samples` forward
  passes per image (`perturbations_per_eval` of them per batch).
- lime (Ribeiro et al. 2016): Captum's `Lime` on the same segments: a Lasso surrogate fitted on
  `n_samples` random coalitions weighted by their similarity to the image. Cost: `n_samples`
  forward passes per image.

Segments (`segments=`): "grid", square cells (the ViT's own patches when the model has a patch
grid, else `cells` x `cells` cells, the same for every image); "slic", SLIC superpixels
(scikit-image; `n_segments` about 50, `compactness` 10) computed per image on the de-normalised
image (x * std + mean from the model's description, in CIE Lab), each image its own Captum
feature mask, as the LIME and SHAP papers segment images; "auto" (default): SLIC for CNNs, the grid
for ViTs (their patches are the units the model sees) and for other models. SLIC costs about 0.2 s
per 224 x 224 image on one CPU core, small next to the `n_samples` forward passes, and involves no
randomness.
- gradient_shap (Lundberg & Lee 2017): Captum's `GradientShap` (expected gradients): the gradient
  at `n_samples` random points between the constant `baseline` image and the image (with Gaussian
  noise of std `stdevs` on the image), times (image - baseline), summed over the colour channels.
  Cost: `n_samples` forward and backward passes per image.

All three are signed and model-agnostic (any classifier). They are random: `seed` seeds torch's
(and NumPy's, which GradientShap draws from) generator for each image, and the global generators
are restored after, so a fixed seed gives the same map twice, an image's map does not depend on
the rest of its batch, and the caller's random state is untouched. kernel_shap and lime fit their
surrogate with scikit-learn (as Captum does); without it they say so in one line.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from xtl.errors import XtlError
from xtl.explain.base import ExplainMethod, check_counts, register_method
from xtl.models import ModelDescription


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's (CPU and the images' CUDA device) and NumPy's global generators seeded with `seed`,
    restored on exit."""
    devices = [device] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


def grid_feature_mask(images: torch.Tensor, spec: ModelDescription, cells: int, method: str) -> torch.Tensor:
    """Int64 mask [1, 1, H, W]: one id per grid cell, row-major. The ViT's patch grid when
    `spec.patch_size` is set, else `cells` x `cells` cells (edges spread evenly when `cells` does not
    divide the side)."""
    height, width = images.shape[-2:]
    device = images.device
    if not 1 <= cells <= min(height, width):
        raise XtlError(f"option cells of method {method} must be between 1 and the image side {min(height, width)}, "
                       f"not {cells}")
    if spec.patch_size:
        rows = (torch.arange(height, device=device) // spec.patch_size).clamp_max(max(height // spec.patch_size, 1) - 1)
        cols = (torch.arange(width, device=device) // spec.patch_size).clamp_max(max(width // spec.patch_size, 1) - 1)
        n_cols = max(width // spec.patch_size, 1)
    else:
        rows = torch.arange(height, device=device) * cells // height
        cols = torch.arange(width, device=device) * cells // width
        n_cols = cells
    return (rows[:, None] * n_cols + cols[None, :]).view(1, 1, height, width).long()


def slic_feature_mask(image: torch.Tensor, spec: ModelDescription, n_segments: int, compactness: float) -> torch.Tensor:
    """Int64 mask [1, 1, H, W] of SLIC superpixels (scikit-image) of one preprocessed image [C, H, W]:
    computed on the de-normalised image (x * std + mean, clipped to [0, 1], in CIE Lab), scikit-image's
    ids made consecutive (0..k-1). Deterministic: no random state is involved. On pixel noise, where
    SLIC's connectivity step merges everything into one segment, the segments are left unconnected."""
    from skimage.segmentation import slic

    mean = torch.tensor(spec.mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(-1, 1, 1)
    pixels = (image.detach().double().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    options = dict(n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1,
                   convert2lab=pixels.shape[-1] == 3)
    labels = slic(pixels, **options)
    if labels.max() < 1 < n_segments:  # pixel noise: enforcing connectivity merges it all into one segment
        labels = slic(pixels, enforce_connectivity=False, **options)
    ids = np.unique(labels.ravel(), return_inverse=True)[1].reshape(labels.shape)  # SLIC's ids, without gaps
    return torch.from_numpy(ids).long().to(image.device).view(1, 1, *labels.shape)


def feature_masks(images: torch.Tensor, spec: ModelDescription, method: str, segments: str, cells: int,
                  n_segments: int, compactness: float) -> list[torch.Tensor]:
    """One mask [1, 1, H, W] per image: SLIC superpixels of each image, or the grid (the same for all).
    `segments="auto"`: SLIC for CNNs, the grid (a ViT's patches, else `cells` x `cells`) otherwise."""
    if segments not in ("auto", "grid", "slic"):
        raise XtlError(f"option segments of method {method} must be 'auto', 'grid' or 'slic', not {segments!r}")
    if segments == "auto":
        segments = "slic" if spec.family == "cnn" else "grid"
    grid = grid_feature_mask(images, spec, cells, method)  # checks `cells` whichever is used
    if segments == "grid":
        return [grid] * len(images)
    check_counts(method, n_segments=n_segments)
    if not compactness > 0:
        raise XtlError(f"option compactness of method {method} must be above 0, not {compactness}")
    try:
        import skimage  # noqa: F401
    except ImportError:
        raise XtlError(f"segments='slic' of method {method} needs scikit-image: pip install scikit-image") from None
    return [slic_feature_mask(image, spec, n_segments, compactness) for image in images]


def need_sklearn(method: str) -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise XtlError(f"method {method} fits its surrogate model with scikit-learn (as Captum does); "
                       "install it: pip install scikit-learn") from None


def surrogate_attribution(
    explainer_class: type, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription,
    method: str, cells: int, n_samples: int, baseline: float, perturbations_per_eval: int, seed: int,
    segments: str = "grid", n_segments: int = 50, compactness: float = 10.0,
) -> torch.Tensor:
    """Captum's Lime or KernelShap on grid cells or superpixels, image by image (Captum fits one
    surrogate per example anyway; each image its own mask), each image under `seed`: [B, H, W]."""
    check_counts(method, n_samples=n_samples, perturbations_per_eval=perturbations_per_eval)
    need_sklearn(method)
    masks = feature_masks(images, spec, method, segments, cells, n_segments, compactness)
    explainer = explainer_class(model)
    maps = []
    with torch.no_grad():
        for image, target, mask in zip(images.detach(), targets, masks):
            with seeded(seed, images.device):
                attributions = explainer.attribute(
                    image.unsqueeze(0), baselines=float(baseline), target=int(target), feature_mask=mask,
                    n_samples=n_samples, perturbations_per_eval=perturbations_per_eval)
            maps.append(attributions[0, 0])  # each cell's value, the same in every channel
    return torch.stack(maps)


class SurrogateMethod(ExplainMethod):
    """Captum's surrogate attributions on grid cells or superpixels: a subclass names the Captum class (`captum`)."""

    captum: ClassVar[str]
    signed = True
    gradient_based = False

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription,
        cells: int = 8, n_samples: int = 64, baseline: float = 0.0, perturbations_per_eval: int = 16, seed: int = 0,
        segments: str = "auto", n_segments: int = 50, compactness: float = 10.0,
    ) -> torch.Tensor:
        import captum.attr

        return surrogate_attribution(getattr(captum.attr, self.captum), model, images, targets, spec, self.name, cells,
                                     n_samples, baseline, perturbations_per_eval, seed, segments, n_segments,
                                     compactness)


@register_method
class KernelShapMap(SurrogateMethod):
    """Lundberg & Lee 2017: each segment's Shapley value for the target logit (Captum's KernelShap,
    `n_samples` coalitions; hidden segments set to `baseline`). Segments: SLIC superpixels for CNNs,
    a ViT's patches, else `cells` x `cells` squares (`segments=` "slic", "grid" or "auto").
    Signed; `seed` fixes the coalitions."""

    name = "kernel_shap"
    captum = "KernelShap"
    reference = "Lundberg & Lee, A Unified Approach to Interpreting Model Predictions, NeurIPS 2017"


@register_method
class LimeMap(SurrogateMethod):
    """Ribeiro et al. 2016: each segment's weight in a Lasso surrogate of the target logit fitted on
    `n_samples` random coalitions (Captum's Lime; hidden segments set to `baseline`). Segments: SLIC
    superpixels for CNNs, a ViT's patches, else `cells` x `cells` squares (`segments=` "slic",
    "grid" or "auto"). Signed; `seed` fixes the coalitions."""

    name = "lime"
    captum = "Lime"
    reference = "Ribeiro, Singh & Guestrin, \"Why Should I Trust You?\": Explaining the Predictions of Any Classifier, KDD 2016"


@register_method
class GradientShapMap(ExplainMethod):
    """Lundberg & Lee 2017: expected gradients from the constant `baseline` image (Captum's
    GradientShap, `n_samples` random points on the path, Gaussian noise of std `stdevs` on the image),
    summed over the colour channels. Signed; `seed` fixes the samples."""

    name = "gradient_shap"
    signed = True
    reference = "Lundberg & Lee, A Unified Approach to Interpreting Model Predictions, NeurIPS 2017"

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription,
        n_samples: int = 16, baseline: float = 0.0, stdevs: float = 0.0, seed: int = 0,
    ) -> torch.Tensor:
        from captum.attr import GradientShap

        check_counts(self.name, n_samples=n_samples)
        if stdevs < 0:
            raise XtlError(f"option stdevs of method {self.name} must be at least 0, not {stdevs}")
        explainer = GradientShap(model)
        maps = []
        for image, target in zip(images.detach(), targets):
            inputs = image.unsqueeze(0).clone().requires_grad_(True)
            with seeded(seed, images.device):
                attributions = explainer.attribute(
                    inputs, baselines=torch.full_like(inputs, float(baseline)).detach(), target=int(target),
                    n_samples=n_samples, stdevs=float(stdevs))
            maps.append(attributions[0].sum(0))
        return torch.stack(maps)
