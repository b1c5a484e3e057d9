"""Evaluation of a run's best model on its test split: metrics, predictions, figures."""

from __future__ import annotations

import csv

import torch

from xtl.data import Split
from xtl.evaluate.figures import plot_confusion_matrix, plot_per_class_accuracy, plot_training_curves
from xtl.evaluate.metrics import (
    McNemar,
    Predictions,
    bootstrap_ci,
    compute_metrics,
    mcnemar,
    paired_correctness,
    predict,
)
from xtl.device import resolve_device
from xtl.distributed import SINGLE, Ranks
from xtl.errors import XtlError, sigterm_as_interrupt
from xtl.io import read_csv, write_csv, write_json
from xtl.runs import EVALUATE_TODO, RunDir

__all__ = ["McNemar", "Predictions", "bootstrap_ci", "compute_metrics", "evaluate", "mcnemar", "paired_correctness",
           "predict", "read_predicted", "read_predictions"]


def evaluate(run: RunDir, split: Split | None = None, device: str | None = None, ranks: Ranks = SINGLE) -> dict:
    """Evaluate the run's best model on its test split and write metrics, predictions and figures.
    SIGTERM unwinds like Ctrl-C (no temporary file is left); the message names what was written.
    `ranks` (`xtl.distributed.launch`): each process predicts a contiguous run of whole batches, rank 0
    gathers them and writes (the same batches as one process: the same numbers); the others return {}."""
    written: list[str] = []

    def kept() -> str:
        return (f"{', '.join(written) or 'nothing'} written in {run.path} (the other files as they were, none "
                "half-written); the same command evaluates again")

    with sigterm_as_interrupt(kept):
        return _evaluate(run, split, device, written, ranks)


def _evaluate(run: RunDir, split: Split | None, device: str | None, written: list[str], ranks: Ranks = SINGLE) -> dict:
    config = run.config()
    device = resolve_device(ranks.device or device, config.accelerator)
    split = split or run.load_split()
    model, _ = run.load_model(device)
    pred = _predict_shared(model, split["test"], run.preprocess(), device, config.eval_batch_size, ranks)
    if pred is None:
        return {}
    metrics = compute_metrics(pred, split.class_names)
    epochs = run.history("epochs")
    metrics["model"] = config.model
    metrics["best_epoch"] = run.best_epoch()  # the epoch of the weights evaluated, as training recorded it
    metrics["epochs_trained"] = len(epochs)
    metrics["images_per_s_train"] = _median_throughput(run.history("batches"))
    write_json(run.file("metrics.json"), metrics)
    written.append("metrics.json")
    write_predictions(run, pred, split.class_names)
    written.append("predictions.csv")
    write_figures(run, metrics, epochs)
    written.append("the figures")
    return metrics


def _predict_shared(model, part, preprocess, device, batch_size: int, ranks: Ranks) -> Predictions | None:
    """`predict` on one process, or each process's contiguous whole batches gathered on rank 0 (None elsewhere)."""
    if ranks.world == 1:
        return predict(model, part, preprocess, device, batch_size=batch_size)
    from dataclasses import replace

    from xtl.data.stream import take

    mine = ranks.block(-(-len(part) // batch_size))
    rows = slice(mine.start * batch_size, min(mine.stop * batch_size, len(part)))
    shard = replace(part, ids=part.ids[rows], labels=part.labels[rows], images=take(part.images, rows), keys=part.keys[rows])
    # fewer batches than processes: a process without any gathers an empty [0, 0]
    probabilities = ranks.gather(predict(model, shard, preprocess, device, batch_size=batch_size).probabilities)
    if not ranks.is_zero:
        return None
    return Predictions(ids=part.ids, labels=part.labels.clone(), probabilities=torch.cat([p for p in probabilities if len(p)]))


def write_predictions(run: RunDir, pred: Predictions, class_names: list[str]) -> None:
    """predictions.csv: id, label, predicted, then p_<class> for every class (6 decimals)."""
    columns = ["id", "label", "predicted", *[f"p_{name}" for name in class_names]]
    rows = [dict(zip(columns, [i, label, guess, *[f"{p:.6f}" for p in probs]]))
            for i, label, guess, probs in zip(pred.ids.tolist(), pred.labels.tolist(), pred.predicted.tolist(),
                                              pred.probabilities.tolist())]
    write_csv(run.file("predictions.csv"), rows, columns)


def _prediction_rows(run: RunDir) -> tuple[list[int], list[int], list[int], list[list[float]]]:
    """predictions.csv's columns: ids, labels, predicted classes and probabilities (the class columns
    follow the first three), checked against the run's classes (one line naming the file if not)."""
    path = run.file("predictions.csv")
    if not path.is_file():
        raise XtlError(f"run directory {run.path} has no predictions.csv; run `xtl evaluate {run.path}`")
    columns = ["id", "label", "predicted"]
    try:
        rows = read_csv(path)
        if not rows:
            raise ValueError("no rows" if path.stat().st_size else "empty")
        header = list(rows[0])
        n_classes = len(header) - 3
        if header[:3] != columns or n_classes < 1 or not all(str(c).startswith("p_") for c in header[3:]):
            raise ValueError(f"columns {', '.join(map(str, header[:4]))}{', ...' if len(header) > 4 else ''}, "
                             "not id, label, predicted and p_<class> per class")
        values = [list(row.values()) for row in rows]
        ids, labels, predicted = ([int(r[k]) for r in values] for k in range(3))
        probabilities = [[float(p) for p in r[3:]] for r in values]
    except UnicodeDecodeError:
        raise run.damaged(path, "binary, not text", EVALUATE_TODO) from None
    except (TypeError, csv.Error):  # csv gives None for a missing value, a list for extra ones
        raise run.damaged(path, "rows of the wrong length", EVALUATE_TODO) from None
    except ValueError as err:
        raise run.damaged(path, str(err).splitlines()[0], EVALUATE_TODO) from None
    if any(not 0 <= k < n_classes for k in labels + predicted):
        raise run.damaged(path, f"a class index outside 0..{n_classes - 1}", EVALUATE_TODO)
    return ids, labels, predicted, probabilities


def read_predictions(run: RunDir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, probabilities) of the run's test images, as `evaluate` wrote them."""
    ids, labels, _, probabilities = _prediction_rows(run)
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
            torch.tensor(probabilities, dtype=torch.float32))


def read_predicted(run: RunDir) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, predicted classes) of the run's test images, the predicted class as `evaluate`
    wrote it (not re-derived from the rounded probabilities, which can tie)."""
    ids, labels, predicted, _ = _prediction_rows(run)
    return ids, labels, predicted


def write_figures(run: RunDir, metrics: dict, epochs: list[dict]) -> None:
    name = metrics["model"]
    batches = run.history("batches")
    if batches:
        plot_training_curves(batches, epochs, run.figures / "training_curves.png", f"{name}: training")
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"], run.figures / "confusion_matrix.png",
                          f"{name}: confusion matrix (test, n={metrics['n_images']})")
    plot_per_class_accuracy(metrics["per_class_accuracy"], run.figures / "per_class_accuracy.png",
                            f"{name}: per-class test accuracy")


def _median_throughput(batches: list[dict]) -> float | None:
    values = sorted(b["images_per_s"] for b in batches[1:]) or sorted(b["images_per_s"] for b in batches)
    return values[len(values) // 2] if values else None
