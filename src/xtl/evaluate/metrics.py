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
from xtl.data.stream import consecutive_batches, image_batches
from xtl.models import class_probabilities


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
    for images in image_batches(part.images, consecutive_batches(len(part), batch_size)):  # a streamed part: decoded ahead in worker processes
        images = images.to(device, non_blocking=True)
        chunks.append(class_probabilities(model, preprocess(images)).cpu())
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


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two classifiers on the same images (Edwards' continuity-free exact form).

    `b`: images the first classifier gets right and the second wrong; `c`: the other way round.
    Under the null hypothesis of equal accuracy each discordant image is a fair coin, so
    `b ~ Binomial(b + c, 1/2)`; `p_value` is the two-sided exact binomial p-value
    `min(1, 2 P(X <= min(b, c)))` and `mid_p` its mid-p version `min(1, 2 P(X < min(b, c)) + P(X = min(b, c)))`.
    """

    n: int  # paired images
    b: int
    c: int
    p_value: float
    mid_p: float

    @property
    def discordant(self) -> int:
        return self.b + self.c


def mcnemar(correct_a, correct_b) -> McNemar:
    """McNemar's exact test from two 0/1 (or bool) vectors of per-image correctness, image k in both
    vectors being the same image. Exact in integer arithmetic (no normal approximation)."""
    a = np.asarray(correct_a).astype(bool).ravel()
    b_ = np.asarray(correct_b).astype(bool).ravel()
    if a.shape != b_.shape:
        raise ValueError(f"mcnemar: {a.size} and {b_.size} images are not paired")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    p_value, mid_p = _exact_two_sided(min(b, c), b + c)
    return McNemar(n=int(a.size), b=b, c=c, p_value=p_value, mid_p=mid_p)


def _exact_two_sided(k: int, n: int) -> tuple[float, float]:
    """Two-sided exact and mid-p values of observing `k` (the smaller count) of `n` fair coin flips."""
    import math

    if n == 0:
        return 1.0, 1.0
    total = 1 << n
    tail = sum(math.comb(n, i) for i in range(k + 1))  # P(X <= k) * 2^n, exact
    point = math.comb(n, k)
    # int / int is correctly rounded in Python, however large the integers
    return min(1.0, 2 * tail / total), min(1.0, (2 * tail - point) / total)


def paired_correctness(first: tuple, second: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of two classifiers matched by image id, from each one's
    (ids, labels, predicted classes). Raises XtlError saying why they cannot be paired: the runs
    were tested on other images, an id is repeated, or the same image carries two labels."""
    from xtl.errors import XtlError

    rows = []
    for ids, labels, predicted in (first, second):
        ids, labels, predicted = (np.asarray(v).astype(np.int64).ravel() for v in (ids, labels, predicted))
        if len(set(ids.tolist())) != len(ids):
            raise XtlError("a test image id occurs twice in one run's predictions")
        rows.append({int(i): (int(label), int(guess)) for i, label, guess in zip(ids, labels, predicted)})
    one, two = rows
    if set(one) != set(two):
        shared = len(set(one) & set(two))
        raise XtlError(f"the runs were tested on different images ({len(one)} and {len(two)} test images, "
                       f"{shared} shared)")
    order = sorted(one)
    if any(one[i][0] != two[i][0] for i in order):
        raise XtlError("the same test images carry different labels in the two runs")
    return (np.array([one[i][0] == one[i][1] for i in order], dtype=bool),
            np.array([two[i][0] == two[i][1] for i in order], dtype=bool))
