"""RISE (Petsiuk et al. 2018): its estimator against a mask-by-mask reference, a model whose answer is
known, seeds, and its options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xtl.errors import XtlError
from xtl.explain import explain
from xtl.explain.occlusion import rise_masks
from xtl.models import ModelDescription

SPEC = ModelDescription(name="toy", family="other")


class Quadrant(nn.Module):
    """Two classes; class 0's logit is 4 x (the mean of channel 0 over the top-left quadrant - 0.5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        score = 4 * (x[:, 0, : h // 2, : w // 2].mean((1, 2)) - 0.5)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_the_masks_are_smooth_cropped_grids_the_same_in_any_chunk():
    masks = rise_masks(12, 4, 0.5, (30, 30), seed=3)
    assert masks.shape == (12, 30, 30) and 0 <= masks.min() and masks.max() <= 1
    assert 0.3 < masks.mean() < 0.7  # about half of each is kept
    assert torch.equal(rise_masks(12, 4, 0.5, (30, 30), seed=3, start=5, stop=9), masks[5:9])
    assert not torch.equal(rise_masks(12, 4, 0.5, (30, 30), seed=4), masks)


def test_rise_is_the_probability_weighted_mean_of_its_masks_computed_one_mask_at_a_time():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 5)).eval()
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 4])
    got = explain(model, images, targets, "rise", spec=SPEC, n_masks=10, cells=3, keep=0.4, seed=2, masks_per_eval=4)
    masks = rise_masks(10, 3, 0.4, (24, 24), seed=2)
    expected = torch.zeros(2, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        for mask in masks:
            p = model(images * mask).softmax(1)[torch.arange(2), targets]
            expected += p.double()[:, None, None] * mask.double()
    torch.testing.assert_close(got.raw, (expected / (10 * 0.4)).float(), rtol=1e-5, atol=1e-6)


def test_rise_finds_the_quadrant_a_model_looks_at_and_its_seed_reproduces_it():
    images = torch.ones(1, 3, 32, 32)
    raw = explain(Quadrant(), images, 0, "rise", spec=SPEC, n_masks=400, cells=4, seed=0).raw[0]
    inside, outside = raw[:16, :16].mean(), torch.cat([raw[16:].flatten(), raw[:16, 16:].flatten()]).mean()
    assert inside > outside + 0.05, (inside, outside)  # 0.59 against 0.51 with these 400 masks
    row, col = divmod(int(raw.argmax()), 32)
    assert row < 16 and col < 16
    again = explain(Quadrant(), images, 0, "rise", spec=SPEC, n_masks=400, cells=4, seed=0).raw[0]
    other = explain(Quadrant(), images, 0, "rise", spec=SPEC, n_masks=400, cells=4, seed=1).raw[0]
    assert torch.equal(raw, again) and not torch.equal(raw, other)


@pytest.mark.parametrize(("options", "message"), [
    ({"keep": 1.0}, "option keep of method rise must be a probability strictly between 0 and 1"),
    ({"n_masks": 0}, "option n_masks of method rise must be at least 1"),
    ({"cells": 40}, "option cells of method rise must be between 1 and the image side 32"),
    ({"masks_per_eval": 0}, "option masks_per_eval of method rise must be at least 1"),
])
def test_rise_options_out_of_range_are_one_line(options, message):
    with pytest.raises(XtlError, match=message):
        explain(Quadrant(), torch.ones(1, 3, 32, 32), 0, "rise", spec=SPEC, **options)


def test_rise_refuses_a_callable_target():
    with pytest.raises(XtlError, match="method rise explains a class of the model, not a callable target"):
        explain(Quadrant(), torch.ones(1, 3, 32, 32), lambda logits: logits[:, 0], "rise", spec=SPEC)
