"""What a faithfulness job gives: per method, the curves and AUCs of every image; and its files.

    runs/<name>/faithfulness.csv            one row per method: each metric's mean AUC and std over images
    runs/<name>/faithfulness_curves.csv     the mean curve of every method and metric
    runs/<name>/figures/faithfulness_curves.png
    <first run or --out>/faithfulness_combined.csv, figures/faithfulness_combined.png   (several runs)

A column `<metric>` holds the mean AUC of the maps of the predicted class, `<metric>_true` (accuracy
metrics only) that of the true class's maps, and `<column>_std` the std over images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from xtl.faithfulness.figures import plot_curves
from xtl.faithfulness.metrics import METRICS, Curve
from xtl.errors import XtlError
from xtl.io import read_csv, write_csv

ACCURACY_METRICS = [m.name for m in METRICS.values() if m.quantity == "accuracy"]
TEXT_COLUMNS = {"run", "model", "method", "baseline", "grid"}


@dataclass
class MethodScores:
    method: str
    curves: dict[str, Curve]  # metric name -> curves of the predicted class's maps; "<metric>_true" for the true class's
    explain_seconds: float
    score_seconds: float  # model time of the predicted class's maps, shared end points excluded

    @classmethod
    def concatenate(cls, name: str, parts: list[MethodScores]) -> MethodScores:
        """The batches' scores of one method as one set over all images."""
        if not parts:
            return cls(name, {}, 0.0, 0.0)
        curves = {column: Curve(curve.x, torch.cat([p.curves[column].values for p in parts]),
                                torch.cat([p.curves[column].auc for p in parts]))
                  for column, curve in parts[0].curves.items()}
        return cls(name, curves, sum(p.explain_seconds for p in parts), sum(p.score_seconds for p in parts))


@dataclass
class ModelScores:
    name: str  # the run (or output) directory's name
    model: str
    n_images: int
    steps: int
    baseline: str
    methods: list[MethodScores]
    grid: int | None = None  # cells per side of the perturbed grid; None: pixels

    def rows(self) -> list[dict]:
        return [self._row(m) for m in self.methods]

    def _row(self, m: MethodScores) -> dict:
        row = {"run": self.name, "model": self.model, "method": m.method, "n_images": self.n_images,
               "steps": self.steps, "baseline": self.baseline, "grid": grid_label(self.grid)}
        for column, curve in m.curves.items():
            row[column] = float(curve.auc.mean())
            row[f"{column}_std"] = float(curve.auc.std()) if len(curve.auc) > 1 else 0.0
        row["explain_s"] = round(m.explain_seconds, 3)
        row["score_s"] = round(m.score_seconds, 3)
        row["score_images_per_s"] = round(self.n_images / m.score_seconds, 3) if m.score_seconds > 0 else float("nan")
        return row


def grid_label(grid: int | None) -> str:
    """How a grid is written in tables: "pixel" (None) or the cells per side."""
    return "pixel" if grid is None else str(grid)


def curve_rows(result: ModelScores) -> list[dict]:
    return [{"method": m.method, "metric": metric, "x": round(float(x), 6), "mean": float(y)}
            for m in result.methods for metric, curve in m.curves.items()
            for x, y in zip(curve.x.tolist(), curve.values.mean(0).tolist())]


def write_outputs(directory: Path, result: ModelScores) -> None:
    write_csv(directory / "faithfulness.csv", result.rows())
    write_csv(directory / "faithfulness_curves.csv", curve_rows(result))
    plot_curves([result], directory / "figures" / "faithfulness_curves.png")


def write_combined(directory: Path, results: list[ModelScores]) -> None:
    write_csv(directory / "faithfulness_combined.csv", [row for r in results for row in r.rows()])
    plot_curves(results, directory / "figures" / "faithfulness_combined.png")


def read_rows(path: Path) -> list[dict]:
    """Rows of a faithfulness CSV with numbers as numbers (`write_csv`, `xtl.io`'s, writes them); a
    damaged file is one line naming it."""
    try:
        rows = read_csv(path, floats=True, text=TEXT_COLUMNS)
    except (OSError, ValueError, TypeError) as err:  # TypeError: csv's None for a missing value
        why = ("binary, not text" if isinstance(err, UnicodeDecodeError) else "rows of the wrong length"
               if isinstance(err, TypeError) else f"not a CSV of scores: {str(err).splitlines()[0]}")
        raise XtlError(f"faithfulness table {path} is damaged ({why}); delete it and run `xtl faithfulness` "
                       "(or the same `xtl run`) again") from None
    if any("method" not in row for row in rows):
        raise XtlError(f"faithfulness table {path} is damaged (no column method); delete it and run "
                       "`xtl faithfulness` (or the same `xtl run`) again")
    return rows
