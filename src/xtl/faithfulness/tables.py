"""The faithfulness table, from the rows of the CSVs (`results.read_rows` or `ModelScores.rows`):
on a terminal (`faithfulness_table`: one rich table per run, under the run's full name) and in
Markdown (`markdown_table`, BENCHMARKS.md). Each cell is the mean AUC over the images ± the
half-width of its 95 % confidence interval (`half_width`); the best explanation method of each
column is emphasised."""

from __future__ import annotations

import math
from typing import Any, Callable

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from xtl.faithfulness.metrics import GAPS, METRICS
from xtl.faithfulness.results import ACCURACY_METRICS
from xtl.faithfulness.settings import REFERENCES
from xtl.runs import run_title

Z_95 = 1.96  # two-sided 95 % quantile of the normal distribution
PLUS_MINUS = ("± : half-width of the 95 % confidence interval of the mean over the images "
              "(1.96 × sample std of the per-image values / √images, normal approximation); the paired tests "
              "(faithfulness_tests.csv) decide which map set is better. SRG: the symmetric relevance gain, "
              "least-relevant-first minus most-relevant-first area (insertion − deletion, negative − positive; "
              "0 for a random ranking). Bold: the largest (or smallest) mean of a column; random and uniform are "
              "reference maps. (signed), (positive part), (|R|): how a signed map was read.")


GAP_HEADERS = {"srg": "SRG prob", "srg_accuracy": "SRG acc"}


def table_columns(true_class: bool = True) -> list[tuple[str, str]]:
    """(CSV column, header) of the table: the two gaps first (what the report leads with), then every
    metric of the predicted class, accuracy ones also of the true class (`true_class`; the terminal
    table leaves them to the CSV and the report, to fit 100 columns)."""
    columns = [(g.name, f"{GAP_HEADERS.get(g.name, g.name)} {g.arrow}") for g in GAPS.values()]
    columns += [(m.name, f"{m.name} {m.arrow}") for m in METRICS.values()]
    if not true_class:
        return columns
    return columns + [(f"{name}_true", f"{name} (true) {METRICS[name].arrow}") for name in ACCURACY_METRICS]


def higher_is_better(column: str) -> bool:
    name = column.removesuffix("_true")
    return GAPS[name].higher_is_better if name in GAPS else METRICS[name].higher_is_better


def faithfulness_table(rows: list[dict]) -> Group:
    """Mean AUC ± 95 % CI half-width (normal approximation over images) per method; the best in bold.

    One table per run, titled with the run's and model's names in full (a name is never cut: a
    table's columns cannot hold a long model name beside eight numbers on an 80-100 column
    terminal); the method column never wraps or cuts either. A caption says what ± is."""
    heading = Text(f"Faithfulness: AUC on {_images(rows)} images, {rows[0]['steps']:.0f} steps, "
                   f"baseline {'/'.join(dict.fromkeys(str(r['baseline']) for r in rows))}{_grid_words(rows)}", style="bold")
    tables = []
    for group in _by_run(rows):
        title = f"{run_title(group[0]['run'], group[0]['model'])}: baseline {group[0]['baseline']}, {_grid_of(group[0])}"
        table = Table(title=Text(title, style="bold", no_wrap=True, overflow="fold"),
                      title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0))
        table.add_column("map set", no_wrap=True, min_width=max(len(_label(r)) for r in group))
        for _, header in table_columns(true_class=False):  # wide enough for the header's longest word and "0.123 ±"
            table.add_column(header, justify="right", min_width=max(7, *map(len, header.split())))
        table.add_column("explain s", justify="right")
        table.add_column("score img/s", justify="right")
        # Text cells, not markup: the same table on a console that reads markup and on one that does not
        for row, cells in _formatted(group, lambda text: Text(text, style="bold"), true_class=False):
            table.add_row(Text(_label(row)), *[Text(c) if isinstance(c, str) else c for c in cells],
                          Text(f"{row['explain_s']:.1f}"), Text(f"{row['score_images_per_s']:.1f}"))
        tables.append(table)
    return Group(heading, *tables, Text(PLUS_MINUS, style="dim"))


def markdown_table(rows: list[dict]) -> str:
    """The table as Markdown (for BENCHMARKS.md): mean AUC ± 95 % CI half-width, the best in bold."""
    columns = table_columns()
    lines = ["| model | baseline | grid | images | map set | " + " | ".join(h for _, h in columns)
             + " | logit share | explain s | score img/s |",
             "|---|---|---|---|---|" + "---|" * len(columns) + "---|---|---|"]
    for group in _by_run(rows):
        for row, cells in _formatted(group, lambda text: f"**{text}**"):
            lines.append(f"| {row['model']} | {row['baseline']} | {row.get('grid', 'pixel')} | {row['n_images']:.0f} | "
                         f"{_label(row)} | " + " | ".join(cells) + f" | {logit_share(row)} | {row['explain_s']:.1f} | "
                         f"{row['score_images_per_s']:.1f} |")
    return "\n".join(lines) + "\n\n" + PLUS_MINUS + " " + LOGIT_SHARE + "\n"


LOGIT_SHARE = ("logit share: the mean share of the explained logit that reaches the pixels (LRP-type methods; the "
               "rest is absorbed by biases, tokens and softmaxes), so such a map is not a decomposition of the logit.")


def logit_share(row: dict) -> str:
    """The mean logit share of an LRP-type map set ("-" for the others)."""
    value = row.get("logit_share")
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f} ± {half_width(row, 'logit_share'):.2f}"


def _label(row: dict) -> str:
    """The map set's name: the label column, or (older tables) the method."""
    return str(row.get("label") or row["method"])


def _grid_of(row: dict) -> str:
    grid = str(row.get("grid", "pixel"))
    return "per pixel" if grid == "pixel" else f"{grid} x {grid} grid"


def _by_run(rows: list[dict]) -> list[list[dict]]:
    """The rows of each run, baseline and grid, in order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["run"], str(row.get("baseline")), str(row.get("grid", "pixel"))), []).append(row)
    return list(groups.values())


def _grid_words(rows: list[dict]) -> str:
    grids = sorted({str(r.get("grid", "pixel")) for r in rows})
    return "" if grids == ["pixel"] else f", perturbed on a {'/'.join(grids)} grid"


def _images(rows: list[dict]) -> str:
    return "/".join(sorted({f"{r['n_images']:.0f}" for r in rows}))


def _formatted(rows: list[dict], emphasis: Callable[[str], Any], true_class: bool = True) -> list[tuple[dict, list[Any]]]:
    """Each row with its metric cells; the best explanation method of each column emphasised."""
    columns = [c for c, _ in table_columns(true_class)]
    best = {c: _best(rows, c) for c in columns}
    return [(row, [emphasis(_cell(row, c)) if best[c] == _label(row) else _cell(row, c) for c in columns])
            for row in rows]


def _best(rows: list[dict], column: str) -> str | None:
    candidates = [r for r in rows if r["method"] not in REFERENCES and column in r]
    if not candidates:
        return None
    pick = max if higher_is_better(column) else min
    return _label(pick(candidates, key=lambda r: r[column]))


def half_width(row: dict, column: str) -> float:
    """Half-width of the 95 % confidence interval of the column's mean AUC over the row's images:
    1.96 × the sample std of the per-image AUCs (`<column>_std`) / √images."""
    return Z_95 * row[f"{column}_std"] / math.sqrt(max(row["n_images"], 1))


def _cell(row: dict, column: str) -> str:
    if column not in row:
        return "-"
    return f"{row[column]:.3f} ± {half_width(row, column):.3f}"
