"""The mean faithfulness curves: one row of panels per model, one panel per metric, one line per method."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from xtl.faithfulness.metrics import METRICS
from xtl.io import pyplot, save_figure

if TYPE_CHECKING:
    from xtl.faithfulness.results import ModelScores

REFERENCE_STYLE = {"random": {"color": "0.45", "ls": "--"}, "uniform": {"color": "black", "ls": ":"}}
Y_LABEL = {"probability": "probability of the explained class", "accuracy": "accuracy (true label)"}


def plot_curves(results: list["ModelScores"], path: Path) -> None:
    """One row of panels per model and baseline on the job's main grid (the first result's; the other
    grids of the sensitivity table are in the CSVs only)."""
    results = [r for r in results if r.grid == results[0].grid]
    plt = pyplot()
    metrics = list(METRICS.values())
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(4.2 * len(metrics), 3.6 * len(results)),
                             squeeze=False)
    for row, result in zip(axes, results):
        for ax, metric in zip(row, metrics):
            for k, m in enumerate(result.methods):
                curve = m.curves[metric.name]
                style = REFERENCE_STYLE.get(m.method, {"color": f"C{k % 10}", "ls": "-"})
                ax.plot(curve.x.numpy(), curve.values.mean(0).numpy(), lw=1.6, **style,
                        label=f"{m.label} ({float(curve.auc.mean()):.3f})")
            ax.set_xlabel(_x_label(metric))
            ax.set_ylabel(Y_LABEL[metric.quantity])
            ax.set_title(f"{result.model}, {result.baseline}: {metric.name} (AUC {metric.arrow})", fontsize=10)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    grid = "per pixel" if results[0].grid is None else f"{results[0].grid} x {results[0].grid} grid"
    fig.suptitle(f"Faithfulness ({results[0].steps} steps, {grid}, maps of the predicted class)")
    fig.tight_layout()
    save_figure(fig, path)


def _x_label(metric) -> str:
    if metric.revealed_axis:  # revealing the most relevant first = masking the least relevant first
        return "fraction of pixels revealed (most relevant first)"
    return f"fraction of pixels masked ({metric.masked_first} relevant first)"
