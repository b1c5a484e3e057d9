"""The paper's claims about concentration, as tests with a verdict in words.

The paper says the ViT's misclassifications "largely stem from a large amount of weight being placed
on a very small part of the image". Concentration is the Gini index of a map's positive part
(`xtl.analysis.statistics`), every map first brought to one grid (`to_grid`: the run's common grid,
the faithfulness protocol's, fixed before any result), so that a 4 x 4 CAM and a pixel map are read
on one scale:

    (a) vit_errors   the ViT's maps are more concentrated on misclassified than on correct images
    (b) cnn_errors   the same for the CNN
    (c) vit_vs_cnn   the ViT's maps are more concentrated than the CNN's on the same images (paired)

A claim is about a *model*, so it is tested with every method it can be, one test per method
(`MethodTest`): for (c) every method stored for both models (the same method on both, never one
model's method against another's: each model's own method is shown as a secondary row, outside the
verdict); for (a) and (b) every method stored for the model, the difference taken within bins of the
model's confidence (`stratified_difference`), so that "errors are more concentrated" is not "low
confidence is more concentrated" (the plain difference is shown beside it).

Each test has the difference of means (in the claimed order), a seeded bootstrap 95 % interval and the
two-sided p-value of the *same* resamples (`xtl.statistics`: `RESAMPLES` resamples of the images, of
each group within each bin, or of the paired differences). The p-values of the methods that pass the
sanity checks (`xtl.analysis.sanity`) are Holm-corrected together (`holm`).

Verdict rule (`verdict`), one for every test: **supported** when the interval excludes 0 on the
claimed side and p < 0.05, **contradicted** when both say the other side, **cannot decide** when they
do not agree, when neither excludes 0, or when a group has fewer than `MIN_GROUP` maps. A claim
(`combine`) is supported (contradicted) when every method that passes the sanity checks is, with its
Holm-corrected p; it cannot decide when no method passes them, or when the methods disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from xtl.analysis.statistics import bootstrap_test
from xtl.statistics import bootstrap_p, percentile_interval

MIN_GROUP = 3
RESAMPLES = 10_000
ALPHA = 0.05
CONFIDENCE_BINS = 5  # quantile bins of the top-1 probability, fixed before any result


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
    methods: list[dict] = field(default_factory=list)  # one MethodTest row per method (`combine`)
    grid: int | None = None  # cells a side every map was read on
    seeds: list[dict] = field(default_factory=list)  # the claim's verdict per fine-tuning seed (`over_seeds`)

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


# ------------------------------------------------------------------------------ one claim, many methods


def to_grid(raw: torch.Tensor, cells: int | None) -> torch.Tensor:
    """Maps [B, h, w] (positive part) on `cells` x `cells`: area averages of a finer map, bilinear
    values of a coarser one (as a CAM is drawn over its image); None keeps the map's own grid."""
    m = torch.as_tensor(raw).double().clamp(min=0)
    if cells is None or tuple(m.shape[-2:]) == (cells, cells):
        return m
    if m.shape[-2] >= cells and m.shape[-1] >= cells:
        return F.adaptive_avg_pool2d(m[:, None], cells)[:, 0]
    return F.interpolate(m[:, None], size=(cells, cells), mode="bilinear", align_corners=False)[:, 0].clamp(min=0)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the given order; NaN stays NaN and is not
    counted among the hypotheses. Equals `statsmodels.stats.multitest.multipletests(p, method="holm")`."""
    known = [(p, k) for k, p in enumerate(p_values) if p == p]
    out = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, k) in enumerate(sorted(known)):
        running = max(running, min(1.0, (len(known) - rank) * p))
        out[k] = running
    return out


def confidence_bins(confidence: torch.Tensor, bins: int = CONFIDENCE_BINS) -> torch.Tensor:
    """The quantile bin (0 .. bins - 1) of each image's top-1 probability among the images given."""
    c = torch.as_tensor(confidence).double()
    if len(c) == 0:
        return torch.zeros(0, dtype=torch.long)
    edges = torch.quantile(c, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    return torch.bucketize(c, edges, right=True)


def stratified_difference(values: torch.Tensor, errors: torch.Tensor, strata: torch.Tensor, seed: int = 0,
                          resamples: int = RESAMPLES) -> tuple[float, float, float, float, tuple[int, int], int]:
    """mean(errors) - mean(correct) within each stratum, averaged with the weights n_e n_c / (n_e + n_c)
    (the Cochran-Mantel-Haenszel weights of a difference of means); strata with fewer than `MIN_GROUP`
    maps in a group are left out. Interval and p-value from the same stratified bootstrap (each group of
    each stratum resampled on its own). Returns (difference, low, high, p, (errors, correct) used,
    strata used); NaN where no stratum has both groups."""
    v = torch.as_tensor(values).double()
    e = torch.as_tensor(errors).bool()
    s = torch.as_tensor(strata).long()
    keep = ~torch.isnan(v)
    v, e, s = v[keep], e[keep], s[keep]
    generator = torch.Generator().manual_seed(seed)
    point, drawn, weights, used = [], [], [], [0, 0]
    for stratum in torch.unique(s).tolist():
        a, b = v[(s == stratum) & e], v[(s == stratum) & ~e]
        if min(len(a), len(b)) < MIN_GROUP:
            continue
        weights.append(len(a) * len(b) / (len(a) + len(b)))
        point.append(float(a.mean() - b.mean()))
        ra = a[torch.randint(len(a), (resamples, len(a)), generator=generator)].mean(1)
        rb = b[torch.randint(len(b), (resamples, len(b)), generator=generator)].mean(1)
        drawn.append(ra - rb)
        used[0] += len(a)
        used[1] += len(b)
    if not weights:
        nan = float("nan")
        return nan, nan, nan, nan, (0, 0), 0
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    difference = float((w * torch.tensor(point, dtype=torch.float64)).sum())
    resampled = (torch.stack(drawn, 1) * w).sum(1)
    low, high = percentile_interval(resampled)
    return difference, float(low), float(high), float(bootstrap_p(resampled)), (used[0], used[1]), len(weights)


def over_seeds(claim: Claim, seeds: dict[int, Claim | None]) -> Claim:
    """The claim of the primary seed (`claim`) judged with the same claim of every seed (`seeds`, the
    primary first; None where a seed's maps cannot test it): the verdict stands only where every seed
    gives it; otherwise it is "cannot decide", and the sentence says which seed says what."""
    nan = float("nan")
    rows = [{"seed": seed, "verdict": "not tested", "difference": nan, "low": nan, "high": nan, "methods": []}
            if c is None else
            {"seed": seed, "verdict": c.verdict, "difference": c.difference, "low": c.low, "high": c.high,
             "methods": [r["method"] for r in c.methods if r.get("in_verdict")]}
            for seed, c in seeds.items()]
    if len(rows) < 2:
        return replace(claim, seeds=rows)
    verdicts = {r["verdict"] for r in rows}
    listed = ", ".join(str(r["seed"]) for r in rows)
    if len(verdicts) == 1:
        v = claim.verdict
        tail = f" Every fine-tuning seed ({listed}) gives this verdict."
    else:
        v = "cannot decide"
        tail = (" The fine-tuning seeds disagree (" + ", ".join(f"seed {r['seed']} {r['verdict']}" for r in rows)
                + "), so the data cannot decide it.")
    return replace(claim, verdict=v, sentence=claim.sentence + tail, seeds=rows)


def combine(key: str, statement: str, rows: list[dict], grid: int | None, what: str) -> Claim:
    """One claim from its per-method tests. `rows`: dicts with method, difference, low, high, p_value,
    n, sanity ("passes" or why not) and role ("test" or "secondary"). The Holm correction runs over the
    tests whose method passes the sanity checks; each row gets p_holm and its own verdict (from p_holm
    where it is corrected, else from p_value: shown, not used), the claim the module's rule."""
    gated = [r for r in rows if r.get("role", "test") == "test" and r["sanity"] == "passes"]
    for r, p in zip(gated, holm([r["p_value"] for r in gated])):
        r["p_holm"] = p
    for r in rows:
        r.setdefault("p_holm", float("nan"))
        corrected = r["p_holm"] == r["p_holm"]
        r["verdict"] = verdict(r["low"], r["high"], r["p_holm"] if corrected else r["p_value"], r.get("enough", True))
        r["in_verdict"] = corrected
    verdicts = {r["verdict"] for r in gated}
    names = ", ".join(r["method"] for r in gated)
    cells = f"{grid} x {grid} cells" if grid else "each map's own grid"
    excluded = [r for r in rows if r.get("role", "test") == "test" and r["sanity"] != "passes"]
    left_out = ("; left out: " + ", ".join(f"{r['method']} ({r['sanity']})" for r in excluded)) if excluded else ""
    if not gated:
        v = "cannot decide"
        why = "no method that applies passes the sanity checks"
    elif len(verdicts) == 1 and verdicts != {"cannot decide"}:
        v = verdicts.pop()
        why = f"every method that passes the sanity checks agrees: {names}"
    elif verdicts == {"cannot decide"}:
        v = "cannot decide"
        why = f"no method that passes the sanity checks ({names}) decides it"
    else:
        v = "cannot decide"
        why = "the methods disagree: " + ", ".join(f"{r['method']} {r['verdict']}" for r in gated)
    parts = [f"{r['method']} {r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}], Holm p = {r['p_holm']:.3g}"
             for r in gated if r["difference"] == r["difference"]]
    lead = {"supported": "The data support the claim that", "contradicted": "The data contradict the claim that",
            "cannot decide": "The data cannot decide whether"}[v]
    numbers = f"; {'; '.join(parts)}" if parts else ""
    sentence = f"{lead} {statement} ({why}; {what} on {cells}{numbers}{left_out})."
    best = next((r for r in gated if r["difference"] == r["difference"]), None) or (rows[0] if rows else None)
    nan = float("nan")
    summary = (best["difference"], best["low"], best["high"], best["p_holm"] if best["p_holm"] == best["p_holm"] else best["p_value"],
               tuple(best["n"])) if best else (nan, nan, nan, nan, (0,))
    return Claim(key, statement, *summary, v, sentence, methods=rows, grid=grid)
