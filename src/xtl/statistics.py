"""The one reading of bootstrap resamples that every interval and test of xtl shares.

Given the statistic computed on R seeded resamples (of images, paired or in groups), the 95 %
interval is their percentile interval and the two-sided p-value of "the statistic is 0" is
2 min(#{s <= 0} + 1, #{s >= 0} + 1) / (R + 1), capped at 1: the smallest level at which the
percentile interval excludes 0. Both come from the same resamples, so an interval that excludes 0
at 95 % always has p < 0.05 and the reverse (up to the 1 / (R + 1) resolution): a verdict that
reads both can never find them disagreeing. Used by `xtl.faithfulness.paired` and `xtl.analysis`.
"""

from __future__ import annotations

import torch

LEVEL = 0.95


def percentile_interval(resampled: torch.Tensor, level: float = LEVEL) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) of `resampled` [R, ...] along its first axis."""
    alpha = (1 - level) / 2
    values = torch.as_tensor(resampled, dtype=torch.float64)
    bounds = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=torch.float64), dim=0)
    return bounds[0], bounds[1]


def bootstrap_p(resampled: torch.Tensor) -> torch.Tensor:
    """Two-sided bootstrap p-value of "0" per trailing index of `resampled` [R, ...] (module docstring)."""
    values = torch.as_tensor(resampled, dtype=torch.float64)
    below, above = (values <= 0).sum(0), (values >= 0).sum(0)
    return (2 * (torch.minimum(below, above) + 1) / (values.shape[0] + 1)).clamp(max=1.0)
