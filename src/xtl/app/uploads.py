"""Checks on an uploaded file before its pixels reach a model: size, type, pixel count, decoding."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from xtl.data.sources import decode_image
from xtl.errors import XtlError

# PIL format names; anything else (PDF, ICO, PSD, EPS ...) is refused even if PIL could open it.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
FORMAT_LIST = "JPEG, PNG, GIF, BMP, WebP, TIFF or PPM"
MB = 2**20  # as Gradio counts, so that its refusals and ours name the same limit


class UploadRefused(XtlError):
    """An upload that is not served; the message is shown in the page as is."""


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 10 * MB
    max_pixels: int = 25_000_000  # width x height, checked before decoding (decompression bombs)

    @classmethod
    def from_mb(cls, max_upload_mb: float, max_pixels: int = 25_000_000) -> UploadLimits:
        if max_upload_mb <= 0:
            raise XtlError(f"option --max-upload-mb: must be positive, got {max_upload_mb}")
        return cls(int(max_upload_mb * MB), max_pixels)


def read_upload(path: str | os.PathLike, limits: UploadLimits) -> torch.Tensor:
    """The uploaded image as uint8 [3, H, W]; `UploadRefused` with a one-line reason otherwise."""
    path = Path(path)
    name = path.name  # the browser's file name; the server-side folder never reaches the page
    size = path.stat().st_size
    if size == 0:
        raise UploadRefused(f"{name} is empty.")
    if size > limits.max_bytes:
        raise UploadRefused(f"{name} is {size / MB:.1f} MB; the limit is {limits.max_bytes / MB:g} MB.")
    _check_header(path, name, limits)
    try:
        rgb = decode_image(path)
    except XtlError:
        raise UploadRefused(f"{name} could not be decoded: the file is truncated or corrupt.") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def _check_header(path: Path, name: str, limits: UploadLimits) -> None:
    """Type and pixel count from the header alone: nothing is decompressed yet."""
    try:
        with Image.open(path) as img:
            kind, (width, height) = img.format, img.size
    except Image.DecompressionBombError:
        raise UploadRefused(f"{name} has too many pixels to decode safely.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UploadRefused(f"{name} is not an image; upload a {FORMAT_LIST} file.") from None
    if kind not in IMAGE_FORMATS:
        raise UploadRefused(f"{name} is a {kind} file; upload a {FORMAT_LIST} file.")
    if width * height > limits.max_pixels:
        raise UploadRefused(
            f"{name} is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); "
            f"the limit is {limits.max_pixels / 1e6:g} megapixels."
        )
