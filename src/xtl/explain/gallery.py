"""Gallery figures: image | map overlay per method | top-5 probability bars per model (paper Fig. 6-9).

Maps are drawn by `xtl.explain.drawing`: unsigned maps on a uniform scale from their minimum to their
maximum, signed maps (LRP, integrated gradients) zero-centred; every tile names the class its map
explains; a flat map is marked "flat map", not coloured. Fonts are at least 9 pt at the saved size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xtl.explain import drawing
from xtl.io import pyplot, save_figure

COLORMAP = drawing.UNSIGNED_CMAP  # unsigned maps; signed ones: drawing.SIGNED_CMAP
FONT = 10  # captions, titles, tile labels (points at the saved size)
SMALL = 9  # bar labels and ticks: the smallest text in a gallery
TILE_SIDE = 160  # overlays are drawn with at least this many pixels per side (small images are upsampled)
KINDS = ("correct", "misclassified")


@dataclass
class GalleryRow:
    image: torch.Tensor  # uint8 [3, h, w]
    label: int
    probabilities: torch.Tensor  # [C]
    maps: dict[str, torch.Tensor]  # column title -> map [h, w] on any grid (raw, sign kept where it has one)
    caption: str = ""
    targets: dict[str, int] = field(default_factory=dict)  # column title -> the class its map explains
    signed: dict[str, bool] = field(default_factory=dict)  # column title -> drawn zero-centred (default False)
    bars: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (model, probabilities) per bar chart;
    # empty: one chart of `probabilities`


def gallery_name(kind: str, methods: list[str]) -> str:
    """The file a run's gallery of `kind` ("correct", "misclassified") for `methods` is saved as:
    one file per method list, so explaining again with other methods keeps the earlier galleries."""
    return f"gallery_{kind}_{'-'.join(methods)}.png"


def gallery_files(figures: str | Path, kind: str) -> list[Path]:
    """A run's galleries of `kind` in `figures/`, newest first: the per-method files, or, when there
    are none, the single `gallery_<kind>.png` that older versions wrote."""
    figures = Path(figures)
    found = sorted(figures.glob(f"gallery_{kind}_*.png"), key=lambda p: (-p.stat().st_mtime_ns, p.name))
    legacy = figures / f"gallery_{kind}.png"
    return found or ([legacy] if legacy.is_file() else [])


def gallery_methods(path: str | Path, kind: str) -> list[str]:
    """The methods a gallery file of `kind` shows, from its name (empty for an older unnamed one)."""
    stem = Path(path).stem
    prefix = f"gallery_{kind}_"
    return stem[len(prefix):].split("-") if stem.startswith(prefix) else []


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


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """RGB [H, W, 3] float in [0, 1] at the map's size, an unsigned map over the image. Kept for older
    callers; new code uses `xtl.explain.drawing.overlay` (uint8, signed maps, any map size)."""
    return drawing.overlay(image, heatmap, signed=False, alpha=alpha, size=tuple(heatmap.shape[-2:])) / 255.0


def _tile_size(image: torch.Tensor, heatmap: torch.Tensor) -> tuple[int, int]:
    """Pixels a tile is drawn at: the larger of the image and the map, at least TILE_SIDE a side."""
    h, w = max(image.shape[-2], heatmap.shape[-2]), max(image.shape[-1], heatmap.shape[-1])
    scale = max(1.0, TILE_SIDE / min(h, w))
    return round(h * scale), round(w * scale)


def draw_tile(ax, image: torch.Tensor, heatmap: torch.Tensor, signed: bool, label: str | None = None) -> bool:
    """One map over its image in `ax`, labelled underneath ("map: <class>"); a flat map is shown as
    the image greyed out with "flat map" on it instead of colours. Returns whether the map was flat."""
    size = _tile_size(image, heatmap)
    flat = drawing.is_flat(heatmap)
    if flat:
        rgb = drawing.to_rgb(image, size).astype(np.float64)
        ax.imshow(((rgb + 2 * 160) / 3).round().astype(np.uint8))  # faded: nothing is drawn on it
        ax.text(0.5, 0.5, drawing.FLAT_LABEL, transform=ax.transAxes, ha="center", va="center", fontsize=FONT,
                bbox={"facecolor": "white", "edgecolor": "black", "boxstyle": "round,pad=0.3"})
    else:
        ax.imshow(drawing.overlay(image, heatmap, signed=signed, size=size))
    if label:
        ax.set_xlabel(label, fontsize=FONT)
    ax.set_xticks([])
    ax.set_yticks([])
    return flat


def gallery_figure(rows: list[GalleryRow], class_names: list[str], title: str):
    """The gallery as a matplotlib figure (`render_gallery` saves it)."""
    plt = pyplot()
    if not rows:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}: no images", ha="center", va="center", fontsize=FONT + 1)
        return fig
    columns = list(rows[0].maps)
    n_bars = max(len(row.bars) or 1 for row in rows)
    n_cols = 1 + len(columns) + n_bars
    kinds = sorted({bool(row.signed.get(c, False)) for row in rows for c in columns})
    width = 2.2 * (1 + len(columns)) + 3.0 * n_bars + 1.2 * len(kinds)
    height = 2.9 * len(rows) + 0.8
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(width, height), squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [1] * (1 + len(columns)) + [1.25] * n_bars})
    for r, row in enumerate(rows):
        axes[r, 0].imshow(drawing.to_rgb(row.image), interpolation="nearest")
        axes[r, 0].set_title(row.caption or f"true: {class_names[row.label]}", fontsize=FONT)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        for c, name in enumerate(columns):
            target = row.targets.get(name)
            draw_tile(axes[r, c + 1], row.image, row.maps[name], bool(row.signed.get(name, False)),
                      f"map: {class_names[target]}" if target is not None else None)
            if r == 0:
                axes[r, c + 1].set_title(wrap(name), fontsize=FONT)
        bars = row.bars or [("", row.probabilities)]
        for b in range(n_bars):
            if b < len(bars):
                _top5_bars(axes[r, 1 + len(columns) + b], bars[b][1], row.label, class_names,
                           wrap(bars[b][0], 30) if r == 0 or len(bars) > 1 else "")
            else:
                axes[r, 1 + len(columns) + b].axis("off")
    for signed in kinds if columns else []:
        name, norm = drawing.colormap_for(signed)
        bar = fig.colorbar(plt.cm.ScalarMappable(cmap=name, norm=norm), ax=axes, shrink=min(0.8, 4 / len(rows) / len(kinds)),
                           aspect=25, location="right")
        bar.set_label(drawing.colour_bar_label(signed), fontsize=SMALL)
        bar.ax.tick_params(labelsize=SMALL)
    fig.suptitle(title, fontsize=FONT + 2)
    return fig


def render_gallery(rows: list[GalleryRow], class_names: list[str], path: str | Path, title: str) -> None:
    save_figure(gallery_figure(rows, class_names, title), path)


def wrap(text: str, width: int = 20) -> str:
    """Each line of `text` broken after ":", "_", "/" or "-" so that no piece is much longer than
    `width` characters (model names such as timm:vit_tiny_patch16_224 have no spaces)."""
    out = []
    for line in text.split("\n"):
        while len(line) > width:
            cut = max(line.rfind(ch, 0, width) for ch in ":_/-")
            if cut <= 0:
                break
            out.append(line[:cut + 1])
            line = line[cut + 1:]
        out.append(line)
    return "\n".join(out)


def _top5_bars(ax, probabilities: torch.Tensor, label: int, class_names: list[str], title: str = "") -> None:
    probs, classes = probabilities.topk(min(5, len(class_names)))
    colours = ["tab:green" if int(c) == label else "tab:gray" for c in classes]
    ax.barh(range(len(classes))[::-1], probs.cpu().numpy(), color=colours)
    ax.set_yticks(range(len(classes))[::-1], [class_names[int(c)] for c in classes], fontsize=SMALL)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (green: true class)" if label >= 0 else "probability", fontsize=SMALL)
    ax.tick_params(axis="x", labelsize=SMALL)
    if title:
        ax.set_title(title, fontsize=FONT)
