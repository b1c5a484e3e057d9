"""The faithfulness metrics as data: which end of the relevance ranking is masked first, what is
read off the model, and over which range of masked fractions the area is taken.

Every metric is read from two series of forward passes per image and map, on one grid of
masked fractions 0, 1/k, ..., 1:
- "most": the most relevant pixels are masked first (deletion, positive perturbation);
- "least": the least relevant pixels are masked first; masking the least relevant fraction f is
  revealing the most relevant 1 - f, so insertion is this series read backwards.
With steps=10 positive and negative perturbation use Chefer et al.'s fractions 0, 10 %, ..., 90 %.
Each area is divided by the width of its x range, so every AUC lies in [0, 1] (for positive and
negative perturbation: the mean accuracy over 0 .. 90 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from xtl.errors import XtlError


@dataclass(frozen=True)
class Metric:
    name: str
    masked_first: Literal["most", "least"]
    quantity: Literal["probability", "accuracy"]  # softmax of the explained class, or argmax == true label
    max_fraction: float  # the curve runs over masked fractions 0 .. max_fraction
    revealed_axis: bool  # the x axis is the fraction revealed (insertion), not masked
    higher_is_better: bool
    source: str

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


register_metric(Metric("deletion", "most", "probability", 1.0, False, False, "Petsiuk et al. 2018"))
register_metric(Metric("insertion", "least", "probability", 1.0, True, True, "Petsiuk et al. 2018"))
register_metric(Metric("positive", "most", "accuracy", 0.9, False, False, "Chefer et al. 2021"))
register_metric(Metric("negative", "least", "accuracy", 0.9, False, True, "Chefer et al. 2021"))


def get_metrics(names: list[str] | tuple[str, ...] | None) -> list[Metric]:
    names = list(names) if names else list(METRICS)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise XtlError(f"unknown faithfulness metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    return [METRICS[n] for n in names]


@dataclass
class Curve:
    """One metric for a batch of images: per-image curves and their normalised areas."""

    x: torch.Tensor  # [F] ascending fraction masked (revealed, for insertion)
    values: torch.Tensor  # [B, F] probability of the explained class, or 1/0 for a correct prediction
    auc: torch.Tensor  # [B] area under the curve divided by the x range: in [0, 1] for every metric


def metric_curve(metric: Metric, fractions: torch.Tensor, series: dict[str, torch.Tensor]) -> Curve:
    """Read `metric` off the series ("most"/"least" -> [B, F] values on the masked `fractions`)."""
    keep = fractions <= metric.max_fraction + 1e-9
    x, values = fractions[keep], series[metric.masked_first][:, keep]
    if metric.revealed_axis:
        x, values = (1 - x).flip(0), values.flip(1)
    span = float(x[-1] - x[0])
    auc = torch.trapezoid(values, x.to(values.dtype), dim=1) / span if span > 0 else values[:, 0].clone()
    return Curve(x=x, values=values, auc=auc)
