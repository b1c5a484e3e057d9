"""torchvision's VisionTransformer (`vit_b_16` and kin) in the ViT methods.

The reference is a timm VisionTransformer of the same shapes holding the same weights: both
must give the same logits, and then every ViT-family method must give the same maps on both."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from xtl.errors import XtlError
from xtl.explain import explain, methods_for
from xtl.explain.transformer_attribution import vit_forward, vit_layout
from xtl.models import ModelSpec

torch.set_num_threads(1)

SHAPES = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=5)
TV_SPEC = ModelSpec(name="tv", family="vit", builder=None, input_size=32, classifier="heads.head",
                    target_layer="encoder.layers.-1.ln_1", patch_size=8)
TIMM_SPEC = ModelSpec(name="timm-twin", family="vit", builder=None, input_size=32, classifier="head",
                      target_layer="blocks.-1.norm1", patch_size=8)


def _torchvision_vit(seed=0, **overrides):
    """Random weights; torchvision starts the head and the class token at zero and the biases
    near it, which would hide a mistake with them: all made clearly non-zero."""
    torch.manual_seed(seed)
    model = TorchvisionViT(**{**SHAPES, **overrides})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or name in ("class_token", "heads.head.weight") or ".ln" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def _timm_twin(tv):
    """A timm ViT of the same shapes with `tv`'s weights (qkv packed q, k, v in both)."""
    twin = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2, num_classes=5,
                   qkv_bias=True, class_token=True, global_pool="token")
    assert all(m.eps == 1e-6 for m in tv.modules() if isinstance(m, torch.nn.LayerNorm))
    assert all(m.eps == 1e-6 for m in twin.modules() if isinstance(m, torch.nn.LayerNorm))
    state = {
        "cls_token": tv.class_token, "pos_embed": tv.encoder.pos_embedding,
        "patch_embed.proj.weight": tv.conv_proj.weight, "patch_embed.proj.bias": tv.conv_proj.bias,
        "norm.weight": tv.encoder.ln.weight, "norm.bias": tv.encoder.ln.bias,
        "head.weight": tv.heads.head.weight, "head.bias": tv.heads.head.bias,
    }
    for i, layer in enumerate(tv.encoder.layers):
        attn = layer.self_attention
        state.update({
            f"blocks.{i}.norm1.weight": layer.ln_1.weight, f"blocks.{i}.norm1.bias": layer.ln_1.bias,
            f"blocks.{i}.attn.qkv.weight": attn.in_proj_weight, f"blocks.{i}.attn.qkv.bias": attn.in_proj_bias,
            f"blocks.{i}.attn.proj.weight": attn.out_proj.weight, f"blocks.{i}.attn.proj.bias": attn.out_proj.bias,
            f"blocks.{i}.norm2.weight": layer.ln_2.weight, f"blocks.{i}.norm2.bias": layer.ln_2.bias,
            f"blocks.{i}.mlp.fc1.weight": layer.mlp[0].weight, f"blocks.{i}.mlp.fc1.bias": layer.mlp[0].bias,
            f"blocks.{i}.mlp.fc2.weight": layer.mlp[3].weight, f"blocks.{i}.mlp.fc2.bias": layer.mlp[3].bias,
        })
    twin.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return twin.eval()


@pytest.fixture(scope="module")
def pair():
    tv = _torchvision_vit()
    return tv, _timm_twin(tv)


def _images(batch=3, seed=1, dtype=torch.float32):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_the_recomputed_forward_reproduces_torchvision_logits_and_verify_passes(pair):
    tv, _ = pair
    images = _images()
    trace = vit_forward(vit_layout(tv), images)
    with torch.no_grad():
        expected = tv(images)
    assert expected.abs().max() > 0.1  # a zero head would make every check below trivial
    assert torch.allclose(trace.logits, expected, rtol=1e-5, atol=1e-5)
    assert trace.num_prefix == 1 and trace.grid == (4, 4)
    result = explain(tv, images, torch.tensor([0, 1, 2]), method="transformer_attribution", spec=TV_SPEC, verify=True)
    assert result.raw.shape == (3, 4, 4) and result.raw.abs().sum() > 0


def test_the_timm_twin_gives_the_same_logits(pair):
    tv, twin = pair
    images = _images()
    with torch.no_grad():
        assert torch.allclose(tv(images), twin(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", methods_for("vit"))
def test_every_vit_method_gives_the_twin_maps(pair, method):
    """float64, so that the comparison is of the formulas, not of float32 rounding (the LRP pass
    is ill-conditioned in float32); CAM methods hook `encoder.layers.-1.ln_1` ([B, 1+N, C], the
    class token first) on torchvision and `blocks.-1.norm1` on timm."""
    tv, twin = (copy.deepcopy(m).double() for m in pair)
    # class 4 of image 1: the one pair whose Score-CAM map is not all zero on these random weights
    images, targets = _images(dtype=torch.float64), torch.tensor([0, 4, 3])
    options = {"n_steps": 8} if method == "integrated_gradients" else {}
    options = {"n_samples": 4} if method in ("smoothgrad", "gradient_shap") else options
    options = {"n_samples": 16} if method in ("kernel_shap", "lime") else options
    ours = explain(tv, images, targets, method=method, spec=TV_SPEC, **options).raw
    theirs = explain(twin, images, targets, method=method, spec=TIMM_SPEC, **options).raw
    assert ours.shape == theirs.shape
    assert theirs.abs().max() > 0
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9 * theirs.abs().max().item())


def test_float32_transformer_attribution_maps_agree_with_the_twin(pair):
    tv, twin = pair
    images, targets = _images(), torch.tensor([1, 2, 3])
    for method in ("transformer_attribution", "attention_rollout", "attention_gradcam"):
        ours = explain(tv, images, targets, method=method, spec=TV_SPEC).raw
        theirs = explain(twin, images, targets, method=method, spec=TIMM_SPEC).raw
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6 * theirs.abs().max().item())


def test_a_pre_logits_head_is_refused_in_one_line():
    model = _torchvision_vit(representation_size=16)
    with pytest.raises(XtlError, match="pre_logits") as caught:
        explain(model, _images(1), torch.tensor([0]), method="raw_attention", spec=TV_SPEC)
    assert "\n" not in str(caught.value)


def test_an_image_of_another_size_is_refused(pair):
    tv, _ = pair
    with pytest.raises(XtlError, match="image_size"):
        vit_forward(vit_layout(tv), torch.randn(1, 3, 48, 48))


def test_the_attention_patches_are_undone_also_when_the_pass_fails(pair):
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = copy.deepcopy(pair[0])
    model.encoder.layers[1].mlp[1] = Boom()
    model.train()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, _images(2), torch.tensor([0, 1]), method="transformer_attribution", spec=TV_SPEC)
    assert model.training and torch.backends.mha.get_fastpath_enabled() == fastpath
    assert all(not m._forward_pre_hooks for m in model.modules())
