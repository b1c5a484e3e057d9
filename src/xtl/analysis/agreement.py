"""Do two explanations point at the same cells? Rank correlation and top-k IoU of maps of the same
images, between models (same method) and between methods (same model).

Both maps are read as in `xtl.analysis.statistics` (positive part) and first brought to one grid:
the coarser of the two, at most `MAX_GRID` cells a side, by area averaging (`adaptive_avg_pool2d`),
so a 4 x 4 Grad-CAM and an 8 x 8 token map are compared on 4 x 4 cells.

    spearman   Spearman rank correlation of the cells (`xtl.analysis.metrics.spearman`: ties get
               their average rank); NaN where a map is constant (a correlation with a constant is undefined)
    iou        intersection over union of the top `TOP_SHARE` (10 %) cells of each map
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_GRID = 32
TOP_SHARE = 0.10


def common_grid(a: torch.Tensor, b: torch.Tensor, limit: int = MAX_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [B, h, w] and [B, h', w'] (positive parts) on one grid: the smaller of each side, at most `limit`."""
    a = torch.as_tensor(a).double().clamp(min=0)
    b = torch.as_tensor(b).double().clamp(min=0)
    size = (min(a.shape[-2], b.shape[-2], limit), min(a.shape[-1], b.shape[-1], limit))
    pool = lambda m: m if tuple(m.shape[-2:]) == size else F.adaptive_avg_pool2d(m[:, None], size)[:, 0]
    return pool(a), pool(b)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation per image of maps [B, h, w] on the same grid -> [B] (NaN for a constant map)."""
    from xtl.analysis.metrics import spearman as rows_spearman

    return rows_spearman(a.flatten(1), b.flatten(1))


def top_iou(a: torch.Tensor, b: torch.Tensor, share: float = TOP_SHARE) -> torch.Tensor:
    """IoU of the top `share` of cells (at least one) of maps [B, h, w] on the same grid -> [B]."""
    fa, fb = a.flatten(1), b.flatten(1)
    k = max(1, math.ceil(share * fa.shape[1] - 1e-9))
    ma = torch.zeros_like(fa, dtype=torch.bool).scatter_(1, fa.topk(k, dim=1).indices, True)
    mb = torch.zeros_like(fb, dtype=torch.bool).scatter_(1, fb.topk(k, dim=1).indices, True)
    return (ma & mb).sum(1).double() / (ma | mb).sum(1).double()


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Spearman and top-10 % IoU per image of two sets of maps of the same images -> name -> [B]."""
    a, b = common_grid(a, b)
    return {"spearman": spearman(a, b), "iou": top_iou(a, b)}


def shared(ids_a: torch.Tensor, ids_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in a and in b of the image ids both have, in a's order."""
    where_b = {int(i): k for k, i in enumerate(ids_b.tolist())}
    pairs = [(k, where_b[int(i)]) for k, i in enumerate(ids_a.tolist()) if int(i) in where_b]
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    pa, pb = zip(*pairs)
    return torch.tensor(pa), torch.tensor(pb)


def plot_agreement(labels: list[str], matrices: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """Heat maps of agreement matrices side by side, the value in each cell."""
    from xtl.io import pyplot, save_figure

    plt = pyplot()
    k = len(labels)
    size = max(4.0, 0.9 * k + 2)
    fig, axes = plt.subplots(1, len(matrices), figsize=(size * len(matrices), size), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        values = matrix.double().numpy()
        low = -1.0 if name == "spearman" else 0.0
        image = ax.imshow(values, cmap="RdBu_r" if low < 0 else "viridis", vmin=low, vmax=1.0)
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=9)
        ax.set_yticks(range(k), labels, fontsize=9)
        for i in range(k):
            for j in range(k):
                v = values[i, j]
                text = "–" if v != v else f"{v:.2f}"
                dark = v == v and (abs(v) > 0.6 if low < 0 else v < 0.5)
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_title({"spearman": "Spearman rank correlation", "iou": f"IoU of the top {TOP_SHARE:.0%} cells"}.get(name, name))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
