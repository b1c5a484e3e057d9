"""Evaluation of a run's best model on its test split: metrics, predictions, figures."""

from __future__ import annotations

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
from xtl.errors import XtlError
from xtl.io import read_csv, write_csv, write_json
from xtl.runs import RunDir

__all__ = ["McNemar", "Predictions", "bootstrap_ci", "compute_metrics", "evaluate", "mcnemar", "paired_correctness",
           "predict", "read_predicted", "read_predictions"]


def evaluate(run: RunDir, split: Split | None = None, device: str | None = None) -> dict:
    """Evaluate the run's best model on its test split and write metrics, predictions and figures."""
    config = run.config()
    device = resolve_device(device, config.accelerator)
    split = split or run.load_split()
    model, _ = run.load_model(device)
    pred = predict(model, split["test"], run.preprocess(), device, batch_size=config.eval_batch_size)
    metrics = compute_metrics(pred, split.class_names)
    epochs = run.history("epochs")
    metrics["model"] = config.model
    metrics["best_epoch"] = run.best_epoch()  # the epoch of the weights evaluated, as training recorded it
    metrics["epochs_trained"] = len(epochs)
    metrics["images_per_s_train"] = _median_throughput(run.history("batches"))
    write_json(run.file("metrics.json"), metrics)
    write_predictions(run, pred, split.class_names)
    write_figures(run, metrics, epochs)
    return metrics


def write_predictions(run: RunDir, pred: Predictions, class_names: list[str]) -> None:
    """predictions.csv: id, label, predicted, then p_<class> for every class (6 decimals)."""
    columns = ["id", "label", "predicted", *[f"p_{name}" for name in class_names]]
    rows = [dict(zip(columns, [i, label, guess, *[f"{p:.6f}" for p in probs]]))
            for i, label, guess, probs in zip(pred.ids.tolist(), pred.labels.tolist(), pred.predicted.tolist(),
                                              pred.probabilities.tolist())]
    write_csv(run.file("predictions.csv"), rows, columns)


def _prediction_rows(run: RunDir) -> list[list[str]]:
    """predictions.csv's rows as lists of strings in column order (the class columns follow the first three)."""
    path = run.file("predictions.csv")
    if not path.is_file():
        raise XtlError(f"run directory {run.path} has no predictions.csv; run `xtl evaluate {run.path}`")
    return [list(row.values()) for row in read_csv(path)]


def read_predictions(run: RunDir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, probabilities) of the run's test images, as `evaluate` wrote them."""
    rows = _prediction_rows(run)
    ids = torch.tensor([int(r[0]) for r in rows], dtype=torch.long)
    labels = torch.tensor([int(r[1]) for r in rows], dtype=torch.long)
    return ids, labels, torch.tensor([[float(p) for p in r[3:]] for r in rows])


def read_predicted(run: RunDir) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels, predicted classes) of the run's test images, the predicted class as `evaluate`
    wrote it (not re-derived from the rounded probabilities, which can tie)."""
    rows = _prediction_rows(run)
    return [int(r[0]) for r in rows], [int(r[1]) for r in rows], [int(r[2]) for r in rows]


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
