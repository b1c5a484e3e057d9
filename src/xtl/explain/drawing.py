"""Drawing explanation maps over images: the one place where a map becomes colours.

    rgb = overlay(image, heatmap, signed=False)      # uint8 [H, W, 3]
    rgbs = overlay(images, maps, signed=True)        # a batch: [B, 3, H, W] and [B, h, w] -> uint8 [B, H, W, 3]
    save_overlay("map.png", image, heatmap, signed=True)

Two kinds of map, two colour scales, so that a figure does not suggest what the map does not say:
- unsigned maps (Grad-CAM, saliency, rollout, ...): the perceptually uniform `inferno`, scaled from
  the map's minimum (black) to its maximum (yellow). A uniform map does not invent contrast the
  way `jet`'s bright bands do.
- signed maps (LRP, integrated gradients, SHAP: evidence for and against the class): the diverging
  `RdBu_r`, scaled symmetrically by the largest |value|, so that zero is always the neutral
  near-white middle, positive is red and negative is blue, and the sign is visible.

A flat map (all values equal, all zeros included, or no finite value) carries no ranking of the
pixels; it is not coloured (min-max scaling would turn rounding noise into a full-range picture, or
one colour everywhere). `overlay` returns the plain image and `is_flat` lets a figure say "flat map".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xtl.io import atomic_path

__all__ = ["UNSIGNED_CMAP", "SIGNED_CMAP", "FLAT_LABEL", "colormap_for", "colour_bar_label", "is_flat", "overlay",
           "save_overlay", "scaled", "to_rgb"]

UNSIGNED_CMAP = "inferno"
SIGNED_CMAP = "RdBu_r"
FLAT_LABEL = "flat map"


def colormap_for(signed: bool):
    """(colour map name, matplotlib Normalize) for the values `scaled` returns: [0, 1] for unsigned
    maps, [-1, 1] for signed ones, so that a colour bar matches the overlays exactly."""
    from matplotlib.colors import Normalize

    return (SIGNED_CMAP, Normalize(-1.0, 1.0)) if signed else (UNSIGNED_CMAP, Normalize(0.0, 1.0))


def colour_bar_label(signed: bool) -> str:
    if signed:
        return "relevance / max |relevance| per image\n(red: for the class, blue: against)"
    return "relevance, min to max per image"


def _as_array(heatmap) -> np.ndarray:
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().float().cpu().numpy()
    heatmap = np.asarray(heatmap, dtype=np.float64)
    while heatmap.ndim > 2 and heatmap.shape[0] == 1:  # [1, h, w], [1, 1, h, w]
        heatmap = heatmap[0]
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap must be [h, w], not {heatmap.shape}")
    return heatmap


def is_flat(heatmap) -> bool:
    """True when the map ranks no pixel above another: all finite values equal (all zeros included),
    or no finite value at all."""
    values = _as_array(heatmap)
    values = values[np.isfinite(values)]
    return values.size == 0 or bool(values.max() == values.min())


def scaled(heatmap, signed: bool = False) -> np.ndarray:
    """The map as the colour map reads it: unsigned (x - min) / (max - min) in [0, 1]; signed
    x / max |x| in [-1, 1] (zero stays zero). Non-finite values count as zero; a flat map -> zeros."""
    values = np.nan_to_num(_as_array(heatmap), nan=0.0, posinf=0.0, neginf=0.0)
    if is_flat(values):
        return np.zeros_like(values)
    if signed:
        return values / np.abs(values).max()
    low, high = values.min(), values.max()
    return (values - low) / (high - low)


def to_rgb(image, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] from a uint8 array [H, W, 3], a float tensor [3, H, W] in [0, 1] or a uint8
    tensor [3, H, W] (also [H, W, 3] tensors and float arrays in [0, 1]); resized bilinearly to `size`."""
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3) and tensor.shape[-1] not in (1, 3):
            tensor = tensor.permute(1, 2, 0)
        array = tensor.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"an image must be [H, W, 3] or [3, H, W], not {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    if size is not None and tuple(array.shape[:2]) != tuple(size):
        big = F.interpolate(torch.from_numpy(array).permute(2, 0, 1)[None].float(), size=tuple(size), mode="bilinear",
                            align_corners=False)
        array = big[0].permute(1, 2, 0).clamp(0, 255).round().byte().numpy()
    return np.ascontiguousarray(array)


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if values.shape == tuple(size):
        return values
    big = F.interpolate(torch.from_numpy(values)[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return big[0, 0].numpy()


def _ndim(value) -> int:
    return value.ndim if isinstance(value, torch.Tensor) else np.ndim(value)


def _batch_size(image, heatmap) -> int | None:
    """The number of images when `overlay` is given a batch: images [B, 3, H, W] (or [B, H, W, 3]),
    or maps [B, h, w] (also [B, 1, h, w]) with B > 1; None for one image and one map."""
    map_shape = tuple(heatmap.shape) if isinstance(heatmap, torch.Tensor) else np.shape(heatmap)
    if _ndim(image) == 4:
        return (image.shape if isinstance(image, torch.Tensor) else np.shape(image))[0]
    if (len(map_shape) == 4 and map_shape[1] == 1 or len(map_shape) == 3) and map_shape[0] > 1:
        return map_shape[0]
    return None


def overlay(image, heatmap, signed: bool = False, alpha: float = 0.5, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3]: `image` under `heatmap` coloured with opacity `alpha`.

    `image`: see `to_rgb`; `heatmap`: [h, w] tensor or array of any size, resized bilinearly to the
    image (or both to `size` when given). `signed`: draw on the diverging zero-centred scale (see the
    module's docstring). A flat map (`is_flat`) is not coloured: the image is returned unchanged.

    Batches: images [B, 3, H, W] with maps [B, h, w] (or one map [h, w] for all, or one image [3, H, W]
    under maps [B, h, w]) give uint8 [B, H, W, 3], each map over its own image (each scaled on its own)."""
    n = _batch_size(image, heatmap)
    if n is not None:
        images = image if _ndim(image) == 4 else [image] * n
        maps = heatmap if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
        if maps.ndim == 4:
            maps = maps[:, 0]
        if maps.ndim == 2:
            maps = [maps] * n
        if len(images) != len(maps):
            raise ValueError(f"overlay: {len(images)} images and {len(maps)} maps; give one map per image")
        if n == 0:
            raise ValueError("overlay: the batch is empty")
        return np.stack([overlay(images[i], maps[i], signed=signed, alpha=alpha, size=size) for i in range(n)])
    values = np.nan_to_num(_as_array(heatmap), nan=0.0, posinf=0.0, neginf=0.0)
    rgb = to_rgb(image, size)
    if is_flat(values):
        return rgb
    import matplotlib

    name, norm = colormap_for(signed)
    # scale on the map's own grid, then resize: bilinear resizing keeps values within [min, max]
    colours = matplotlib.colormaps[name](norm(_resize(scaled(values, signed), rgb.shape[:2])))[..., :3]
    blended = (1 - alpha) * rgb.astype(np.float64) / 255 + alpha * colours
    return (np.clip(blended, 0.0, 1.0) * 255).round().astype(np.uint8)


def save_overlay(path: str | os.PathLike, image, heatmap, signed: bool = False, alpha: float = 0.5,
                 size: tuple[int, int] | None = None) -> Path:
    """Write `overlay(image, heatmap, signed, alpha, size)` as a PNG, atomically (no half-written file)."""
    from PIL import Image

    path = Path(path)
    rgb = overlay(image, heatmap, signed=signed, alpha=alpha, size=size)
    if rgb.ndim == 4:
        if len(rgb) != 1:
            raise ValueError(f"save_overlay writes one image, not a batch of {len(rgb)}; save each overlay(...)[i]")
        rgb = rgb[0]
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path
