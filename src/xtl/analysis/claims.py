"""The paper's claims about concentration, as tests with a verdict in words.

The paper says the ViT's misclassifications "largely stem from a large amount of weight being placed
on a very small part of the image". Concentration is the Gini index of a map
(`xtl.analysis.statistics`), on each model's own explanation method (Grad-CAM for a CNN, transformer
attribution for a ViT: the paper's), of the first test images `xtl explain` stored:

    (a) vit_errors   the ViT's maps are more concentrated on misclassified than on correct images
    (b) cnn_errors   the same for the CNN
    (c) vit_vs_cnn   the ViT's maps are more concentrated than the CNN's on the same images (paired,
                     both maps on one grid: `xtl.analysis.agreement.common_grid`)

Each has the difference of means (in the claimed order), a seeded bootstrap 95 % interval and the
two-sided p-value of the *same* resamples (`xtl.statistics`: 10,000 resamples of the images, each
group on its own, or of the paired differences for the paired claim).

Verdict rule (`verdict`), one for every claim: **supported** when the interval excludes 0 on the
claimed side and p < 0.05, **contradicted** when both say the other side, **cannot decide** when
they do not agree (which the shared resamples make a matter of rounding), when neither excludes 0,
or when a group has fewer than `MIN_GROUP` maps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from xtl.analysis.statistics import bootstrap_test

MIN_GROUP = 3
RESAMPLES = 10_000
ALPHA = 0.05


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


def verdict(low: float, high: float, p: float, enough: bool = True) -> str:
    """The rule of the module's docstring, for an interval of (claimed larger - claimed smaller) and
    the p-value of the same resamples."""
    if not enough or low != low or high != high or not p < ALPHA:
        return "cannot decide"
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted"
    return "cannot decide"


def _sentence(statement: str, v: str, difference: float, low: float, high: float, p: float, n: tuple[int, ...],
              unit: str) -> str:
    numbers = (f"difference in Gini {difference:+.3f}, 95 % CI [{low:+.3f}, {high:+.3f}], bootstrap p = {p:.3g}, "
               f"{unit}") if difference == difference else f"{unit}"
    lead = {"supported": "The data support the claim that", "contradicted": "The data contradict the claim that",
            "cannot decide": "The data cannot decide whether"}[v]
    return f"{lead} {statement} ({numbers})."


def group_claim(key: str, statement: str, larger: torch.Tensor, smaller: torch.Tensor, seed: int = 0,
                resamples: int = RESAMPLES) -> Claim:
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
        lo, hi, pv = bootstrap_test(larger, smaller, statistic=lambda a, b: a.mean(1) - b.mean(1), seed=seed,
                                    resamples=resamples)
        low, high, p = float(lo), float(hi), float(pv)
    v = verdict(low, high, p, enough)
    return Claim(key, statement, diff, low, high, p, n, v,
                 _sentence(statement, v, diff, low, high, p, n, f"{n[0]} vs {n[1]} maps"))


def paired_claim(key: str, statement: str, larger: torch.Tensor, smaller: torch.Tensor, seed: int = 0,
                 resamples: int = RESAMPLES) -> Claim:
    """Claim "larger > smaller on average" for paired values (the same images; pairs with a NaN dropped)."""
    d = torch.as_tensor(larger).double() - torch.as_tensor(smaller).double()
    d = d[~torch.isnan(d)]
    n = (len(d),)
    if len(d) == 0:
        diff = low = high = p = float("nan")
    else:
        diff = float(d.mean())
        lo, hi, pv = bootstrap_test(d, seed=seed, resamples=resamples)
        low, high, p = float(lo), float(hi), float(pv)
    v = verdict(low, high, p, len(d) >= MIN_GROUP)
    return Claim(key, statement, diff, low, high, p, n, v, _sentence(statement, v, diff, low, high, p, n, f"{n[0]} image pairs"))
