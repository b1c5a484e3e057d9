"""Gallery figures: image | heatmap overlay per method | top-5 probability bars (paper Fig. 6-9)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xtl.io import save_figure

COLORMAP = "jet"


@dataclass
class GalleryRow:
    image: torch.Tensor  # uint8 [3, h, w]
    label: int
    probabilities: torch.Tensor  # [C]
    maps: dict[str, torch.Tensor]  # column title -> [H, W] in [0, 1]
    caption: str = ""


def pick_correct_per_class(labels: torch.Tensor, predicted: torch.Tensor, n_classes: int, limit: int = 20) -> list[int]:
    """Positions of the first correctly classified image of each class (up to `limit` classes)."""
    picks = []
    for c in range(n_classes):
        hits = torch.nonzero((labels == c) & (predicted == c)).flatten()
        if len(hits):
            picks.append(int(hits[0]))
        if len(picks) == limit:
            break
    return picks


def pick_misclassified(labels: torch.Tensor, probabilities: torch.Tensor, limit: int = 10) -> list[int]:
    """Positions of the most confidently misclassified images, most confident first."""
    predicted = probabilities.argmax(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[torch.argsort(confidence, descending=True)][:limit].tolist()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """RGB [H, W, 3] in [0, 1]: the image (resized to the map) under a coloured heatmap."""
    import matplotlib

    size = heatmap.shape[-2:]
    rgb = F.interpolate(image[None].float() / 255, size=size, mode="bilinear", align_corners=False)[0]
    rgb = rgb.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    colours = matplotlib.colormaps[COLORMAP](heatmap.clamp(0, 1).cpu().numpy())[..., :3]
    return (1 - alpha) * rgb + alpha * colours


def render_gallery(rows: list[GalleryRow], class_names: list[str], path: str | Path, title: str) -> None:
    plt = _plt()
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}: no images", ha="center", va="center")
        save_figure(fig, path)
        return
    columns = list(rows[0].maps)
    n_cols = 2 + len(columns)
    width, height = 2.3 * n_cols + 1.5, 2.5 * len(rows) + 0.9
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(width, height), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * (n_cols - 1) + [1.6]})
    fig.subplots_adjust(left=0.02, right=0.9, top=1 - 0.75 / height, bottom=0.35 / height, hspace=0.5, wspace=0.25)
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row.image.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        axes[r, 0].set_title(row.caption or f"true: {class_names[row.label]}", fontsize=8)
        for c, name in enumerate(columns):
            axes[r, c + 1].imshow(overlay(row.image, row.maps[name]))
            if r == 0:
                axes[r, c + 1].set_title(name, fontsize=9)
        for ax in axes[r, :-1]:
            ax.set_xticks([])
            ax.set_yticks([])
        _top5_bars(axes[r, -1], row, class_names)
    if columns:
        colour_axis = fig.add_axes([0.93, 0.2, 0.012, 0.6])
        mappable = plt.cm.ScalarMappable(cmap=COLORMAP, norm=plt.Normalize(0, 1))
        fig.colorbar(mappable, cax=colour_axis, label="relevance (normalised per image)")
    fig.suptitle(title, y=1 - 0.2 / height)
    save_figure(fig, path)


def _top5_bars(ax, row: GalleryRow, class_names: list[str]) -> None:
    probs, classes = row.probabilities.topk(min(5, len(class_names)))
    colours = ["tab:green" if int(c) == row.label else "tab:gray" for c in classes]
    ax.barh(range(len(classes))[::-1], probs.cpu().numpy(), color=colours)
    ax.set_yticks(range(len(classes))[::-1], [class_names[int(c)] for c in classes], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
