"""Figures of a run: training curves (paper Fig. 4a/4b), confusion matrix and per-class accuracy (4c/4d)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xtl.io import pyplot, save_figure


def plot_training_curves(batches: list[dict], epochs: list[dict], path: Path, title: str) -> None:
    """Per-batch loss and accuracy (raw and smoothed) with per-epoch validation points."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.array([b["step"] for b in batches])
    per_epoch = max(1, len(batches) // max(1, len(epochs)))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        values = np.array([b[key] for b in batches])
        ax.plot(steps, values, color="tab:blue", alpha=0.25, lw=0.8, label=f"train {label} (batch)")
        if len(values) >= 5:
            k = max(2, min(25, len(values) // 10))
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, color="tab:blue", lw=1.8, label=f"train {label} (moving mean of {k})")
        if epochs:
            ends = [e["epoch"] * per_epoch for e in epochs]
            ax.plot(ends, [e[f"val_{key}"] for e in epochs], "o-", color="tab:orange", label=f"val {label} (epoch)")
        ax.set_xlabel("training batch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion_matrix(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> None:
    plt = pyplot()
    matrix = np.array(confusion)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * n + 2), max(4.5, 0.5 * n + 1.5)))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, label="images")
    if n <= 20:
        ax.set_xticks(range(n), class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), class_names)
        for i in range(n):
            for j in range(n):
                colour = "white" if matrix[i, j] > matrix.max() / 2 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    save_figure(fig, path)


def plot_per_class_accuracy(per_class: dict[str, float], path: Path, title: str) -> None:
    """Per-class test accuracy, sorted from best to worst."""
    plt = pyplot()
    names = list(per_class)
    values = [per_class[k] for k in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
    bars = ax.bar(range(len(names)), values, color="tab:green")
    if len(names) <= 20:
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class (sorted)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    save_figure(fig, path)
