"""The paper's claims about concentration, as tests with a verdict in words.

The paper says the ViT's misclassifications "largely stem from a large amount of weight being placed
on a very small part of the image". Concentration is the Gini index of a map
(`xtl.analysis.statistics`), on each model's own explanation method (Grad-CAM for a CNN, transformer
attribution for a ViT: the paper's), of the first test images `xtl explain` stored:

    (a) vit_errors   the ViT's maps are more concentrated on misclassified than on correct images
    (b) cnn_errors   the same for the CNN
    (c) vit_vs_cnn   the ViT's maps are more concentrated than the CNN's on the same images (paired,
                     both maps on one grid: `xtl.analysis.agreement.common_grid`)

Each has the difference of means (in the claimed order), a seeded bootstrap 95 % interval and a
seeded permutation test's two-sided p-value (10,000 relabellings; sign flips for the paired one).

Verdict rule (`verdict`): **supported** when the interval excludes 0 on the claimed side,
**contradicted** when it excludes 0 on the other side, **cannot decide** otherwise (or when a group
has fewer than `MIN_GROUP` maps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from xtl.analysis.statistics import bootstrap_interval, permutation_test

MIN_GROUP = 3


@dataclass(frozen=True)
class Claim:
    key: str
    statement: str
    difference: float  # claimed-larger minus claimed-smaller
    low: float
    high: float
    p_value: float
    n: tuple[int, ...]  # group sizes (one for paired differences)
    verdict: str
    sentence: str

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(low: float, high: float, enough: bool = True) -> str:
    """The rule of the module's docstring, for an interval of (claimed larger - claimed smaller)."""
    if not enough or low != low or high != high:
        return "cannot decide"
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted"
    return "cannot decide"


def _sentence(statement: str, v: str, difference: float, low: float, high: float, p: float, n: tuple[int, ...],
              unit: str) -> str:
    numbers = (f"difference in Gini {difference:+.3f}, 95 % CI [{low:+.3f}, {high:+.3f}], permutation p = {p:.3g}, "
               f"{unit}") if difference == difference else f"{unit}"
    lead = {"supported": "The data support the claim that", "contradicted": "The data contradict the claim that",
            "cannot decide": "The data cannot decide whether"}[v]
    return f"{lead} {statement} ({numbers})."


def group_claim(key: str, statement: str, larger: torch.Tensor, smaller: torch.Tensor, seed: int = 0,
                permutations: int = 10_000) -> Claim:
    """Claim "mean(larger) > mean(smaller)" for two independent groups (NaN values dropped)."""
    larger = torch.as_tensor(larger).double()
    smaller = torch.as_tensor(smaller).double()
    larger, smaller = larger[~torch.isnan(larger)], smaller[~torch.isnan(smaller)]
    n = (len(larger), len(smaller))
    enough = min(n) >= MIN_GROUP
    if min(n) == 0:
        diff = low = high = p = float("nan")
    else:
        diff = float(larger.mean() - smaller.mean())
        lo, hi = bootstrap_interval(larger, smaller, statistic=lambda a, b: a.mean(1) - b.mean(1), seed=seed)
        low, high = float(lo), float(hi)
        p = permutation_test(larger, smaller, permutations=permutations, seed=seed)
    v = verdict(low, high, enough)
    return Claim(key, statement, diff, low, high, p, n, v,
                 _sentence(statement, v, diff, low, high, p, n, f"{n[0]} vs {n[1]} maps"))


def paired_claim(key: str, statement: str, larger: torch.Tensor, smaller: torch.Tensor, seed: int = 0,
                 permutations: int = 10_000) -> Claim:
    """Claim "larger > smaller on average" for paired values (the same images; pairs with a NaN dropped)."""
    d = torch.as_tensor(larger).double() - torch.as_tensor(smaller).double()
    d = d[~torch.isnan(d)]
    n = (len(d),)
    if len(d) == 0:
        diff = low = high = p = float("nan")
    else:
        diff = float(d.mean())
        lo, hi = bootstrap_interval(d, seed=seed)
        low, high = float(lo), float(hi)
        p = permutation_test(d, permutations=permutations, seed=seed)
    v = verdict(low, high, len(d) >= MIN_GROUP)
    return Claim(key, statement, diff, low, high, p, n, v, _sentence(statement, v, diff, low, high, p, n, f"{n[0]} image pairs"))
