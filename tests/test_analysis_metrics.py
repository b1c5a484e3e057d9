"""xtl.analysis.metrics on known answers and real CIFAR images (agreement with Quantus itself:
tests/test_quantus_agreement.py)."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from helpers import cifar_resnet18
from xtl.analysis import metrics as M
from xtl.errors import XtlError
from xtl.explain import explain
from xtl.models import build_model


@pytest.fixture(scope="module")
def resnet(cifar):
    return cifar_resnet18(cifar, n_per_class=1)


def _box(shape=(2, 6, 6), rows=slice(1, 3), cols=slice(1, 3)) -> torch.Tensor:
    masks = torch.zeros(shape, dtype=torch.bool)
    masks[:, rows, cols] = True
    return masks


def test_pointing_game_hits_when_any_tied_maximum_is_inside():
    maps = torch.zeros(3, 6, 6)
    maps[0, 1, 1] = 1.0  # the peak inside the box
    maps[1, 5, 5] = 1.0  # the peak outside
    maps[2, 5, 5] = maps[2, 2, 2] = 1.0  # two tied peaks, one inside: a hit, as in Quantus
    assert M.pointing_game(maps, _box((3, 6, 6))).tolist() == [True, False, True]


def test_pointing_game_empty_mask_is_a_miss():
    maps = torch.rand(1, 6, 6)
    assert M.pointing_game(maps, torch.zeros(1, 6, 6, dtype=torch.bool)).tolist() == [False]


def test_relevance_mass_accuracy_keeps_the_sign_of_negative_relevance():
    maps = torch.zeros(2, 6, 6)
    maps[0, 1, 1], maps[0, 4, 4] = 3.0, 1.0  # 3 of 4 inside
    maps[1, 1, 1], maps[1, 4, 4] = 2.0, -1.0  # negative outside: inside 2, total 1
    assert M.relevance_mass_accuracy(maps, _box()).tolist() == [0.75, 2.0]


def test_relevance_mass_accuracy_is_nan_for_a_flat_zero_map_or_empty_mask():
    scores = M.relevance_mass_accuracy(torch.stack([torch.zeros(6, 6), torch.rand(6, 6)]),
                                       torch.stack([_box((1, 6, 6))[0], torch.zeros(6, 6, dtype=torch.bool)]))
    assert math.isnan(scores[0]) and math.isnan(scores[1])


def test_relevance_rank_accuracy_counts_the_top_k_inside():
    maps = torch.arange(36, dtype=torch.float32).reshape(1, 6, 6).flip(-1).flip(-2).clone()  # top-left highest
    masks = torch.zeros(1, 6, 6, dtype=torch.bool)
    masks[0, 0, :2] = True  # the 2 highest pixels
    assert M.relevance_rank_accuracy(maps, masks).tolist() == [1.0]
    masks[0, 0, 0] = False
    masks[0, 5, 5] = True  # now one of the two is the lowest pixel
    assert M.relevance_rank_accuracy(maps, masks).tolist() == [0.5]


def test_relevance_rank_accuracy_breaks_ties_by_pixel_index():
    maps = torch.zeros(1, 6, 6)  # all tied: the first K pixels in row-major order count as the top K
    masks = torch.zeros(1, 6, 6, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 5, 5] = True
    assert M.relevance_rank_accuracy(maps, masks).tolist() == [0.5]


def test_relevance_rank_accuracy_equals_a_stable_sort_on_maps_full_of_ties():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 4, (20, 8, 8), generator=g).float()  # 4 levels: ties at every boundary
    masks = torch.rand(20, 8, 8, generator=g) < torch.linspace(0.05, 0.9, 20).reshape(-1, 1, 1)
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    k = masks.flatten(1).sum(dim=1)
    expected = [masks.flatten(1)[i, order[i, :k[i]]].float().mean().item() for i in range(20)]
    assert M.relevance_rank_accuracy(maps, masks).tolist() == pytest.approx(expected, abs=1e-7)


def test_sparseness_is_the_gini_index():
    n = 100
    one_peak = torch.zeros(1, 10, 10)
    one_peak[0, 3, 3] = 5.0
    flat = torch.full((1, 10, 10), 0.4)
    assert M.sparseness(one_peak).item() == pytest.approx((n - 1) / n, abs=1e-5)
    assert M.sparseness(flat).item() == pytest.approx(0.0, abs=1e-6)
    maps = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(M.sparseness(maps), M.sparseness(-7 * maps), atol=1e-6)  # |a|, scale-free


def test_effective_complexity_counts_pixels_above_eps_after_scaling_each_map():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, :3] = torch.tensor([1.0, 0.5, 1e-6])  # 1e-6 is under eps
    maps[1, 0, :2] = torch.tensor([-100.0, 0.01])  # scaled by 100: 1 and 1e-4, both over eps
    assert M.effective_complexity(maps).tolist() == [2, 2]
    assert M.effective_complexity(maps, eps=0.2).tolist() == [2, 1]


def test_spearman_equals_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 50), generator=g).float()  # many ties
    b = a + torch.randint(0, 3, (3, 50), generator=g).float()
    got = M.spearman(a, b)
    for i in range(3):
        assert got[i].item() == pytest.approx(scipy.stats.spearmanr(a[i], b[i])[0], abs=1e-12)


class _CountingMean:
    """A linear 'explanation' (the channel mean) that counts its calls and batch sizes."""

    def __init__(self):
        self.sizes = []

    def __call__(self, images, targets):
        assert len(images) == len(targets)
        self.sizes.append(len(images))
        return images.mean(dim=1)


def test_max_sensitivity_of_a_linear_map_and_batched_calls(resnet):
    images = resnet[2]
    targets = torch.zeros(len(images), dtype=torch.long)
    fn = _CountingMean()
    got = M.max_sensitivity(fn, images, targets, radius=0.2, n_samples=6, seed=3, batch_size=8)
    assert fn.sizes == [4, 8, 8, 8]  # the batch, then 2 noisy copies of it per call
    noise = (torch.rand((6, *images.shape), generator=torch.Generator().manual_seed(3)) * 2 - 1) * 0.2
    change = noise.mean(dim=2).flatten(2).norm(dim=2)  # a(x + n) - a(x) = mean(n)
    expected = (change / images.mean(dim=1).flatten(1).norm(dim=1)).amax(dim=0)
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.equal(got, M.max_sensitivity(_CountingMean(), images, targets, radius=0.2, n_samples=6, seed=3))


def test_max_sensitivity_of_an_all_zero_map_is_undefined_not_inf(resnet):
    images = resnet[2]
    targets = torch.zeros(len(images), dtype=torch.long)
    zeroed = images.clone()
    zeroed[0] = 0  # its own map is all zeros; every noisy copy's is not
    got = M.max_sensitivity(lambda x, t: x.mean(dim=1).abs(), zeroed, targets, radius=0.2, n_samples=3, seed=0)
    assert torch.isnan(got[0]) and torch.isfinite(got[1:]).all()


def test_local_lipschitz_estimate_scales_maps_and_divides_by_the_noise_norm(resnet):
    images = resnet[2]
    targets = torch.zeros(len(images), dtype=torch.long)
    got = M.local_lipschitz_estimate(lambda x, t: 3 * x[:, 0], images, targets, std=0.1, n_samples=4, seed=5)
    noise = torch.randn((4, *images.shape), generator=torch.Generator().manual_seed(5)) * 0.1

    def scaled(x):  # each map divided by its max |value| (the factor 3 drops out)
        a = x[:, 0].flatten(1)
        return a / a.abs().amax(dim=1, keepdim=True)

    change = torch.stack([(scaled(images + n) - scaled(images)).norm(dim=1) for n in noise])
    expected = (change / (noise.flatten(2).norm(dim=2) + 1e-10)).amax(dim=0)
    assert torch.allclose(got, expected, rtol=1e-5)
    with pytest.raises(XtlError, match="noise must be"):
        M.local_lipschitz_estimate(lambda x, t: x[:, 0], images, targets, noise=torch.zeros(2, 1, 3, 8, 8))


def test_randomisation_leaves_the_model_and_rng_alone_and_goes_top_down(resnet):
    model, spec, images, labels = resnet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    results = M.randomisation_similarity(model, spec, images, labels, "saliency", max_layers=3)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG as the caller left it
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [name for name, _ in results] == ["fc", "layer4.1.bn2", "layer4.1.conv2"]  # Quantus's order
    for _, scores in results:
        assert scores.shape == (len(images),) and ((scores >= -1) & (scores <= 1)).all()


def test_randomisation_by_blocks(resnet):
    model, spec, images, labels = resnet
    groups = M.layer_groups_of(model, "blocks")
    assert [name for name, _ in groups] == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
                                            "layer3.0", "layer3.1", "layer4.0", "layer4.1", "fc"]
    cascading = M.randomisation_similarity(model, spec, images, labels, "saliency", layer_groups="blocks",
                                           max_layers=3)
    assert [name for name, _ in cascading] == ["fc", "layer4.1", "layer4.0"]
    # this untrained ResNet's saliency hardly moves with its head, but does once a block below goes
    assert (cascading[0][1] > 0.99).all() and (cascading[2][1] < 0.9).all()
    independent = M.randomisation_similarity(model, spec, images, labels, "saliency", layers="independent",
                                             layer_groups=["layer4.0", "fc"])
    assert [name for name, _ in independent] == ["fc", "layer4.0"]  # prefixes read bottom-up, listed top-down


def test_vit_blocks_are_one_group_each():
    model, _ = build_model("timm:vit_tiny_patch16_224", 10, pretrained=False, input_size=32)
    names = [name for name, _ in M.layer_groups_of(model, "blocks")]
    assert [n for n in names if n.startswith("blocks.")] == [f"blocks.{i}" for i in range(12)]
    assert names[-1] == "head" and len(names) < 20
    assert len(M.layer_groups_of(model, None)) > 50  # per module, Quantus's granularity


def test_randomisation_refusals(resnet):
    model, spec, images, labels = resnet
    with pytest.raises(XtlError, match="layers must be"):
        M.randomisation_similarity(model, spec, images, labels, "saliency", layers="bottom_up")
    with pytest.raises(XtlError, match="unknown similarity"):
        M.randomisation_similarity(model, spec, images, labels, "saliency", similarity="kendall")
    with pytest.raises(XtlError, match="no randomisable module under 'nothing'"):
        M.randomisation_similarity(model, spec, images, labels, "saliency", layer_groups=["nothing"])


def test_pixel_flipping_ends_at_the_all_black_image(resnet):
    model, spec, images, labels = resnet
    maps = explain(model, images, labels, "saliency", spec=spec).maps
    curves = M.pixel_flipping(model, images, labels, maps, steps=8, batch_size=5)
    assert curves.shape == (len(images), 8)
    with torch.no_grad():
        black = images.flatten(1).amin(dim=1).reshape(-1, 1, 1, 1).expand_as(images)
        last = model(black).softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
        # the first step: the 128 most relevant pixels (all channels) set to the image's minimum
        order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)[:, :128]
        first_mask = torch.zeros(len(images), 32 * 32, dtype=torch.bool).scatter_(1, order, True).reshape(-1, 1, 32, 32)
        first = model(torch.where(first_mask, black, images)).softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    assert torch.allclose(curves[:, -1], last, atol=1e-6)
    assert torch.allclose(curves[:, 0], first, atol=1e-6)


def test_refusals_name_the_problem(resnet):
    model, _, images, labels = resnet
    with pytest.raises(XtlError, match=r"maps must be \[B, H, W\]"):
        M.sparseness(torch.rand(2, 1, 4, 4))
    with pytest.raises(XtlError, match="masks must have the maps' shape"):
        M.pointing_game(torch.rand(2, 4, 4), torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(XtlError, match="steps must divide the 32x32 = 1024 pixels"):
        M.pixel_flipping(model, images, labels, torch.rand(len(images), 32, 32), steps=10)
