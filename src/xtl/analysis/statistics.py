"""Per-map statistics of stored explanation maps, and the two resampling tools every number of
`xtl.analysis` is reported with: a seeded bootstrap interval and the p-value of the same resamples.

Every statistic reads a map the same way, whichever method made it: its **positive part** (the
evidence for the explained class; negative cells count as 0, as `xtl.report.artefacts` reads maps),
normalised to sum 1 over the map's own grid (the method's: 4 x 4 Grad-CAM cells, 8 x 8 ViT tokens,
pixels for saliency). A map with no positive mass has no shares: it is *flat* (as is a constant map)
and its statistics are NaN, left out of every aggregate and counted in the flat-map rate.

    gini      Gini index of the shares (`xtl.analysis.metrics.sparseness`, Quantus's Sparseness):
              0 for a uniform map, (n-1)/n for one hot cell
    entropy   -sum p log p / log n: 1 for a uniform map, 0 for one hot cell
    top5      share of the relevance in the 5 % of cells that hold most (at least one cell)
    top10     the same for 10 %
    row, col  centre of mass, cell centres at (i + 0.5) / h, so in [0, 1] (0 = top / left)
    spread    RMS distance of the mass from its centre, in the same units

Concentration numbers depend on the grid (a 4 x 4 map cannot be as sparse as a 224 x 224 one):
compare them within a model and method, or after bringing two maps to one grid (`common_grid`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from xtl.statistics import bootstrap_p, percentile_interval

STATISTICS = ("gini", "entropy", "top5", "top10", "row", "col", "spread")
DESCRIPTIONS = {
    "gini": "Gini index (1 = all relevance in one cell)",
    "entropy": "entropy / log(cells) (1 = uniform)",
    "top5": "share of relevance in the top 5 % of cells",
    "top10": "share of relevance in the top 10 % of cells",
    "row": "centre of mass, row (0 = top)",
    "col": "centre of mass, column (0 = left)",
    "spread": "RMS distance from the centre of mass",
}
RESAMPLES = 2000
LEVEL = 0.95


def relevance_shares(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw maps [B, h, w] -> (shares [B, h, w]: positive part / its sum, NaN where there is no
    positive mass; flat [B]: no positive mass, or every cell equal)."""
    maps = torch.as_tensor(raw).double().clamp(min=0)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, h, w], not {tuple(maps.shape)}")
    flat_view = maps.flatten(1)
    total = flat_view.sum(1)
    empty = ~(total > 0)
    spread = flat_view.amax(1) - flat_view.amin(1)
    flat = empty | (spread <= 1e-12 * flat_view.amax(1).clamp(min=1e-300))
    shares = maps / total.clamp(min=1e-300)[:, None, None]
    shares[empty] = float("nan")
    return shares, flat


def map_statistics(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of the module's docstring for raw maps [B, h, w]: name -> Tensor[B] (float64)."""
    from xtl.analysis.metrics import sparseness

    shares, _ = relevance_shares(raw)
    b, h, w = shares.shape
    n = h * w
    p = shares.flatten(1)
    valid = ~torch.isnan(p[:, 0])
    out: dict[str, torch.Tensor] = {}
    gini = torch.full((b,), float("nan"), dtype=torch.float64)
    if valid.any():
        gini[valid] = torch.as_tensor(sparseness(shares[valid])).double().cpu()
    out["gini"] = gini
    plogp = torch.where(p > 0, p * torch.log(p.clamp(min=1e-300)), torch.zeros_like(p))
    out["entropy"] = (-plogp.sum(1) / math.log(n)) if n > 1 else torch.zeros(b, dtype=torch.float64)
    ordered = p.sort(dim=1, descending=True).values
    for name, q in (("top5", 0.05), ("top10", 0.10)):
        k = max(1, math.ceil(q * n - 1e-9))
        out[name] = ordered[:, :k].sum(1)
    rows = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    cols = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    row = (shares.sum(2) * rows).sum(1)
    col = (shares.sum(1) * cols).sum(1)
    out["row"], out["col"] = row, col
    d2 = (rows[None, :, None] - row[:, None, None]) ** 2 + (cols[None, None, :] - col[:, None, None]) ** 2
    out["spread"] = (shares * d2).flatten(1).sum(1).sqrt()
    for name in out:
        out[name] = torch.where(valid, out[name], torch.full_like(out[name], float("nan")))
    return out


# ---------------------------------------------------------------------------------- resampling


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(1)


def _resampled(samples, statistic, resamples: int, seed: int) -> torch.Tensor | None:
    """`statistic` on `resamples` seeded resamples of the samples (each resampled on its own), or
    None when a sample is empty."""
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for sample in samples:
        sample = torch.as_tensor(sample).double()
        if len(sample) == 0:
            return None
        index = torch.randint(len(sample), (resamples, len(sample)), generator=generator)
        drawn.append(sample[index])
    return (statistic or _mean)(*drawn)


def bootstrap_interval(*samples: torch.Tensor, statistic: Callable[..., torch.Tensor] | None = None,
                       resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval of `statistic` (default: the mean of the one sample).

    Each sample [n_i, ...] is resampled with replacement on its own (independent groups; pass one
    sample of paired differences for paired data); `statistic(*resampled)` gets [R, n_i, ...] tensors
    and returns [R, ...]. Seeded: the same call gives the same interval. Returns (low, high), each of
    the statistic's trailing shape. NaN rows should be dropped before."""
    low, high, _ = bootstrap_test(*samples, statistic=statistic, resamples=resamples, seed=seed, level=level)
    return low, high


def bootstrap_test(*samples: torch.Tensor, statistic: Callable[..., torch.Tensor] | None = None,
                   resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`bootstrap_interval` and the two-sided p-value of "the statistic is 0" from the *same*
    resamples (`xtl.statistics.bootstrap_p`): (low, high, p). The interval excludes 0 exactly when
    p is below 1 - level (to 1 / (resamples + 1)), so a verdict reading both never sees them disagree."""
    values = _resampled(samples, statistic, resamples, seed)
    if values is None:
        shape = torch.as_tensor(samples[0]).shape[1:]
        nan = torch.full(shape, float("nan"), dtype=torch.float64)
        return nan, nan.clone(), nan.clone()
    low, high = percentile_interval(values, level)
    return low, high, bootstrap_p(values)


def mean_interval(values: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """{mean, low, high, n} of the non-NaN `values` [n], the interval a seeded bootstrap one."""
    return summarise({"value": torch.as_tensor(values).double().flatten()}, seed)["value"]


def summarise(stats: dict[str, torch.Tensor], seed: int = 0) -> dict[str, dict[str, float]]:
    """Each statistic's mean with its bootstrap 95 % interval: name -> {mean, low, high, n}; the
    images (rows with a NaN in any statistic left out) resampled once for all statistics."""
    names = list(stats)
    table = torch.stack([torch.as_tensor(stats[k]).double().flatten() for k in names], dim=1)
    table = table[~torch.isnan(table).any(1)]
    if len(table) == 0:
        return {k: {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0} for k in names}
    low, high = bootstrap_interval(table, seed=seed)
    mean = table.mean(0)
    return {k: {"mean": float(mean[i]), "low": float(low[i]), "high": float(high[i]), "n": len(table)}
            for i, k in enumerate(names)}
