"""xtl.analysis.metrics equals Quantus 0.6.0 on the same inputs and maps.

Real data: 8 CIFAR-10 test images, a timm ResNet-18 (random init, 10 classes, 32 px), saliency and
Grad-CAM maps from `xtl.explain`, and a box mask per image (a different place for each).
Tolerances, each the float32 rounding Quantus works in (xtl sums in float64):
- pointing game, effective complexity: identical;
- relevance mass / rank accuracy, sparseness: 1e-6 absolute;
- max-sensitivity, local Lipschitz estimate: 1e-4 relative (the same noise handed to both);
- MPRT (Spearman per layer, all 41 randomisable modules of the ResNet-18, top-down): 1e-6 absolute, layer names identical;
- pixel flipping: 1e-5 absolute (the same forward passes, batched differently).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import cifar_resnet18
from xtl.analysis import metrics as M
from xtl.explain import explain

quantus = pytest.importorskip("quantus")


@pytest.fixture(scope="module")
def setup(cifar):
    model, spec, images, _ = cifar_resnet18(cifar, n_per_class=2)
    targets = model(images).argmax(dim=1).detach()
    saliency = explain(model, images, targets, "saliency", spec=spec).maps
    # a little seeded jitter makes every value distinct (Quantus orders with NumPy's unstable
    # argsort); divided by its max, each map peaks at exactly 1, so Quantus's max-scaling is a no-op
    saliency = saliency + 1e-3 * torch.rand(saliency.shape, generator=torch.Generator().manual_seed(0))
    saliency = saliency / saliency.amax(dim=(1, 2), keepdim=True)
    masks = torch.zeros_like(saliency, dtype=torch.bool)
    for i in range(len(masks)):  # boxes of different sizes at different places
        top, left = 2 + 3 * i, 20 - 2 * i
        masks[i, top:top + 8 + i, left:left + 10] = True
    return model, spec, images, targets, saliency, masks


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _quantus(metric, setup, maps=None, **call):
    model, _, images, targets, saliency, masks = setup
    maps = saliency if maps is None else maps
    return np.asarray(metric(model=model, x_batch=_np(images), y_batch=_np(targets), a_batch=_np(maps[:, None]),
                             s_batch=_np(masks[:, None]).astype(np.float32), device="cpu", **call), dtype=np.float64)


def test_maps_are_tie_free_so_orderings_agree(setup):
    saliency = setup[4]
    assert all(len(torch.unique(m)) == m.numel() for m in saliency)


def test_pointing_game(setup):
    expected = _quantus(quantus.PointingGame(disable_warnings=True), setup)
    got = M.pointing_game(setup[4], setup[5])
    assert got.tolist() == expected.astype(bool).tolist()


def test_pointing_game_on_a_signed_map(setup):
    signed = setup[4] - 0.6  # mostly negative relevance: the maximum still decides
    expected = _quantus(quantus.PointingGame(disable_warnings=True), setup, maps=signed)
    assert M.pointing_game(signed, setup[5]).tolist() == expected.astype(bool).tolist()


@pytest.mark.parametrize("shift", [0.0, -0.3])  # -0.3: signed relevance, Quantus keeps the sign
def test_relevance_mass_and_rank_accuracy(setup, shift):
    maps = setup[4] + shift
    mass = _quantus(quantus.RelevanceMassAccuracy(disable_warnings=True), setup, maps=maps)
    rank = _quantus(quantus.RelevanceRankAccuracy(disable_warnings=True), setup, maps=maps)
    np.testing.assert_allclose(_np(M.relevance_mass_accuracy(maps, setup[5])), mass, atol=1e-6, rtol=0)
    np.testing.assert_allclose(_np(M.relevance_rank_accuracy(maps, setup[5])), rank, atol=1e-6, rtol=0)
    assert len(set(rank.round(6))) > 2  # the masks differ: the scores are not one value


def test_sparseness_and_effective_complexity(setup):
    saliency = setup[4]
    np.testing.assert_allclose(_np(M.sparseness(saliency)), _quantus(quantus.Sparseness(disable_warnings=True), setup),
                               atol=1e-6, rtol=0)
    for eps in (1e-5, 0.1, 0.5):
        expected = _quantus(quantus.EffectiveComplexity(eps=eps, disable_warnings=True), setup)
        assert M.effective_complexity(saliency, eps=eps).tolist() == expected.astype(int).tolist()


class _Replay:
    """A Quantus perturb_func that adds noise[s] at its s-th call: both sides see the same noise."""

    def __init__(self, noise: torch.Tensor):
        self.noise, self.calls = _np(noise).reshape(noise.shape[0], noise.shape[1], -1), 0

    def __call__(self, arr, indices, **kwargs):
        out = arr + self.noise[self.calls]
        self.calls += 1
        return out


def _explain_fn(model, spec, method):
    def fn(images, targets):
        return explain(model, images, targets, method, spec=spec).maps
    return fn


def _quantus_explain(spec, method):
    def fn(model, inputs, targets, **kwargs):
        return _np(explain(model, torch.as_tensor(inputs), torch.as_tensor(targets).long(), method, spec=spec).maps[:, None])
    return fn


@pytest.mark.parametrize("name", ["max_sensitivity", "local_lipschitz_estimate"])
def test_robustness(setup, name):
    model, spec, images, targets, saliency, _ = setup
    n = 4
    generator = torch.Generator().manual_seed(1)
    if name == "max_sensitivity":
        noise = (torch.rand((n, *images.shape), generator=generator) * 2 - 1) * 0.2
        got = M.max_sensitivity(_explain_fn(model, spec, "saliency"), images, targets, n_samples=n, noise=noise)
        metric = quantus.MaxSensitivity(nr_samples=n, perturb_func=_Replay(noise), disable_warnings=True)
    else:
        noise = torch.randn((n, *images.shape), generator=generator) * 0.1
        got = M.local_lipschitz_estimate(_explain_fn(model, spec, "saliency"), images, targets, n_samples=n, noise=noise)
        metric = quantus.LocalLipschitzEstimate(nr_samples=n, perturb_func=_Replay(noise), disable_warnings=True)
    plain = _explain_fn(model, spec, "saliency")(images, targets)  # the map of the unperturbed images
    expected = _quantus(metric, setup, maps=plain, explain_func=_quantus_explain(spec, "saliency"),
                        batch_size=len(images))
    np.testing.assert_allclose(_np(got), expected, rtol=1e-4, atol=0)
    assert (expected > 0).all()


@pytest.mark.parametrize("order", ["cascading", "independent"])
def test_model_parameter_randomisation(setup, order):
    model, spec, images, targets, _, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = M.randomisation_similarity(model, spec, images, targets, "saliency", layers=order, seed=42)
    metric = quantus.MPRT(layer_order="top_down" if order == "cascading" else "independent", seed=42,
                          disable_warnings=True)
    model_q, _, images_q, targets_q, _, _ = setup
    expected = metric(model=model_q, x_batch=_np(images_q), y_batch=_np(targets_q), a_batch=None, device="cpu",
                      explain_func=_quantus_explain(spec, "saliency"))
    expected.pop("original")
    order_q = list(expected) if order == "cascading" else list(expected)[::-1]  # Quantus: independent bottom-up
    assert [name for name, _ in got] == order_q
    for name, scores in got:
        np.testing.assert_allclose(_np(scores), np.asarray(expected[name]), atol=1e-6, rtol=0, err_msg=name)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_pixel_flipping(setup):
    model, _, images, targets, saliency, _ = setup
    steps = 16
    # Quantus counts channel values as features and wants features_in_step to divide H*W: with
    # H*W/steps features per step, every third of its steps masks whole pixels, as xtl's steps do
    metric = quantus.PixelFlipping(features_in_step=32 * 32 // steps, perturb_baseline="black",
                                   disable_warnings=True)
    expected = _quantus(metric, setup)
    assert expected.shape == (len(images), 3 * steps)
    expected = expected[:, 2::3]
    got = M.pixel_flipping(model, images, targets, saliency, steps=steps)
    assert got.shape == (len(images), steps)
    np.testing.assert_allclose(_np(got), expected, atol=1e-5, rtol=0)
