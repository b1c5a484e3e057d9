"""Batched, on-device preprocessing: uint8 images in, normalised model input out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAPER_MEAN = (0.5, 0.5, 0.5)
PAPER_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocess:
    """Resize to `size` and normalise with `mean`/`std`; optional per-image augmentation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(
        self,
        images: torch.Tensor,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        x = images.to(torch.float32, copy=True).div_(255.0)  # a copy: a float caller tensor stays as it was
        if augment:
            x = random_flip_scale_shift(x, self.size, generator)
        elif x.shape[-2:] != (self.size, self.size):
            downsampling = x.shape[-1] > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=downsampling)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] RGB, for figures."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x * std + mean).clamp(0, 1)


def random_flip_scale_shift(
    x: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.8, 1.0),
    max_shift: float = 0.125,
) -> torch.Tensor:
    """Per-image horizontal flip, zoom-in and shift, fused with the resize in one `grid_sample`.

    Each image gets its own random affine; the random numbers come from `generator` on the
    CPU so that runs are reproducible whatever the device.
    """
    n = x.shape[0]
    rand = torch.rand(n, 4, generator=generator).to(x.device)
    zoom = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    flip = torch.where(rand[:, 1] < 0.5, -1.0, 1.0).to(x.device)
    shift = (rand[:, 2:] * 2 - 1) * max_shift * 2  # grid units span [-1, 1]
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = zoom * flip
    theta[:, 1, 1] = zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
