"""Test metrics of a fine-tuned model: accuracy with a bootstrap CI, ROC-AUC, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
)

from xtl.data import Preprocess, SplitPart
from xtl.models import inference_autocast


@dataclass
class Predictions:
    ids: np.ndarray
    labels: torch.Tensor  # int64 [N]
    probabilities: torch.Tensor  # float32 [N, C]

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(1)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    part: SplitPart,
    preprocess: Preprocess,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
) -> Predictions:
    """Class probabilities for every image of `part`, in batches, on `device`."""
    model.eval().to(device)
    chunks = []
    for start in range(0, len(part), batch_size):
        images = part.images[start : start + batch_size].to(device, non_blocking=True)
        with inference_autocast(device):
            logits = model(preprocess(images))
        chunks.append(logits.float().softmax(1).cpu())
    n_classes = chunks[0].shape[1] if chunks else 0
    probs = torch.cat(chunks) if chunks else torch.empty(0, n_classes)
    return Predictions(ids=part.ids, labels=part.labels.clone(), probabilities=probs)


def bootstrap_ci(correct: torch.Tensor, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of a 0/1 vector."""
    rng = np.random.default_rng(seed)
    values = correct.float().numpy()
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def compute_metrics(pred: Predictions, class_names: list[str]) -> dict:
    """Accuracy (+95 % CI), macro one-vs-rest ROC-AUC, confusion matrix, per-class accuracy."""
    n_classes = len(class_names)
    labels, probs = pred.labels, pred.probabilities
    accuracy = multiclass_accuracy(probs, labels, num_classes=n_classes, average="micro").item()
    per_class = multiclass_accuracy(probs, labels, num_classes=n_classes, average="none")
    present = torch.bincount(labels, minlength=n_classes) > 0
    # AUROC is undefined for a class absent from the labels; average over the present ones.
    auroc_each = multiclass_auroc(probs, labels, num_classes=n_classes, average="none")
    auroc = auroc_each[present].mean().item() if present.any() else float("nan")
    confusion = multiclass_confusion_matrix(probs, labels, num_classes=n_classes)
    low, high = bootstrap_ci(pred.predicted == labels)
    order = torch.argsort(per_class, descending=True)
    return {
        "n_images": len(labels),
        "accuracy": accuracy,
        "accuracy_ci95": [low, high],
        "roc_auc_macro_ovr": auroc,
        "per_class_accuracy": {class_names[i]: round(per_class[i].item(), 6) for i in order.tolist() if present[i]},
        "confusion_matrix": confusion.tolist(),
        "class_names": class_names,
    }
