"""The faithfulness metrics as data: which end of the relevance ranking is masked first, what is
read off the model, and over which range of masked fractions the area is taken.

Every metric is read from two series of forward passes per image and map:
- "most": the most relevant pixels are masked first (MoRF: deletion, positive perturbation);
- "least": the least relevant pixels are masked first (LeRF); masking the least relevant fraction f
  is revealing the most relevant 1 - f, so insertion is this series read backwards.

Each metric's curve runs from 0 to its own maximum inclusive (`metric_fractions`): `k` equal steps
with k = ceil(steps * max_fraction), so no step is wider than 1 / steps and the stated range is
always covered (steps=10: deletion and insertion at 0, 10 %, ..., 100 %, positive and negative
perturbation at Chefer et al.'s 0, 10 %, ..., 90 %; steps=5: 0, 20 %, ..., 100 % and 0, 18 %, ..., 90 %).
The forward passes run once on the union of the metrics' fractions (`scoring_fractions`).
Each area is divided by the width of its x range, so every AUC lies in [0, 1] (for positive and
negative perturbation: the mean accuracy over 0 .. 90 %).

Both orders and their gap (`GAPS`): the symmetric relevance gain (SRG; Bluecher et al. 2024,
"Decoupling pixel flipping and occlusion strategy for consistent XAI benchmarks") is the LeRF area
minus the MoRF area of the same quantity on the same fractions: insertion - deletion (the
probability of the explained class) and negative - positive (accuracy). The damage a perturbation
does by itself (out-of-distribution inputs) lowers both areas alike and cancels in the gap, so the
gap measures the ranking; a map that ranks at random scores 0 in expectation, whatever the baseline.
"""

from __future__ import annotations

import math
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


@dataclass(frozen=True)
class Gap:
    """The symmetric relevance gain of one quantity: `least` AUC minus `most` AUC, per image (higher is better)."""

    name: str
    least: str  # the LeRF metric
    most: str  # the MoRF metric
    words: str

    higher_is_better = True
    arrow = "↑"


GAPS: dict[str, Gap] = {
    "srg": Gap("srg", "insertion", "deletion", "probability gap (insertion - deletion)"),
    "srg_accuracy": Gap("srg_accuracy", "negative", "positive", "accuracy gap (negative - positive)"),
}


def metric_fractions(metric: Metric, steps: int) -> torch.Tensor:
    """The masked fractions of `metric`'s curve: 0 .. max_fraction inclusive in k = ceil(steps * max)
    equal steps (float64)."""
    k = max(1, math.ceil(steps * metric.max_fraction - 1e-9))
    return torch.arange(k + 1, dtype=torch.float64) * (metric.max_fraction / k)


def scoring_fractions(metrics: list[Metric], steps: int) -> torch.Tensor:
    """The union of the metrics' fractions and the two end points 0 and 1 (shared by every metric), ascending."""
    values = torch.cat([torch.tensor([0.0, 1.0], dtype=torch.float64)]
                       + [metric_fractions(m, steps) for m in metrics])
    return torch.unique(torch.round(values * 1e9) / 1e9)


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

    def __repr__(self) -> str:
        return f"Curve(images={len(self.auc)}, points={len(self.x)}, auc_mean={mean_text(self.auc)})"


def mean_text(values: torch.Tensor) -> str:
    """The mean of the finite values, to 3 decimals ("nan" when there is none)."""
    values = values.detach().double().cpu()
    finite = values[torch.isfinite(values)]
    return f"{float(finite.mean()):.3f}" if len(finite) else "nan"


def gap_columns(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`columns` (name -> per-image AUCs) with the gaps (`GAPS`) of the metrics present, for the
    predicted class's maps and (`_true`) the true class's where those are there."""
    out = dict(columns)
    for suffix in ("", "_true"):
        for gap in GAPS.values():
            least, most = gap.least + suffix, gap.most + suffix
            if least in columns and most in columns:
                out[gap.name + suffix] = columns[least].double() - columns[most].double()
    return out


def html_table(header: str, frame, max_rows: int = 20) -> str:
    """A notebook's view of a table: one header line (plain text, escaped) over `frame`'s HTML."""
    import html

    return (f"<div><div>{html.escape(header)}</div>"
            f"{frame.to_html(index=False, max_rows=max_rows, float_format=lambda v: f'{v:.4g}')}</div>")


def metric_curve(metric: Metric, fractions: torch.Tensor, series: dict[str, torch.Tensor], steps: int) -> Curve:
    """Read `metric` off the series ("most"/"least" -> [B, F] values on the masked `fractions`, which
    hold `metric_fractions(metric, steps)`)."""
    own = metric_fractions(metric, steps)
    keep = (fractions[:, None] - own[None, :]).abs().amin(1) < 1e-9
    x, values = fractions[keep], series[metric.masked_first][:, keep]
    if metric.revealed_axis:
        x, values = (1 - x).flip(0), values.flip(1)
    span = float(x[-1] - x[0])
    auc = torch.trapezoid(values, x.to(values.dtype), dim=1) / span if span > 0 else values[:, 0].clone()
    return Curve(x=x, values=values, auc=auc)
