"""Figures of the data: class distribution per split part (paper Fig. 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xtl.data.splits import Split
from xtl.io import pyplot, save_figure


def plot_class_distribution(split: Split, path: str | Path) -> None:
    plt = pyplot()
    counts = split.summary()
    names = split.class_names
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4))
    width = 0.8 / len(counts)
    x = np.arange(len(names))
    for k, (part, values) in enumerate(counts.items()):
        ax.bar(x + (k - (len(counts) - 1) / 2) * width, values, width, label=f"{part} ({sum(values)})")
    ax.set_xticks(x, names, rotation=45 if len(names) <= 20 else 90, ha="right")
    ax.set_ylabel("images")
    ax.set_xlabel("class")
    ax.set_title(f"Class distribution — {split.source}")
    # the bars of a balanced split reach the top everywhere: the legend goes above them, in one row
    top = max((max(v) for v in counts.values() if len(v)), default=1)
    ax.set_ylim(0, top * 1.18)
    ax.legend(loc="upper center", ncol=len(counts), frameon=False)
    save_figure(fig, path)
