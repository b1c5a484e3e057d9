"""Paired tests of faithfulness scores: every map set is scored on the same images, so every
comparison is a per-image difference.

    rows = comparison_rows(image_rows)     # the rows of faithfulness_images.csv -> faithfulness_tests.csv

For each run, baseline and grid, and each gap (`xtl.faithfulness.metrics.GAPS`: the symmetric
relevance gain of the probability, insertion - deletion, and of the accuracy, negative - positive),
the family of comparisons is: every method's map set (each reading of it) against the random map
and against the uniform map, and every two map sets of different methods against each other. Each
comparison is the mean of the per-image differences (first minus second: positive means the first
ranks better) with a seeded percentile-bootstrap 95 % interval over the images, and a two-sided
p-value from the *same* resamples (`paired_difference`: the smallest level at which the percentile
interval excludes 0), so the interval and the test never disagree. The p-values of all the rows of
one call are corrected together by Holm's step-down method (`holm`); a verdict says which map set
is better only where the corrected p-value is below `ALPHA`, and "cannot decide" otherwise.

The bootstrap's p-value is resolved to 2 / (resamples + 1) (1e-4 with the default 20,000): enough
for Holm over a few hundred comparisons at 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xtl.faithfulness.metrics import GAPS
from xtl.statistics import bootstrap_p, percentile_interval

RESAMPLES = 20_000
LEVEL = 0.95
ALPHA = 0.05
REFERENCE_SETS = ("random", "uniform")
CHUNK = 2_000  # resamples drawn at a time: memory stays at CHUNK x images


@dataclass(frozen=True)
class Difference:
    """The mean per-image difference of two paired samples, its bootstrap interval and p-value."""

    n: int
    mean: float
    low: float
    high: float
    p: float


def resampled_means(differences: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0) -> torch.Tensor:
    """[n, k] per-image differences (k comparisons on the same n images) -> [resamples, k]: the means of
    `resamples` bootstrap resamples of the images, the same resamples for every comparison (seeded)."""
    d = torch.as_tensor(differences, dtype=torch.float64)
    n = d.shape[0]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, resamples, CHUNK):
        r = min(CHUNK, resamples - start)
        index = torch.randint(n, (r, n), generator=generator)
        counts = torch.zeros(r, n, dtype=torch.float64).scatter_add_(1, index, torch.ones(r, n, dtype=torch.float64))
        out.append(counts @ d / n)
    return torch.cat(out)


def summarise(differences: torch.Tensor, means: torch.Tensor, level: float = LEVEL) -> list[Difference]:
    """Per comparison (column): the observed mean, the percentile interval of the resampled `means` and the
    two-sided bootstrap p-value 2 min(#{m <= 0} + 1, #{m >= 0} + 1) / (R + 1), capped at 1."""
    d = torch.as_tensor(differences, dtype=torch.float64)
    low, high = percentile_interval(means, level)
    p = bootstrap_p(means)
    return [Difference(d.shape[0], float(d[:, j].mean()), float(low[j]), float(high[j]), float(p[j]))
            for j in range(d.shape[1])]


def paired_difference(first, second, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Difference:
    """Mean of `first - second` over paired images with its percentile-bootstrap interval and p-value."""
    d = (torch.as_tensor(first, dtype=torch.float64) - torch.as_tensor(second, dtype=torch.float64))[:, None]
    return summarise(d, resampled_means(d, resamples, seed), level)[0]


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the order given."""
    p = [float(x) for x in p_values]
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def verdict(row: dict, alpha: float = ALPHA) -> str:
    """"first", "second" (the better one, Holm-corrected) or "cannot decide"."""
    if not math.isfinite(row["p_holm"]) or row["p_holm"] >= alpha:
        return "cannot decide"
    return "first" if row["mean"] > 0 else "second"


def comparison_rows(image_rows: list[dict], measures: tuple[str, ...] = tuple(GAPS), resamples: int = RESAMPLES,
              seed: int = 0, alpha: float = ALPHA) -> list[dict]:
    """The paired tests of the module's docstring from per-image rows (`ModelScores.image_rows`, or
    faithfulness_images.csv read back); one Holm family over all of them."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for row in image_rows:
        key = (row["run"], row["baseline"], str(row["grid"]))
        groups.setdefault(key, {}).setdefault(row["label"], []).append(row)
    rows: list[dict] = []
    for (run, baseline, grid), sets in groups.items():
        ordered = {label: sorted(r, key=lambda x: int(x["image"])) for label, r in sets.items()}
        first_rows = next(iter(ordered.values()))
        n = len(first_rows)
        if n < 2 or any(len(r) != n for r in ordered.values()):
            continue  # an interval needs two images; map sets of other images are not paired
        info = {label: (r[0]["method"], r[0]["reading"]) for label, r in ordered.items()}
        methods = [label for label in ordered if info[label][0] not in REFERENCE_SETS]
        pairs = [(m, ref, "reference") for m in methods for ref in REFERENCE_SETS if ref in ordered]
        pairs += [(a, b, "method") for i, a in enumerate(methods) for b in methods[i + 1:] if info[a][0] != info[b][0]]
        for measure in measures:
            if not all(measure in r[0] for r in ordered.values()):
                continue
            values = {label: torch.tensor([float(x[measure]) for x in r], dtype=torch.float64)
                      for label, r in ordered.items()}
            if not pairs:
                continue
            differences = torch.stack([values[a] - values[b] for a, b, _ in pairs], dim=1)
            keep = torch.isfinite(differences).all(1)
            differences = differences[keep]
            if differences.shape[0] < 2:
                continue
            for (a, b, kind), d in zip(pairs, summarise(differences, resampled_means(differences, resamples, seed))):
                rows.append({"run": run, "model": first_rows[0]["model"], "baseline": baseline, "grid": grid,
                             "measure": measure, "kind": kind, "first": a, "second": b,
                             "first_method": info[a][0], "first_reading": info[a][1],
                             "second_method": info[b][0], "second_reading": info[b][1],
                             "n": d.n, "mean": d.mean, "low": d.low, "high": d.high, "p": d.p})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
        row["family"] = len(rows)
        row["verdict"] = verdict(row, alpha)
    return rows
