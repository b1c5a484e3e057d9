"""Issue 25: claims about models tested per method, within confidence bins, gated by sanity checks
(xtl.analysis.claims, xtl.analysis.sanity), with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xtl.analysis.claims import (combine, confidence_bins, group_claim, holm, over_seeds, stratified_difference,
                                 to_grid)
from xtl.analysis.sanity import DEPENDS, MIN_IMAGES, class_sensitivity, data_randomisation, status


def test_holm_by_hand_and_nan_is_not_a_hypothesis():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.02, float("nan"), 0.5])
    assert out[0] == pytest.approx(0.04) and out[1] != out[1] and out[2] == pytest.approx(0.5)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1


def test_to_grid_averages_finer_maps_and_interpolates_coarser_ones():
    fine = torch.arange(64.0).reshape(1, 8, 8)
    pooled = to_grid(fine, 4)
    assert pooled.shape == (1, 4, 4) and pooled[0, 0, 0] == pytest.approx((0 + 1 + 8 + 9) / 4)
    flat = to_grid(torch.full((2, 4, 4), 0.5), 32)
    assert flat.shape == (2, 32, 32) and torch.allclose(flat, torch.full_like(flat, 0.5))
    assert (to_grid(torch.tensor([[[-1.0, 2.0], [3.0, -4.0]]]), None) >= 0).all()  # the positive part


def _confounded(seed: int, effect: float):
    """Gini that rises as confidence falls; errors are the low-confidence images; `effect` is added to
    the errors' Gini on top of what their confidence explains."""
    g = torch.Generator().manual_seed(seed)
    n = 2000
    confidence = torch.rand(n, generator=g, dtype=torch.float64)
    wrong = torch.rand(n, generator=g, dtype=torch.float64) > confidence  # errors mostly at low confidence
    gini = 0.8 - 0.5 * confidence + 0.02 * torch.randn(n, generator=g, dtype=torch.float64) + effect * wrong
    return gini, wrong, confidence


def test_confidence_bins_take_away_what_confidence_explains():
    gini, wrong, confidence = _confounded(0, effect=0.0)
    plain = group_claim("x", "errors are more concentrated", gini[wrong], gini[~wrong])
    assert plain.verdict == "supported" and plain.difference > 0.1  # confidence alone makes it "supported"
    d, low, high, p, n, strata = stratified_difference(gini, wrong, confidence_bins(confidence), resamples=2000)
    assert strata == 5 and sum(n) == len(gini)
    # within a bin the residual confounding is what a fifth of the confidence range leaves: far below 0.1
    assert abs(d) < 0.03 and d < plain.difference / 4

    gini, wrong, confidence = _confounded(1, effect=0.05)
    d, low, high, p, n, strata = stratified_difference(gini, wrong, confidence_bins(confidence), resamples=2000)
    assert low > 0.03 and p < 0.01  # a real difference within the bins is found


def test_strata_without_both_groups_are_left_out():
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9, 0.8])
    errors = torch.tensor([True, True, True, False, False, False, False, False])
    strata = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])  # stratum 1 has no errors
    d, low, high, p, n, used = stratified_difference(values, errors, strata, resamples=500)
    assert used == 1 and n == (3, 3) and d == pytest.approx(0.2 - 0.5)
    nothing = stratified_difference(values[6:], errors[6:], strata[6:], resamples=10)
    assert nothing[0] != nothing[0] and nothing[5] == 0


def _row(method, low, high, p, sanity="passes", role="test"):
    return {"method": method, "role": role, "difference": (low + high) / 2, "low": low, "high": high, "p_value": p,
            "n": [100], "sanity": sanity}


def test_a_claim_is_supported_only_when_every_method_that_passes_agrees_after_holm():
    agree = combine("k", "A beats B", [_row("a", 0.1, 0.3, 0.001), _row("b", 0.05, 0.2, 0.002),
                                        _row("c", -0.3, -0.1, 0.001, sanity="fails class sensitivity (...)")], 32, "paired")
    assert agree.verdict == "supported"
    assert [r["in_verdict"] for r in agree.methods] == [True, True, False]
    assert [r["p_holm"] for r in agree.methods[:2]] == pytest.approx([0.002, 0.002]) and "left out: c (fails class sensitivity" in agree.sentence
    disagree = combine("k", "A beats B", [_row("a", 0.1, 0.3, 0.001), _row("b", -0.2, -0.05, 0.001)], 32, "paired")
    assert disagree.verdict == "cannot decide" and "the methods disagree" in disagree.sentence
    # each p < 0.05 alone, but not after Holm over three methods: no verdict
    weak = combine("k", "A beats B", [_row("a", 0.01, 0.3, 0.03), _row("b", 0.01, 0.2, 0.04),
                                       _row("c", 0.01, 0.2, 0.045)], 32, "paired")
    assert weak.verdict == "cannot decide" and all(r["verdict"] == "cannot decide" for r in weak.methods)
    unchecked = combine("k", "A beats B", [_row("a", 0.1, 0.3, 0.001, sanity="not checked on 64 images (8)"),
                                            _row("own", 0.1, 0.3, 0.001, role="secondary")], 32, "paired")
    assert unchecked.verdict == "cannot decide" and "no method that applies passes" in unchecked.sentence
    assert unchecked.methods[1]["verdict"] == "supported" and not unchecked.methods[1]["in_verdict"]
    contradicted = combine("k", "A beats B", [_row("a", -0.3, -0.1, 0.001)], None, "paired")
    assert contradicted.verdict == "contradicted" and "each map's own grid" in contradicted.sentence


def test_a_verdict_stands_only_where_every_seed_gives_it():
    rows = lambda low, high: [_row("a", low, high, 0.001), _row("b", low, high, 0.002)]  # noqa: E731
    primary = combine("k", "A beats B", rows(0.1, 0.3), 32, "paired")
    same = combine("k", "A beats B", rows(0.05, 0.2), 32, "paired")
    weak = combine("k", "A beats B", rows(-0.05, 0.2), 32, "paired")
    held = over_seeds(primary, {0: primary, 1: same, 2: same})
    assert held.verdict == "supported" and "Every fine-tuning seed (0, 1, 2) gives this verdict" in held.sentence
    assert [r["seed"] for r in held.seeds] == [0, 1, 2] and held.seeds[0]["methods"] == ["a", "b"]
    split = over_seeds(primary, {0: primary, 1: weak, 2: None})
    assert split.verdict == "cannot decide"
    assert "seed 0 supported, seed 1 cannot decide, seed 2 not tested" in split.sentence
    alone = over_seeds(primary, {0: primary})
    assert alone.verdict == "supported" and alone.sentence == primary.sentence and len(alone.seeds) == 1


# ------------------------------------------------------------------------------ sanity checks


class _Linear(nn.Module):
    """Logits W x on 2 x 4 x 4 inputs' first channel; `shared`: every class looks at the same pixels."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16, 3, bias=False)
        w = torch.zeros(3, 3, 4, 4)
        g = torch.Generator().manual_seed(0)
        if shared:
            pattern = torch.rand(4, 4, generator=g) + 0.5
            for k in range(3):
                w[k, 0] = (k + 1) * pattern
        else:
            for k in range(3):  # class k: its own rows of pixels, with ranked weights
                w[k, 0, k] = torch.arange(1.0, 5.0)
                w[k, 0, (k + 1) % 4] = 0.01 * torch.rand(4, generator=g)
        self.fc.weight.data = w.flatten(1)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("shared", [True, False])
def test_class_sensitivity_knows_a_class_blind_map_from_a_class_specific_one(shared):
    model = _Linear(shared).eval()
    images = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1)) + 0.1
    probabilities = torch.tensor([[0.7, 0.2, 0.1]] * 6)  # most likely class 0, least likely 2
    values = class_sensitivity(model, None, images, probabilities, "saliency")
    assert values.shape == (6,)
    if shared:  # |gradient| of every class is the same pattern, scaled: rank correlation 1
        assert torch.allclose(values, torch.ones(6, dtype=torch.float64))
    else:
        assert (values < DEPENDS).all()


def test_a_map_constant_for_one_class_shares_no_ranking_with_the_other():
    class Gate(nn.Module):  # class 1's logit is a constant: its saliency map is all zeros
        def forward(self, x):
            s = x.flatten(1)
            return torch.stack([(s * torch.arange(s.shape[1])).sum(1), torch.zeros(len(x))], 1)

    images = torch.rand(3, 3, 4, 4)
    values = class_sensitivity(Gate(), None, images, torch.tensor([[0.9, 0.1]] * 3), "saliency")
    assert torch.equal(values, torch.zeros(3, dtype=torch.float64))


def test_status_names_why_a_method_cannot_gate():
    full = {"spearman": 0.1, "n": MIN_IMAGES, "complete": True, "undefined": 0}
    sensitive = {"mean": 0.2, "n": MIN_IMAGES}
    assert status(full, sensitive) == "passes"
    assert status(full, {"mean": 0.9, "n": MIN_IMAGES}).startswith("fails class sensitivity (Spearman 0.90")
    assert status({**full, "spearman": 0.7}, sensitive).startswith("fails randomisation (Spearman 0.70")
    assert status({**full, "complete": False}, sensitive) == "not checked (randomisation stopped before the input)"
    assert status({**full, "n": 8}, sensitive) == f"not checked on {MIN_IMAGES} images (8)"
    assert status(None, sensitive) == "not checked (randomisation)"
    # every randomised map constant (nothing left): the map depends on the weights
    assert status({**full, "spearman": float("nan"), "undefined": MIN_IMAGES}, sensitive) == "passes"


def test_data_randomisation_tells_a_model_that_learnt_from_one_that_did_not():
    """The same model against itself correlates at 1 (fails); against a model looking at other pixels
    the maps share little ranking; status gates on it only where it ran."""
    torch.manual_seed(0)
    x = torch.rand(8, 3, 4, 4)
    trained, other = _Linear(shared=False), _Linear(shared=True)
    targets = torch.zeros(8, dtype=torch.long)
    same = data_randomisation(trained, trained, None, x, targets, "saliency")
    assert torch.allclose(same, torch.ones(8, dtype=same.dtype))
    apart = data_randomisation(trained, other, None, x, targets, "saliency")
    assert apart.mean() < DEPENDS
    good = {"spearman": 0.1, "n": MIN_IMAGES, "complete": True}
    sensitive = {"mean": 0.1, "n": MIN_IMAGES}
    assert status(good, sensitive) == "passes"  # not run: the other two checks decide
    assert status(good, sensitive, data={"mean": 0.2, "n": MIN_IMAGES}) == "passes"
    assert status(good, sensitive, data={"mean": 0.9, "n": MIN_IMAGES}).startswith("fails data randomisation (Spearman 0.90")
    assert "data randomisation" in status(good, sensitive, data={"mean": 0.1, "n": 8})
