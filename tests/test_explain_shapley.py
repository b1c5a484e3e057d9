"""kernel_shap, gradient_shap and lime: equal to Captum used directly (same grid mask, baseline and
seed), reproducible without touching the caller's RNG, known answers, a ViT's patches as cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from xtl.errors import XtlError
from xtl.explain import explain

torch.set_num_threads(1)


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _grid(size: int, cells: int) -> torch.Tensor:
    """Square cells, row-major ids, built independently of xtl: [1, 1, size, size]."""
    side = size // cells
    mask = torch.zeros(size, size, dtype=torch.long)
    for r in range(cells):
        for c in range(cells):
            mask[r * side:(r + 1) * side, c * side:(c + 1) * side] = r * cells + c
    return mask.view(1, 1, size, size)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_surrogate_methods_equal_captum_used_directly(resnet, method):
    from captum.attr import KernelShap, Lime

    x, targets = _images(2, 32), torch.tensor([1, 7])
    ours = explain(resnet, x, targets, method, segments="grid", cells=4, n_samples=24, seed=3).raw
    explainer = (KernelShap if method == "kernel_shap" else Lime)(resnet)
    theirs = []
    for k in range(2):
        torch.manual_seed(3)
        with torch.no_grad():
            a = explainer.attribute(x[k:k + 1], baselines=0.0, target=int(targets[k]), feature_mask=_grid(32, 4),
                                    n_samples=24, perturbations_per_eval=16)
        theirs.append(a[0, 0])
    torch.testing.assert_close(ours, torch.stack(theirs), rtol=1e-4, atol=1e-5)
    # one value per cell, broadcast to its pixels
    assert torch.all(ours[:, :8, :8] == ours[:, :1, :1])
    # batched equals one by one
    one = torch.cat([explain(resnet, x[k:k + 1], targets[k:k + 1], method, segments="grid", cells=4, n_samples=24,
                             seed=3).raw
                     for k in range(2)])
    torch.testing.assert_close(ours, one, rtol=1e-4, atol=1e-5)
    assert explain(resnet, x[:1], 1, method, cells=4, n_samples=8).signed


def test_gradient_shap_equals_captum_used_directly(resnet):
    from captum.attr import GradientShap

    x, targets = _images(2, 32), torch.tensor([2, 5])
    ours = explain(resnet, x, targets, "gradient_shap", n_samples=6, stdevs=0.1, baseline=0.5, seed=4).raw
    theirs = []
    for k in range(2):
        torch.manual_seed(4)
        np.random.seed(4)
        inputs = x[k:k + 1].clone().requires_grad_(True)
        a = GradientShap(resnet).attribute(inputs, baselines=torch.full_like(x[k:k + 1], 0.5), target=int(targets[k]),
                                           n_samples=6, stdevs=0.1)
        theirs.append(a[0].sum(0))
    torch.testing.assert_close(ours, torch.stack(theirs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["kernel_shap", "lime", "gradient_shap"])
def test_a_fixed_seed_gives_the_same_map_and_leaves_the_global_rng_alone(resnet, method):
    x = _images(1, 32)
    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    a = explain(resnet, x, 3, method, n_samples=8, seed=7).raw
    b = explain(resnet, x, 3, method, n_samples=8, seed=7).raw
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    if method == "kernel_shap":  # the seed matters (lime's Lasso may zero every cell at this count)
        assert not torch.equal(a, explain(resnet, x, 3, method, n_samples=8, seed=8).raw)
    if method == "gradient_shap":
        # this bias-free ReLU net's gradient is constant along the ray from 0: the noise makes the seed matter
        noisy = explain(resnet, x, 3, method, n_samples=8, stdevs=0.2, seed=7).raw
        torch.testing.assert_close(noisy, explain(resnet, x, 3, method, n_samples=8, stdevs=0.2, seed=7).raw,
                                   rtol=0, atol=0)
        assert not torch.equal(noisy, explain(resnet, x, 3, method, n_samples=8, stdevs=0.2, seed=8).raw)


def test_kernel_shap_finds_the_only_region_the_model_reads():
    class TopLeft(nn.Module):  # logit 0 = sum of the top-left quadrant; logit 1 = 0
        def forward(self, x):
            score = x[:, :, :16, :16].sum((1, 2, 3))
            return torch.stack([score, torch.zeros_like(score)], 1)

    x = torch.ones(1, 3, 32, 32)
    raw = explain(TopLeft(), x, 0, "kernel_shap", cells=4, n_samples=200).raw[0]
    # an additive model: each top-left cell's Shapley value is its own sum, 3 x 8 x 8; the others 0
    torch.testing.assert_close(raw[:16, :16], torch.full((16, 16), 192.0), rtol=1e-3, atol=1e-2)
    assert raw[16:, :].abs().max() < 1e-2 and raw[:, 16:].abs().max() < 1e-2
    lime = explain(TopLeft(), x, 0, "lime", cells=4, n_samples=200).raw[0]
    assert lime[:16, :16].min() > 0 and lime[:16, :16].min() > lime[16:, :].abs().max()


def test_a_vit_s_cells_are_its_patches():
    import timm
    from captum.attr import KernelShap

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32).eval()
    x = _images(1, 32)
    ours = explain(vit, x, 2, "kernel_shap", n_samples=16).raw
    torch.manual_seed(0)
    with torch.no_grad():
        theirs = KernelShap(vit).attribute(x, baselines=0.0, target=2, feature_mask=_grid(32, 2), n_samples=16,
                                           perturbations_per_eval=16)[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # `cells` does not override the model's own grid
    torch.testing.assert_close(explain(vit, x, 2, "kernel_shap", n_samples=16, cells=8).raw, ours)


@pytest.mark.parametrize("method, options, message", [
    ("kernel_shap", {"cells": 0}, "option cells of method kernel_shap must be between 1 and the image side 32, not 0"),
    ("lime", {"cells": 64}, "option cells of method lime must be between 1 and the image side 32, not 64"),
    ("kernel_shap", {"n_samples": 0}, "option n_samples of method kernel_shap must be at least 1, not 0"),
    ("lime", {"perturbations_per_eval": 0}, "option perturbations_per_eval of method lime must be at least 1, not 0"),
    ("gradient_shap", {"n_samples": -1}, "option n_samples of method gradient_shap must be at least 1, not -1"),
    ("gradient_shap", {"stdevs": -0.5}, "option stdevs of method gradient_shap must be at least 0, not -0.5"),
    ("kernel_shap", {"cells": 2.5}, "option cells of method kernel_shap must be an int like its default 8, not 2.5"),
    ("lime", {"segments": "quickshift"}, "option segments of method lime must be 'auto', 'grid' or 'slic', not 'quickshift'"),
    ("kernel_shap", {"n_segments": 0}, "option n_segments of method kernel_shap must be at least 1, not 0"),
    ("lime", {"compactness": 0.0}, "option compactness of method lime must be above 0, not 0.0"),
])
def test_bad_shapley_options_are_one_line(resnet, method, options, message):
    with pytest.raises(XtlError) as err:
        explain(resnet, _images(1, 32), 0, method, **options)
    assert str(err.value) == message and "\n" not in str(err.value)


def _two_colours(size: int = 32) -> torch.Tensor:
    """Left half pure red, right half pure blue, preprocessed with ImageNet's mean and std: [1, 3, H, W]."""
    pixels = torch.zeros(3, size, size)
    pixels[0, :, :size // 2] = 1.0
    pixels[2, :, size // 2:] = 1.0
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((pixels - mean) / std).unsqueeze(0)


def _slic(image: torch.Tensor, n_segments: int = 50, compactness: float = 10.0) -> torch.Tensor:
    """scikit-image's SLIC on the de-normalised image, built independently of xtl: [1, 1, H, W]."""
    from skimage.segmentation import slic

    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = (image * std + mean).clamp(0, 1).permute(1, 2, 0).double().numpy()
    return torch.from_numpy(slic(pixels, n_segments=n_segments, compactness=compactness, start_label=0)).long()[None, None]


def test_slic_superpixels_follow_the_image():
    from xtl.explain.shapley import slic_feature_mask
    from xtl.models import describe_model

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    x = _two_colours()
    mask = slic_feature_mask(x[0], describe_model(resnet), 8, 10.0)[0, 0]
    assert mask.unique().tolist() == list(range(int(mask.max()) + 1)) and mask.max() >= 1
    for segment in mask.unique():  # every segment lies on one side of the colour boundary
        cols = (mask == segment).nonzero()[:, 1]
        assert bool((cols < 16).all()) or bool((cols >= 16).all())
    assert torch.equal(mask, _slic(x[0], 8)[0, 0])  # scikit-image used directly


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_slic_superpixels_equal_captum_used_directly_and_batched_equals_one_by_one(resnet, method):
    from captum.attr import KernelShap, Lime

    x = torch.cat([_two_colours(), _images(1, 32, seed=5) * 0.3])
    targets = torch.tensor([1, 7])
    ours = explain(resnet, x, targets, method, n_segments=12, n_samples=24, seed=3).raw  # a CNN: SLIC by default
    torch.testing.assert_close(ours, explain(resnet, x, targets, method, segments="slic", n_segments=12, n_samples=24,
                                             seed=3).raw, rtol=0, atol=0)
    explainer = (KernelShap if method == "kernel_shap" else Lime)(resnet)
    theirs = []
    for k in range(2):
        mask = _slic(x[k], 12)
        if mask.max() < 1:  # xtl's documented fallback on pixel noise
            from skimage.segmentation import slic

            mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
            pixels = (x[k] * std + mean).clamp(0, 1).permute(1, 2, 0).double().numpy()
            mask = torch.from_numpy(slic(pixels, n_segments=12, compactness=10.0, start_label=0,
                                         enforce_connectivity=False)).unique(return_inverse=True)[1][None, None]
        torch.manual_seed(3)
        with torch.no_grad():
            a = explainer.attribute(x[k:k + 1], baselines=0.0, target=int(targets[k]), feature_mask=mask,
                                    n_samples=24, perturbations_per_eval=16)
        theirs.append(a[0, 0])
    torch.testing.assert_close(ours, torch.stack(theirs), rtol=1e-4, atol=1e-5)
    one = torch.cat([explain(resnet, x[k:k + 1], targets[k:k + 1], method, n_segments=12, n_samples=24, seed=3).raw
                     for k in range(2)])
    torch.testing.assert_close(ours, one, rtol=1e-4, atol=1e-5)
    # the map is constant on each superpixel, and a seed gives the same map twice
    mask = _slic(x[0], 12)[0, 0]
    for segment in mask.unique():
        values = ours[0][mask == segment]
        assert torch.all(values == values[0])
    assert torch.equal(ours, explain(resnet, x, targets, method, n_segments=12, n_samples=24, seed=3).raw)
