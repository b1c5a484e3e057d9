"""Per-map statistics of stored explanation maps, and the two resampling tools every number of
`xtl.analysis` is reported with: a seeded bootstrap interval and a seeded permutation test.

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
PERMUTATIONS = 10_000
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


def bootstrap_interval(*samples: torch.Tensor, statistic: Callable[..., torch.Tensor] | None = None,
                       resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bootstrap interval of `statistic` (default: the mean of the one sample).

    Each sample [n_i, ...] is resampled with replacement on its own (independent groups; pass one
    sample of paired differences for paired data); `statistic(*resampled)` gets [R, n_i, ...] tensors
    and returns [R, ...]. Seeded: the same call gives the same interval. Returns (low, high), each of
    the statistic's trailing shape. NaN rows should be dropped before."""
    statistic = statistic or _mean
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for sample in samples:
        sample = torch.as_tensor(sample).double()
        if len(sample) == 0:
            nan = torch.full(sample.shape[1:], float("nan"), dtype=torch.float64)
            return nan, nan.clone()
        index = torch.randint(len(sample), (resamples, len(sample)), generator=generator)
        drawn.append(sample[index])
    values = statistic(*drawn)
    alpha = (1 - level) / 2
    bounds = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=values.dtype), dim=0)
    return bounds[0], bounds[1]


def permutation_test(a: torch.Tensor, b: torch.Tensor | None = None, permutations: int = PERMUTATIONS,
                     seed: int = 0, chunk: int = 1000) -> float:
    """Two-sided p-value of "mean(a) - mean(b) is 0" by relabelling (a, b independent groups), or,
    with `b` None, of "mean(a) is 0" for paired differences `a` by flipping their signs. Seeded,
    `permutations` draws in batches of `chunk`; p = (1 + #as extreme) / (1 + permutations)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.as_tensor(a).double().flatten()
    if b is None:
        if len(a) == 0:
            return float("nan")
        observed = a.mean().abs()
        extreme = 0
        for start in range(0, permutations, chunk):
            m = min(chunk, permutations - start)
            signs = torch.randint(0, 2, (m, len(a)), generator=generator).double() * 2 - 1
            extreme += int(((signs * a).mean(1).abs() >= observed - 1e-12).sum())
        return (1 + extreme) / (1 + permutations)
    b = torch.as_tensor(b).double().flatten()
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    pooled = torch.cat([a, b])
    observed = (a.mean() - b.mean()).abs()
    extreme = 0
    for start in range(0, permutations, chunk):
        m = min(chunk, permutations - start)
        order = torch.rand(m, len(pooled), generator=generator).argsort(1)
        shuffled = pooled[order]
        diff = shuffled[:, :len(a)].mean(1) - shuffled[:, len(a):].mean(1)
        extreme += int((diff.abs() >= observed - 1e-12).sum())
    return (1 + extreme) / (1 + permutations)


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
