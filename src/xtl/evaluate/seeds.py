"""Accuracy over fine-tuning seeds, and the models compared seed by seed.

One seed's test accuracy has a 95 % interval over the test images (`metrics.json`); it says nothing
of how much another fine-tuning seed would move it. With several seeds on one split,

    over_seeds({0: [cnn_run, vit_run], 1: [...], 2: [...]})

gives, per model, each seed's accuracy with the mean, the range (min, max) and the sample standard
deviation over seeds beside the primary (first) seed's interval; and per pair of models, each seed's
accuracy difference with McNemar's exact test on the same test images (`xtl.evaluate.metrics`), the
mean and range of the difference, and whether every seed orders the two models the same way with
p < 0.05. Three seeds give no interval for the mean worth printing: the range is shown instead.
"""

from __future__ import annotations

import statistics as stats
from typing import Any

from xtl.evaluate.metrics import mcnemar, paired_correctness
from xtl.runs import RunDir

ALPHA = 0.05


def over_seeds(runs_by_seed: dict[int, list[RunDir]]) -> dict[str, Any]:
    """The module's summary; `runs_by_seed` maps each seed (the primary first) to its runs, one per
    model, every seed with the same models. Runs without metrics.json are left out."""
    from xtl.evaluate import read_predicted

    seeds = list(runs_by_seed)
    models: dict[str, dict[int, RunDir]] = {}
    for seed, runs in runs_by_seed.items():
        for run in runs:
            if run.file("metrics.json").is_file():
                models.setdefault(str(run.read()["run"]["model"]), {})[seed] = run
    accuracy = []
    for model, by_seed in models.items():
        values = {seed: float(run.metrics()["accuracy"]) for seed, run in by_seed.items()}
        primary = by_seed.get(seeds[0])
        low, high = primary.metrics()["accuracy_ci95"] if primary is not None else (float("nan"),) * 2
        accuracy.append({"model": model, "seeds": list(values), "per_seed": [values[s] for s in values],
                         "mean": stats.fmean(values.values()), "min": min(values.values()), "max": max(values.values()),
                         "sd": stats.stdev(values.values()) if len(values) > 1 else float("nan"),
                         "primary_seed": seeds[0], "primary": values.get(seeds[0], float("nan")),
                         "primary_low": float(low), "primary_high": float(high)})
    names = list(models)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            rows = []
            for seed in seeds:
                if seed not in models[a] or seed not in models[b]:
                    continue
                ra, rb = models[a][seed], models[b][seed]
                ca, cb = paired_correctness(read_predicted(ra), read_predicted(rb))
                test = mcnemar(ca, cb)
                rows.append({"seed": seed, "difference": float(cb.mean() - ca.mean()), "n": test.n,
                             "only_a": test.b, "only_b": test.c, "p_value": test.p_value})
            if not rows:
                continue
            differences = [r["difference"] for r in rows]
            significant = [r for r in rows if r["p_value"] < ALPHA]
            signs = {r["difference"] > 0 for r in significant}
            same = len(significant) == len(rows) and len(signs) == 1
            better = (b if signs == {True} else a) if same else None
            pairs.append({"a": a, "b": b, "per_seed": rows, "mean_difference": stats.fmean(differences),
                          "min_difference": min(differences), "max_difference": max(differences),
                          "every_seed": same, "better": better, "sentence": _sentence(a, b, rows, better)})
    return {"seeds": seeds, "accuracy": accuracy, "pairs": pairs}


def _sentence(a: str, b: str, rows: list[dict], better: str | None) -> str:
    seeds = ", ".join(str(r["seed"]) for r in rows)
    parts = "; ".join(f"seed {r['seed']} {100 * r['difference']:+.1f} points, McNemar p = {r['p_value']:.3g}" for r in rows)
    if better is not None:
        return (f"{better} is more accurate than {a if better == b else b} with every seed ({seeds}): "
                f"{b} minus {a} {parts}.")
    return (f"The seeds ({seeds}) do not all show one model more accurate at p < {ALPHA}: {b} minus {a} {parts}; "
            "the data cannot decide which model is more accurate.")
