"""What a faithfulness job gives: per map set (a method in one reading, or a reference), the curves
and AUCs of every image; and its files.

    runs/<name>/faithfulness.csv            one row per map set, baseline and grid: each column's mean and std over images
    runs/<name>/faithfulness_images.csv     one row per map set, baseline, grid and image: what every paired test reads
    runs/<name>/faithfulness_tests.csv      the paired tests of the gaps (`xtl.faithfulness.paired`), Holm-corrected
    runs/<name>/faithfulness_curves.csv     the mean curve of every map set and metric
    runs/<name>/figures/faithfulness_curves.png
    <first run or --out>/faithfulness_combined{,_images,_tests}.csv, figures/faithfulness_combined.png   (several runs)

A column `<metric>` holds the mean AUC of the maps of the predicted class, `<metric>_true` (accuracy
metrics only) that of the true class's maps, `srg` and `srg_accuracy` (`_true`) the gaps of the two
orders (`xtl.faithfulness.metrics.GAPS`), `logit_share` (LRP-type methods) the share of the explained
logit that reaches the pixels, and `<column>_std` the std over images. `reading` says how a signed
map was read (`xtl.faithfulness.readings`); `label` is the map set's name in tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from xtl.faithfulness.figures import plot_curves
from xtl.faithfulness.metrics import GAPS, METRICS, Curve, html_table, mean_text
from xtl.faithfulness.readings import UNSIGNED, label as reading_label, set_name, split_name
from xtl.errors import XtlError
from xtl.io import read_csv, write_csv

ACCURACY_METRICS = [m.name for m in METRICS.values() if m.quantity == "accuracy"]
TEXT_COLUMNS = {"run", "model", "method", "reading", "label", "baseline", "grid", "id"}


@dataclass
class MethodScores:
    """The scores of one map set: a method in one reading (`xtl.faithfulness.readings`), or a reference."""

    method: str
    curves: dict[str, Curve]  # metric name -> curves of the predicted class's maps; "<metric>_true" for the true class's
    explain_seconds: float
    score_seconds: float  # model time of the predicted class's maps, shared end points excluded
    reading: str = UNSIGNED  # signed, positive, absolute (a signed method's three) or unsigned
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # per-image numbers beside the curves ("logit_share")

    @property
    def name(self) -> str:
        """The map set's name (`readings.set_name`): the method, or method:reading."""
        return set_name(self.method, self.reading)

    @property
    def label(self) -> str:
        return reading_label(self.method, self.reading)

    @classmethod
    def concatenate(cls, name: str, parts: list[MethodScores]) -> MethodScores:
        """The batches' scores of one map set (`name`: as `set_name` writes it) as one set over all images."""
        method, reading = split_name(name)
        if not parts:
            return cls(method, {}, 0.0, 0.0, reading)
        curves = {column: Curve(curve.x, torch.cat([p.curves[column].values for p in parts]),
                                torch.cat([p.curves[column].auc for p in parts]))
                  for column, curve in parts[0].curves.items()}
        extras = {key: torch.cat([p.extras[key] for p in parts]) for key in parts[0].extras
                  if all(key in p.extras for p in parts)}
        return cls(method, curves, sum(p.explain_seconds for p in parts), sum(p.score_seconds for p in parts),
                   reading, extras)

    def __repr__(self) -> str:
        return f"MethodScores({self._summary()})"

    def _summary(self) -> str:
        n = len(next(iter(self.curves.values())).auc) if self.curves else 0
        means = ", ".join(f"{column}={mean_text(values)}" for column, values in self.per_image().items())
        return f"method={self.method!r}, reading={self.reading!r}, images={n}, mean: {means or 'none'}"

    def to_pandas(self):
        """A pandas DataFrame, one row per image: every column of `per_image` (AUCs, gaps, extras)."""
        import pandas as pd

        columns = self.per_image()
        n = len(next(iter(columns.values()))) if columns else 0
        return pd.DataFrame({"method": [self.method] * n, "reading": [self.reading] * n, "image": list(range(n)),
                             **{column: values.tolist() for column, values in columns.items()}})

    def _repr_html_(self) -> str:
        return html_table(f"MethodScores: {self._summary()}", self.to_pandas())

    def per_image(self) -> dict[str, torch.Tensor]:
        """Column -> [B] per-image AUCs, the gaps (`GAPS`, and of the true class's maps where scored) and the extras."""
        columns = {column: curve.auc.double() for column, curve in self.curves.items()}
        for suffix in ("", "_true"):
            for gap in GAPS.values():
                least, most = gap.least + suffix, gap.most + suffix
                if least in columns and most in columns:
                    columns[gap.name + suffix] = columns[least] - columns[most]
        columns.update({key: value.double() for key, value in self.extras.items()})
        return columns


@dataclass
class ModelScores:
    name: str  # the run (or output) directory's name
    model: str
    n_images: int
    steps: int
    baseline: str
    methods: list[MethodScores]
    grid: int | None = None  # cells per side of the perturbed grid; None: pixels

    ids: list[str] | None = None  # the scored images' ids (file names), in order; None: their positions

    def __repr__(self) -> str:
        return f"ModelScores({self._summary()})"

    def _summary(self) -> str:
        return (f"name={self.name!r}, model={self.model!r}, map_sets={len(self.methods)}, images={self.n_images}, "
                f"steps={self.steps}, baseline={self.baseline!r}, grid={grid_label(self.grid)}")

    def to_pandas(self, per_image: bool = False):
        """A pandas DataFrame: one row per map set (`rows()`: each column's mean and std over the images,
        as faithfulness.csv holds them), or with `per_image=True` one row per map set and image
        (`image_rows()`, as faithfulness_images.csv)."""
        import pandas as pd

        return pd.DataFrame(self.image_rows() if per_image else self.rows())

    def _repr_html_(self) -> str:
        return html_table(f"ModelScores: {self._summary()}", self.to_pandas())

    def rows(self) -> list[dict]:
        """One row per map set: each column's mean over the images and its std (`<column>_std`)."""
        return [self._row(m) for m in self.methods]

    def _key(self, m: MethodScores) -> dict:
        return {"run": self.name, "model": self.model, "method": m.method, "reading": m.reading, "label": m.label,
                "n_images": self.n_images, "steps": self.steps, "baseline": self.baseline, "grid": grid_label(self.grid)}

    def image_rows(self) -> list[dict]:
        """One row per map set and image: the per-image AUCs, gaps and extras that every paired test reads."""
        rows = []
        for m in self.methods:
            key, columns = self._key(m), m.per_image()
            values = {column: v.tolist() for column, v in columns.items()}
            for i in range(self.n_images):
                rows.append({**key, "image": i, "id": self.ids[i] if self.ids else str(i),
                             **{column: v[i] for column, v in values.items()}})
        return rows

    def _row(self, m: MethodScores) -> dict:
        row = self._key(m)
        for column, values in m.per_image().items():
            finite = values[torch.isfinite(values)]
            row[column] = float(finite.mean()) if len(finite) else float("nan")
            row[f"{column}_std"] = float(finite.std()) if len(finite) > 1 else 0.0
        row["explain_s"] = round(m.explain_seconds, 3)
        row["score_s"] = round(m.score_seconds, 3)
        row["score_images_per_s"] = round(self.n_images / m.score_seconds, 3) if m.score_seconds > 0 else float("nan")
        return row


def grid_label(grid: int | None) -> str:
    """How a grid is written in tables: "pixel" (None) or the cells per side."""
    return "pixel" if grid is None else str(grid)


def curve_rows(result: ModelScores) -> list[dict]:
    return [{"method": m.method, "reading": m.reading, "baseline": result.baseline, "grid": grid_label(result.grid),
             "metric": metric, "x": round(float(x), 6), "mean": float(y)}
            for m in result.methods for metric, curve in m.curves.items()
            for x, y in zip(curve.x.tolist(), curve.values.mean(0).tolist())]


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rows whose keys differ (an LRP-type map set's logit share, other runs' columns) as one CSV: the
    union of the columns in order of appearance, NaN where a row has no value."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    write_csv(path, [{c: row.get(c, float("nan")) for c in columns} for row in rows], columns)


def _main_grid(image_rows: list[dict]) -> list[dict]:
    """The rows of the job's main grid (the first's): the family of the paired tests. The other grids are
    the sensitivity table's, which reports ranks, not tests."""
    return [r for r in image_rows if r["grid"] == image_rows[0]["grid"]] if image_rows else []


def write_outputs(directory: Path, results: list[ModelScores]) -> None:
    """One run's (or output folder's) scores under every baseline and grid: the table, the per-image
    scores, the paired tests, the mean curves and their figure."""
    from xtl.faithfulness.paired import comparison_rows

    write_rows(directory / "faithfulness.csv", [row for r in results for row in r.rows()])
    images = [row for r in results for row in r.image_rows()]
    write_rows(directory / "faithfulness_images.csv", images)
    write_rows(directory / "faithfulness_tests.csv", comparison_rows(_main_grid(images)))
    write_rows(directory / "faithfulness_curves.csv", [row for r in results for row in curve_rows(r)])
    plot_curves(results, directory / "figures" / "faithfulness_curves.png")


def write_combined(directory: Path, results: list[ModelScores]) -> None:
    """The scores of several runs side by side; the paired tests are one family over all of them (Holm)."""
    from xtl.faithfulness.paired import comparison_rows

    write_rows(directory / "faithfulness_combined.csv", [row for r in results for row in r.rows()])
    images = [row for r in results for row in r.image_rows()]
    write_rows(directory / "faithfulness_combined_images.csv", images)
    write_rows(directory / "faithfulness_combined_tests.csv", comparison_rows(_main_grid(images)))
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


TEST_TEXT_COLUMNS = {"run", "model", "baseline", "grid", "measure", "kind", "first", "second", "first_method",
                     "first_reading", "second_method", "second_reading", "verdict"}


def read_tests(path: Path) -> list[dict]:
    """The rows of a faithfulness_tests.csv (`xtl.faithfulness.paired`) with numbers as numbers; none where
    the file is missing (a job of an earlier version); a damaged file is one line naming it."""
    if not Path(path).is_file():
        return []
    try:
        return read_csv(path, floats=True, text=TEST_TEXT_COLUMNS)
    except (OSError, ValueError, TypeError):
        raise XtlError(f"faithfulness tests {path} are damaged; delete them and run `xtl faithfulness` "
                       "(or the same `xtl run`) again") from None
