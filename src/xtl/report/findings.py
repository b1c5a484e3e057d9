"""Numbers of finished runs turned into table rows and sentences for the report."""

from __future__ import annotations

import json
from dataclasses import dataclass

from xtl.errors import XtlError
from xtl.evaluate.figures import read_csv
from xtl.runs import RunDir


@dataclass
class ModelResult:
    """One evaluated run, as the report and `xtl compare` show it."""

    run: RunDir
    config: dict
    derived: dict
    versions: dict
    metrics: dict
    epochs: list[dict]

    @classmethod
    def read(cls, run: RunDir) -> "ModelResult":
        data = run.read()
        path = run.file("metrics.json")
        if not path.is_file():
            raise XtlError(f"run directory {run.path} has no metrics.json; run `xtl evaluate {run.path}`")
        return cls(run, data["run"], data["derived"], data.get("versions", {}), json.loads(path.read_text()),
                   read_csv(run.file("history_epochs.csv")))

    @property
    def name(self) -> str:
        return self.run.path.name

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def best_epoch(self) -> dict | None:
        return min(self.epochs, key=lambda e: e["val_loss"]) if self.epochs else None

    def row(self) -> dict[str, str]:
        """The comparison-table row (paper: test accuracy per model; we add the CI, AUC and sizes)."""
        m, sizes, best = self.metrics, self.derived["split_sizes"], self.best_epoch
        low, high = m["accuracy_ci95"]
        return {
            "run": self.name,
            "model": self.model,
            "input": f"{self.derived['input_size']} px",
            "train/val/test": f"{sizes['train']}/{sizes['val']}/{sizes['test']}",
            "epochs (best)": f"{len(self.epochs)} ({m['best_epoch']:.0f})" if best else "-",
            "val acc": f"{best['val_accuracy']:.3f}" if best else "-",
            "test acc [95 % CI]": f"{m['accuracy']:.3f} [{low:.3f}, {high:.3f}]",
            "ROC-AUC": f"{m['roc_auc_macro_ovr']:.3f}",
            "train img/s": f"{m['images_per_s_train']:.1f}" if m.get("images_per_s_train") else "-",
        }


@dataclass
class Confusion:
    true: str
    predicted: str
    count: int
    of: int  # test images of the true class

    @property
    def share(self) -> float:
        return self.count / self.of if self.of else 0.0


def top_confusions(metrics: dict, limit: int = 3) -> list[Confusion]:
    """The largest off-diagonal cells of the confusion matrix (rows: true class, columns: predicted)."""
    names, matrix = metrics["class_names"], metrics["confusion_matrix"]
    cells = [Confusion(names[t], names[p], matrix[t][p], sum(matrix[t]))
             for t in range(len(names)) for p in range(len(names)) if t != p and matrix[t][p] > 0]
    return sorted(cells, key=lambda c: (-c.count, -c.share, c.true, c.predicted))[:limit]


def confused_pairs(metrics: dict) -> dict[frozenset, int]:
    """Mistakes between two classes, both ways."""
    names, matrix = metrics["class_names"], metrics["confusion_matrix"]
    return {frozenset((names[a], names[b])): matrix[a][b] + matrix[b][a]
            for a in range(len(names)) for b in range(a + 1, len(names))}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def confusion_sentences(results: list[ModelResult]) -> list[str]:
    """The most-confused class pairs, written out: per model, then what the models share."""
    sentences = []
    for r in results:
        top = top_confusions(r.metrics)
        if not top:
            sentences.append(f"{r.model} made no mistakes on its {r.metrics['n_images']} test images.")
            continue
        parts = [f"{c.true} as {c.predicted} ({c.count} of {c.of} {c.true} images, {_pct(c.share)})" for c in top]
        mistakes = r.metrics["n_images"] - round(r.metrics["accuracy"] * r.metrics["n_images"])
        sentences.append(f"{r.model} made {mistakes} mistakes on {r.metrics['n_images']} test images; "
                         f"it most often took " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1] + ".")
    if len(results) > 1:
        totals: dict[frozenset, list[int]] = {}
        for r in results:
            for pair, n in confused_pairs(r.metrics).items():
                totals.setdefault(pair, []).append(n)
        ranked = sorted(totals.items(), key=lambda kv: (-sum(kv[1]), sorted(kv[0])))
        pair, counts = ranked[0]
        if sum(counts):
            a, b = sorted(pair)
            each = ", ".join(f"{r.model} {n}" for r, n in zip(results, counts))
            sentences.append(f"Across the models, {a} and {b} are the most confused pair: {sum(counts)} mistakes "
                             f"between them, either way ({each}).")
        best = max(results, key=lambda r: r.metrics["accuracy"])
        worst = min(results, key=lambda r: r.metrics["accuracy"])
        if best is not worst:
            gap = best.metrics["accuracy"] - worst.metrics["accuracy"]
            overlap = _ci_overlap(best.metrics["accuracy_ci95"], worst.metrics["accuracy_ci95"])
            sentences.append(f"{best.model} is {100 * gap:.1f} points more accurate than {worst.model}; "
                             + ("their 95 % intervals overlap, so the gap is not clear on this test set."
                                if overlap else "their 95 % intervals do not overlap."))
    return sentences


def _ci_overlap(a: list[float], b: list[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def summary_sentence(results: list[ModelResult]) -> str:
    """The results paragraph's first sentence: each model's test accuracy with its interval."""
    parts = []
    for r in results:
        low, high = r.metrics["accuracy_ci95"]
        parts.append(f"{r.model} reached {_pct(r.metrics['accuracy'])} test accuracy (95 % CI {_pct(low)} to "
                     f"{_pct(high)}; macro ROC-AUC {r.metrics['roc_auc_macro_ovr']:.3f})")
    n = {r.metrics["n_images"] for r in results}
    return f"On {'/'.join(str(x) for x in sorted(n))} test images, " + "; ".join(parts) + "."
