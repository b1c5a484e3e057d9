"""Evaluation metrics against independent references (scikit-learn, direct counting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score

from xtl.evaluate import Predictions, bootstrap_ci, compute_metrics

CLASSES = ["a", "b", "c", "d"]


def _predictions(n: int = 400, seed: int = 0) -> Predictions:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    logits = torch.randn(n, 4, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 4)
    return Predictions(ids=np.arange(n), labels=labels, probabilities=logits.softmax(1))


def test_metrics_match_scikit_learn():
    pred = _predictions()
    m = compute_metrics(pred, CLASSES)
    y, p = pred.labels.numpy(), pred.probabilities.numpy()
    assert m["accuracy"] == pytest.approx((p.argmax(1) == y).mean())
    assert m["roc_auc_macro_ovr"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-4)
    assert np.array_equal(np.array(m["confusion_matrix"]), confusion_matrix(y, p.argmax(1), labels=range(4)))
    for k, name in enumerate(CLASSES):
        mask = y == k
        assert m["per_class_accuracy"][name] == pytest.approx((p.argmax(1)[mask] == k).mean(), abs=1e-6)
    values = list(m["per_class_accuracy"].values())
    assert values == sorted(values, reverse=True)


def test_bootstrap_interval_covers_the_accuracy_and_shrinks_with_more_images():
    small = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1] * 5)
    large = small.repeat(20)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < 0.7 < hi_s and lo_l < 0.7 < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3
    assert bootstrap_ci(small) == bootstrap_ci(small)  # seeded


def test_absent_class_does_not_break_roc_auc():
    pred = _predictions()
    keep = pred.labels != 3
    partial = Predictions(pred.ids[keep.numpy()], pred.labels[keep], pred.probabilities[keep])
    m = compute_metrics(partial, CLASSES)
    assert 0.5 < m["roc_auc_macro_ovr"] <= 1.0 and "d" not in m["per_class_accuracy"]
