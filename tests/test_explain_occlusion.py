"""Occlusion and input x gradient: equal to Captum used directly, known answers, the model's own grid."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from helpers import noise_images
from xtl.errors import XtlError
from xtl.explain import explain

torch.set_num_threads(1)


_images = noise_images


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_occlusion_equals_captum_used_directly(resnet):
    from captum.attr import Occlusion

    x, targets = _images(2, 32), torch.tensor([1, 7])
    ours = explain(resnet, x, targets, "occlusion", window=8, stride=4).raw
    with torch.no_grad():
        theirs = Occlusion(resnet).attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), baselines=0.0,
                                             target=targets)
    torch.testing.assert_close(ours, theirs.mean(1))
    # batched equals one by one
    one = torch.cat([explain(resnet, x[k:k + 1], targets[k:k + 1], "occlusion", window=8, stride=4).raw for k in range(2)])
    torch.testing.assert_close(ours, one, rtol=1e-4, atol=1e-5)


def test_occlusion_finds_the_only_region_the_model_reads():
    class TopLeft(nn.Module):  # logit 0 = sum of the top-left quadrant; logit 1 = 0
        def forward(self, x):
            score = x[:, :, :16, :16].sum((1, 2, 3))
            return torch.stack([score, torch.zeros_like(score)], 1)

    x = torch.ones(1, 3, 32, 32)
    raw = explain(TopLeft(), x, 0, "occlusion", window=8).raw[0]
    assert torch.all(raw[:16, :16] == 3 * 8 * 8)  # hiding any 8x8 window there drops the logit by its sum
    assert torch.all(raw[16:, :] == 0) and torch.all(raw[:, 16:] == 0)
    assert explain(TopLeft(), x, 0, "occlusion", window=8).signed


def test_occlusion_of_a_vit_hides_one_patch_at_a_time():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=64).eval()
    x = _images(1, 64)
    default = explain(vit, x, 2, "occlusion").raw
    torch.testing.assert_close(default, explain(vit, x, 2, "occlusion", window=16, stride=16).raw)
    # one value per patch: constant within each 16 x 16 patch
    patches = default[0].reshape(4, 16, 4, 16)
    assert torch.allclose(patches, patches[:, :1, :, :1].expand_as(patches))


def test_input_x_gradient_is_the_input_times_the_gradient(resnet):
    x = _images(2, 32)
    ours = explain(resnet, x, [3, 4], "input_x_gradient")
    grad_input = x.clone().requires_grad_(True)
    resnet(grad_input).gather(1, torch.tensor([[3], [4]])).sum().backward()
    torch.testing.assert_close(ours.raw, (grad_input.grad * x).sum(1))
    assert ours.signed and (ours.raw < 0).any() and (ours.raw > 0).any()


@pytest.mark.parametrize("options, message", [
    ({"window": 0}, "option window of method occlusion must be between 1 and the image side 32, not 0"),
    ({"window": 64}, "between 1 and the image side 32, not 64"),
    ({"stride": 0}, "option stride of method occlusion must be at least 1, not 0"),
    ({"window": 2.5}, "option window of method occlusion must be a whole number of pixels, not 2.5"),
    ({"perturbations_per_eval": 0}, "must be at least 1, not 0"),
])
def test_bad_occlusion_options_are_one_line(resnet, options, message):
    with pytest.raises(XtlError, match=message):
        explain(resnet, _images(1, 32), 0, "occlusion", **options)
