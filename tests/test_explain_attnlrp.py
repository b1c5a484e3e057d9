"""AttnLRP and CP-LRP on timm, Hugging Face and torchvision ViTs.

Checked here: conservation in float64 with every absorbing term accounted for explicitly (the
biases, the class/register tokens and position embedding, and each softmax's implicit bias), the
rules one by one against the paper's formulas, a known-answer model, batched equals one by one,
model randomisation, the caller's model left alone, and bad input in one line. Agreement with
LXT's own AttnLRP is in tests/test_explain_attnlrp_lxt.py."""

from __future__ import annotations

import copy

import pytest
import torch

from test_explain_vit import _one_patch_vit, _randomise_layer_scale, _spearman
from xtl.errors import XtlError
from xtl.explain import METHODS, explain
from xtl.explain.attnlrp import attnlrp_pass, halved, identity_rule, layer_norm_rule
from xtl.explain.transformer_attribution import vit_layout
from xtl.models import build_model

torch.set_num_threads(1)

METHODS_AND_RULES = [("attnlrp", "uniform"), ("cp_lrp", "constant")]


def _tiny(name, size, seed=0):
    torch.manual_seed(seed)
    model, _ = build_model(name, 10, pretrained=False, input_size=size)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    """float64 twins: a plain timm ViT, a DINOv2-style one (LayerScale made large, 4 register
    tokens, position on the patches only), a Hugging Face ViT and a torchvision ViT whose zero
    head and near-zero biases are made clearly non-zero."""
    from torchvision.models.vision_transformer import VisionTransformer
    from transformers import ViTConfig, ViTForImageClassification

    from xtl.models.hf import HFClassifier

    plain = _tiny("timm:vit_tiny_patch16_224", 64)
    register = _randomise_layer_scale(_tiny("timm:vit_small_patch14_reg4_dinov2", 56))
    torch.manual_seed(0)
    hf = HFClassifier(ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5)).eval())
    torch.manual_seed(0)
    tv = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                           num_classes=5)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in tv.named_parameters():
            if name.endswith("bias") or name in ("class_token", "heads.head.weight"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return {"plain": (plain, 64), "register": (register, 56), "hf": (hf, 32), "torchvision": (tv.eval(), 32)}


def _images(size, batch=3, seed=1, dtype=torch.float64):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- conservation


@pytest.mark.parametrize("rule", ["uniform", "constant"])
@pytest.mark.parametrize("name", ["plain", "register", "hf", "torchvision"])
def test_relevance_is_conserved_down_to_the_pixels_in_float64(models, name, rule):
    """Σ pixels + Σ what the bias-like tensors take + Σ what the softmaxes absorb = the logit."""
    model, size = models[name]
    model = copy.deepcopy(model).double()
    images, targets = _images(size), torch.tensor([0, 3, 1])
    result = attnlrp_pass(vit_layout(model), images, targets, rule, ledger=True)
    with torch.no_grad():
        logit = model(images).gather(1, targets.view(-1, 1)).squeeze(1)
    assert logit.abs().min() > 1e-3  # a zero logit would make the identity trivial
    pixels = result.pixels.flatten(1).sum(1)
    total = pixels + result.bias_relevance + result.softmax_absorbed
    assert torch.allclose(total, logit, rtol=1e-10, atol=1e-10)
    # the biases do take a share, so the pixels alone are not the logit (the account is needed)
    assert (result.bias_relevance.abs() > 1e-3).all()
    if rule == "constant":  # CP-LRP: the attention is constant, no softmax absorbs anything
        assert torch.equal(result.softmax_absorbed, torch.zeros_like(logit))
    else:
        assert (result.softmax_absorbed.abs() > 1e-6).all()


def test_without_biases_and_with_constant_attention_the_pixels_hold_the_whole_logit():
    """No bias, no class-token or position values and CP-LRP: nothing can absorb, so the pixel
    relevance sums to the logit by itself."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, depth=2,
                              class_token=True, global_pool="token").double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                param.zero_()
    images, targets = _images(32), torch.tensor([0, 1, 2])
    result = attnlrp_pass(vit_layout(model), images, targets, "constant")
    assert torch.allclose(result.pixels.flatten(1).sum(1), result.logits.gather(1, targets.view(-1, 1)).squeeze(1),
                          rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the rules one by one


def _relevance_in(function, inputs, relevance_out):
    """x ⊙ g_x with the upstream gradient R_out / out (so that out ⊙ g_out = R_out)."""
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    out = function(*inputs)
    upstream = torch.where(out != 0, relevance_out / torch.where(out != 0, out, 1), 0)  # R ⊘ out, 0 where out = 0
    gradients = torch.autograd.grad(out, inputs, upstream)
    return [x.detach() * g for x, g in zip(inputs, gradients)]


def test_the_matrix_products_split_relevance_half_and_half():
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 5, 4, dtype=torch.float64, generator=generator) for _ in range(2))
    relevance = torch.randn(2, 5, 5, dtype=torch.float64, generator=generator)
    r_q, r_k = _relevance_in(lambda a, b: halved(a) @ halved(b).transpose(-2, -1), [q, k], relevance)
    assert torch.allclose(r_q.sum((1, 2)), relevance.sum((1, 2)) / 2, rtol=1e-12)
    assert torch.allclose(r_k.sum((1, 2)), relevance.sum((1, 2)) / 2, rtol=1e-12)
    # and per query row: the epsilon rule with k held constant, halved
    ratio = relevance / (q @ k.transpose(-2, -1))
    assert torch.allclose(r_q, q * (ratio @ k) / 2, rtol=1e-10)


def test_the_activation_passes_relevance_unchanged_elementwise():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    relevance = torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (r_x,) = _relevance_in(lambda a: identity_rule(torch.nn.GELU(), a), [x], relevance)
    keep = x != 0  # GELU(0) = 0 carries no relevance
    assert torch.allclose(r_x[keep], relevance[keep], rtol=1e-12) and r_x[~keep].eq(0).all()


def test_softmax_takes_the_papers_bias_absorbing_rule():
    """R_s = s ⊙ (R_A − A Σ_j R_A,j) per row (Achtibat et al. 2024, the softmax proposition)."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    relevance = torch.randn(3, 6, dtype=torch.float64, generator=generator)
    attention = scores.softmax(-1)
    (r_s,) = _relevance_in(lambda s: s.softmax(-1), [scores], relevance)
    assert torch.allclose(r_s, scores * (relevance - attention * relevance.sum(-1, keepdim=True)), rtol=1e-10)


def test_layer_norm_treats_its_standard_deviation_as_constant():
    """A linear map then: relevance conserved up to the bias's share, and the centring conserves."""
    norm = torch.nn.LayerNorm(8, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(layer_norm_rule(norm, x, None), norm(x), atol=1e-12)
    out = norm(x).detach()
    relevance = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (r_x,) = _relevance_in(lambda a: layer_norm_rule(norm, a, None), [x], relevance)
    bias_share = (norm.bias.detach() * relevance / out).sum(-1)
    assert torch.allclose(r_x.sum(-1) + bias_share, relevance.sum(-1), rtol=1e-10)


# ----------------------------------------------------------------------------- a known answer


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_a_model_that_sees_one_patch_gets_relevance_on_that_patch_only(method):
    patch = 5  # row 1, column 1 of the 4x4 grid of 16-pixel patches
    model = _one_patch_vit(patch)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    maps = explain(model, images, torch.tensor([2, 7]), method=method).raw
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[16:32, 16:32] = True
    assert maps.shape == (2, 64, 64)
    assert maps[:, ~inside].abs().max() == 0  # nothing outside the one patch the model sees
    assert (maps[:, inside].abs().sum(1) > 0).all()


# ----------------------------------------------------------------------------- batching, dtype, randomisation


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
@pytest.mark.parametrize("name", ["plain", "register", "hf"])
def test_batched_maps_equal_maps_one_image_at_a_time(models, name, method):
    model, size = models[name]
    images, targets = _images(size, dtype=torch.float32), torch.tensor([0, 3, 1])
    batched = explain(model, images, targets, method=method).raw
    single = torch.cat([explain(model, images[i:i + 1], targets[i:i + 1], method=method).raw for i in range(3)])
    assert batched.abs().sum() > 0
    assert torch.allclose(batched, single, rtol=1e-4, atol=1e-5 * single.abs().max())


def test_float32_maps_are_close_to_the_float64_maps(models):
    """One backward pass of gradients: unlike Chefer's LRP pass, well conditioned in float32."""
    model, size = models["register"]
    images, targets = _images(size, dtype=torch.float32), torch.tensor([0, 3, 1])
    single = explain(model, images, targets, method="attnlrp").raw
    double = explain(model, images, targets, method="attnlrp", compute_dtype=torch.float64).raw
    assert model.head.weight.dtype == torch.float32  # the caller's model was not converted
    for a, b in zip(single, double):
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1] > 0.9999


def test_randomised_weights_change_the_map_and_the_model_is_left_alone():
    model, _ = build_model("vit_s14_dinov2", 10, input_size=112)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = _images(112, batch=2, dtype=torch.float32)
    targets = torch.tensor([0, 1])
    trained = explain(model, images, targets, method="attnlrp").raw
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    randomised = copy.deepcopy(model)
    torch.manual_seed(1)
    randomised.init_weights()
    random_maps = explain(randomised, images, targets, method="attnlrp").raw
    again = explain(model, images, targets, method="attnlrp").raw
    for i in range(2):
        assert _spearman(trained[i].flatten(), again[i].flatten()) == pytest.approx(1.0)
        assert _spearman(trained[i].flatten(), random_maps[i].flatten()) < 0.5


# ----------------------------------------------------------------------------- bad input


def test_unsupported_models_and_options_are_one_line(models):
    model, size = models["plain"]
    images, targets = _images(size, 1, dtype=torch.float32), torch.tensor([0])
    other = copy.deepcopy(model)
    other.blocks[0].norm1 = torch.nn.RMSNorm(other.embed_dim)
    with pytest.raises(XtlError, match="AttnLRP supports LayerNorm") as caught:
        explain(other, images, targets, method="attnlrp")
    assert "\n" not in str(caught.value)
    with pytest.raises(XtlError, match="no option .gamma.; its options: verify=True, compute_dtype=None"):
        explain(model, images, targets, method="attnlrp", gamma=0.25)
    with pytest.raises(XtlError, match="not a callable target|explains a class"):
        explain(model, images, lambda logits: logits[:, 0], method="cp_lrp")
    with pytest.raises(XtlError, match="unknown attention_rule 'soft'; known: uniform, constant"):
        attnlrp_pass(vit_layout(model), images, targets, "soft")
    assert METHODS["attnlrp"].signed and METHODS["attnlrp"].families == frozenset({"vit"})
