"""Transformer attribution (Chefer et al. 2021) and its baselines on timm and Hugging Face ViTs."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import IMAGENET_SAMPLE
from xtl.data import Preprocess
from xtl.data.sources import decode_image, images_to_uint8
from xtl.errors import XtlError
from xtl.explain import METHODS, explain
from xtl.explain.transformer_attribution import (
    add_rule,
    attention_rollout_matrices,
    joint_attention,
    linear_rule,
    lrp,
    pixel_relevance,
    stabilised_divide,
    vit_forward,
    vit_layout,
)
from xtl.models import build_model

torch.set_num_threads(1)

VIT_METHODS = ["transformer_attribution", "lrp_rollout", "partial_lrp", "full_lrp", "raw_attention",
               "attention_rollout", "attention_gradcam"]


def _attribute(method, model, images, targets, **options):
    return METHODS[method].attribute(model, images, targets, getattr(model, "xtl_spec", None), **options)


def _randomise_layer_scale(model, seed=0):
    """Random-init LayerScale is 1e-5: make it large enough that a mistake with it would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for scale in (block.ls1, block.ls2):
                scale.gamma.copy_(torch.randn(scale.gamma.shape, generator=generator) * 0.5)
    return model


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    model, _ = build_model("timm:vit_tiny_patch16_224", 10, pretrained=False, input_size=64)
    return model.eval()


@pytest.fixture(scope="module")
def register_vit():
    """DINOv2-style: LayerScale, 4 register tokens, position embedding on the patches only."""
    torch.manual_seed(0)
    model, _ = build_model("timm:vit_small_patch14_reg4_dinov2", 10, pretrained=False, input_size=56)
    return _randomise_layer_scale(model).eval()


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-vit"
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64, num_labels=5)
    ViTForImageClassification(config).save_pretrained(folder)
    model, _ = build_model(f"hf:{folder}", 4)
    return model.eval()


@pytest.fixture(scope="module")
def dinov2():
    model, spec = build_model("vit_s14_dinov2", 10, input_size=224)
    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:2]
    images = images_to_uint8([decode_image(f) for f in files], store_size=spec.input_size)
    return model.eval(), Preprocess(spec.input_size, spec.mean, spec.std)(images)


def _images(model, batch=3, seed=1, dtype=torch.float32):
    size = model.xtl_spec.input_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- 1. the forward


@pytest.mark.parametrize("name", ["tiny_vit", "register_vit", "hf_vit"])
def test_recomputed_forward_reproduces_the_logits(name, request):
    model = request.getfixturevalue(name)
    images = _images(model)
    trace = vit_forward(vit_layout(model), images)
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(trace.logits, expected, rtol=1e-4, atol=1e-5)
    assert trace.num_prefix == (5 if name == "register_vit" else 1)


def test_recomputed_forward_reproduces_dinov2_layer_scale_logits_in_float64():
    torch.manual_seed(0)
    model, _ = build_model("timm:vit_small_patch14_dinov2", 10, pretrained=False, input_size=56)
    model = _randomise_layer_scale(model).double().eval()
    images = _images(model, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(vit_forward(vit_layout(model), images).logits, model(images), rtol=1e-12, atol=1e-12)


def test_a_model_the_recomputation_cannot_follow_is_refused(tiny_vit):
    model = copy.deepcopy(tiny_vit)
    model.blocks[0].attn.q_norm = torch.nn.LayerNorm(64)
    with pytest.raises(XtlError, match="q/k or output norms"):
        _attribute("raw_attention", model, _images(model, 1), torch.tensor([0]))


# ----------------------------------------------------------------------------- 2. batched == one by one


def _batched_and_single(model, method, images, targets):
    batched = _attribute(method, model, images, targets)
    single = torch.cat([_attribute(method, model, images[i:i + 1], targets[i:i + 1]) for i in range(len(images))])
    return batched, single


@pytest.mark.parametrize("name", ["tiny_vit", "register_vit", "hf_vit"])
def test_batched_maps_equal_maps_one_image_at_a_time(name, request):
    model = request.getfixturevalue(name)
    model64 = copy.deepcopy(model).double()
    images = _images(model)
    targets = torch.tensor([0, 3, 1])
    for method in VIT_METHODS:
        batched, single = _batched_and_single(model, method, images, targets)
        assert batched.shape == single.shape and batched.abs().sum() > 0, method
        assert torch.allclose(batched, single, rtol=1e-4, atol=1e-5 * single.abs().max()), method
        batched, single = _batched_and_single(model64, method, images.double(), targets)
        # float64 round-off through 12 LRP divisions reaches ~4e-10 of the largest value; a batching bug is O(1)
        assert torch.allclose(batched, single, rtol=1e-8, atol=1e-8 * single.abs().max()), method


# ----------------------------------------------------------------------------- 3. an independent reference


def _divide(a, b):
    return torch.where(b == 0, torch.zeros_like(a), a / (b + 1e-9))


def _relprop(function, inputs, relevance):
    """The generic LRP step R_i = x_i ⊙ ∂⟨R ⊘ z, z⟩/∂x_i with z = function(*inputs), by autograd."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    with torch.enable_grad():
        z = function(*inputs)
        grads = torch.autograd.grad(z, inputs, _divide(relevance, z.detach()))
    return [x.detach() * g for x, g in zip(inputs, grads)]


def _reference_linear(x, weight, relevance):
    positive, negative = weight.clamp(min=0), weight.clamp(max=0)
    parts = _relprop(lambda xp, xn: xp @ positive.T + xn @ negative.T, [x.clamp(min=0), x.clamp(max=0)], relevance)
    return parts[0] + parts[1]


def _reference_add(a, b, relevance):
    ra, rb = _relprop(torch.add, [a, b], relevance)
    sa, sb = ra.sum(), rb.sum()
    return (ra * _divide(_divide(sa.abs(), sa.abs() + sb.abs()) * relevance.sum(), sa),
            rb * _divide(_divide(sb.abs(), sa.abs() + sb.abs()) * relevance.sum(), sb))


def _record(model):
    """Hooks on the timm modules themselves: activations of one image, attention kept with its grad."""
    seen, handles = {}, []

    def keep(name, use_input=False):
        def hook(module, args, output):
            value = args[0] if use_input else output
            if name.endswith("attention"):
                value.retain_grad()
            seen[name] = value
        return hook

    for i, block in enumerate(model.blocks):
        for name, module, use_input in (("h", block.norm1, True), ("n1", block.norm1, False),
                                        ("qkv", block.attn.qkv, False), ("attention", block.attn.attn_drop, False),
                                        ("o", block.attn.proj, True), ("b1", block.attn, False),
                                        ("hm", block.norm2, True), ("n2", block.norm2, False),
                                        ("g", block.mlp.fc2, True), ("b2", block.mlp, False)):
            handles.append(module.register_forward_hook(keep(f"{i}.{name}", use_input)))
    handles.append(model.norm.register_forward_hook(keep("final")))
    handles.append(model.patch_embed.register_forward_hook(keep("patches")))
    return seen, handles


def _reference_maps(model, image, target):
    """Per image, the spec's formulas by generic autograd relprop on activations hooked from timm."""
    for block in model.blocks:
        block.attn.fused_attn = False
    seen, handles = _record(model)
    logits = model(image)
    logits[0, target].backward()
    for h in handles:
        h.remove()
    blocks, heads = len(model.blocks), model.blocks[0].attn.num_heads
    start = F.one_hot(torch.tensor([target]), 10).double()
    relevance = _reference_linear(seen["final"][:, 0], model.head.weight, start)
    cls_relevance = _relprop(lambda t: t[:, 0], [seen["final"]], relevance)[0]  # x0 ⊙ (R ⊘ x0) at token 0
    r = cls_relevance
    attention_relevance, gradient_maps = [], []
    for i in reversed(range(blocks)):
        get = lambda name: seen[f"{i}.{name}"].detach()  # noqa: E731
        block = model.blocks[i]
        skip, branch = _reference_add(get("hm"), get("b2"), r)
        branch = _reference_linear(get("g"), block.mlp.fc2.weight, branch)
        branch = _reference_linear(get("n2"), block.mlp.fc1.weight, branch)
        r = get("hm") * (_divide(skip, get("hm")) + _divide(branch, get("hm")))
        skip, branch = _reference_add(get("h"), get("b1"), r)
        branch = _reference_linear(get("o"), block.attn.proj.weight, branch)
        n = branch.shape[1]
        branch = branch.reshape(1, n, heads, -1).transpose(1, 2)
        q, k, v = get("qkv").reshape(1, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attention = get("attention")
        r_attention, r_v = [x / 2 for x in _relprop(torch.matmul, [attention, v], branch)]
        r_q, r_k = [x / 2 for x in _relprop(lambda a, b: a @ b.transpose(-2, -1), [q, k], r_attention)]
        r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(1, n, -1)
        r_n1 = _reference_linear(get("n1"), block.attn.qkv.weight, r_qkv)
        r = get("h") * (_divide(skip, get("h")) + _divide(r_n1, get("h")))
        attention_relevance.insert(0, r_attention[0])
        gradient_maps.insert(0, (seen[f"{i}.attention"].grad[0] * r_attention[0]).clamp(min=0).mean(0))
    eye = torch.eye(n, dtype=torch.float64)
    joint, lrp_joint = eye.clone(), eye.clone()
    for i in range(blocks):
        joint = (gradient_maps[i] + eye) @ joint
        lrp_joint = (attention_relevance[i].clamp(min=0).mean(0) + eye) @ lrp_joint
    tokens = torch.cat([model.cls_token, seen["patches"]], dim=1).detach()
    kept, _ = _reference_add(tokens, model.pos_embed.detach(), r)
    pixels = _reference_patch_conv(image, model.patch_embed.proj, kept[:, 1:])
    return {"transformer_attribution": joint[0, 1:], "lrp_rollout": lrp_joint[0, 1:],
            "partial_lrp": attention_relevance[-1].clamp(min=0).mean(0)[0, 1:], "full_lrp": pixels.sum(1)[0]}


def _reference_patch_conv(image, conv, relevance):
    side = image.shape[-1] // conv.stride[0]
    relevance = relevance.transpose(1, 2).reshape(1, -1, side, side)
    low, high = torch.full_like(image, image.min()), torch.full_like(image, image.max())
    weight = conv.weight.detach()

    def bounded(x, lo, hi):
        return (F.conv2d(x, weight, stride=conv.stride) - F.conv2d(lo, weight.clamp(min=0), stride=conv.stride)
                - F.conv2d(hi, weight.clamp(max=0), stride=conv.stride))

    inputs = [t.requires_grad_() for t in (image.clone(), low, high)]
    with torch.enable_grad():
        z = bounded(*inputs)
        grads = torch.autograd.grad(z, inputs, relevance / (z.detach() + 1e-9))
    return sum(x.detach() * g for x, g in zip(inputs, grads))


def test_lrp_maps_match_an_independent_per_image_reference_in_float64():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=48, depth=4)
    model = model.double().eval()
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([4, 7])
    ours = {method: _attribute(method, model, images, targets).flatten(1) for method in
            ("transformer_attribution", "lrp_rollout", "partial_lrp", "full_lrp")}
    for i in range(2):
        reference = _reference_maps(model, images[i:i + 1], int(targets[i]))
        for method, expected in reference.items():
            expected = expected.flatten()
            assert expected.abs().max() > 0, method
            assert torch.allclose(ours[method][i], expected, rtol=1e-8, atol=1e-8 * expected.abs().max()), method


# ----------------------------------------------------------------------------- 4. conservation


def test_linear_and_add_rules_conserve_relevance():
    """alpha=1/beta=0 conserves up to the 1e-9 stabiliser (whatever the input signs; for positive
    inputs too); the add rule's rescaling makes it conserve to rounding. Tolerance 1e-9 relative."""
    generator = torch.Generator().manual_seed(0)
    divide = stabilised_divide()
    weight = torch.randn(20, 30, dtype=torch.float64, generator=generator)
    relevance = torch.rand(4, 20, dtype=torch.float64, generator=generator)
    for x in (torch.rand(4, 30, dtype=torch.float64, generator=generator),
              torch.randn(4, 30, dtype=torch.float64, generator=generator)):
        assert torch.allclose(linear_rule(x, weight, relevance, divide).sum(1), relevance.sum(1), rtol=1e-9)
    a, b = (torch.randn(4, 5, 6, dtype=torch.float64, generator=generator) for _ in range(2))
    relevance = torch.randn(4, 5, 6, dtype=torch.float64, generator=generator)
    ra, rb = add_rule(a, b, relevance, divide)
    assert torch.allclose((ra + rb).sum((1, 2)), relevance.sum((1, 2)), rtol=1e-12)
    assert torch.allclose(ra.sum((1, 2)).abs() / rb.sum((1, 2)).abs(),
                          (a * relevance / (a + b)).sum((1, 2)).abs() / (b * relevance / (a + b)).sum((1, 2)).abs())


def test_full_lrp_keeps_the_total_relevance_of_one_down_to_the_pixels(tiny_vit):
    """Every rule on the way conserves up to the 1e-9 stabiliser, so the relevance entering the
    first block is 1 (tolerance 1e-6); the position add then splits it, and the z^B rule passes
    the patch tokens' share on to the pixels (tolerance 1e-6 relative)."""
    model = copy.deepcopy(tiny_vit).double()
    images, targets = _images(model, dtype=torch.float64), torch.tensor([2, 5, 9])
    layout = vit_layout(model)
    trace = vit_forward(layout, images)
    embedded = lrp(layout, trace, targets, to_embedding=True).embedded
    assert torch.allclose(embedded.sum((1, 2)), torch.ones(3, dtype=torch.float64), atol=1e-6)
    tokens_share, _ = add_rule(trace.tokens, trace.position.expand_as(trace.tokens), embedded, stabilised_divide())
    pixels = pixel_relevance(layout, trace, embedded)
    assert torch.allclose(pixels.sum((1, 2, 3)), tokens_share[:, 1:].sum((1, 2)), rtol=1e-6)
    assert torch.allclose(_attribute("full_lrp", model, images, targets).sum((1, 2)), pixels.sum((1, 2, 3)))


# ----------------------------------------------------------------------------- 5. attention rollout


@pytest.mark.parametrize("head_fusion, discard_ratio", [("mean", 0.0), ("max", 0.5), ("min", 0.9)])
def test_attention_rollout_matrices_are_row_stochastic(tiny_vit, head_fusion, discard_ratio):
    trace = vit_forward(vit_layout(tiny_vit), _images(tiny_vit))
    attentions = [block.attention for block in trace.blocks]
    matrices = attention_rollout_matrices(attentions, head_fusion, discard_ratio)
    for matrix in matrices + [joint_attention(matrices)]:
        assert torch.allclose(matrix.sum(-1), torch.ones(matrix.shape[:-1]), atol=1e-5)
    if discard_ratio:
        first = matrices[0]
        assert (first[..., 0] > 0).all()  # the class-token column is never discarded
        assert ((first == 0).sum(-1) >= int(discard_ratio * 16) - 1).all()  # (the diagonal keeps its +1)
    raw = _attribute("attention_rollout", tiny_vit, _images(tiny_vit), torch.zeros(3, dtype=torch.long),
                     head_fusion=head_fusion, discard_ratio=discard_ratio)
    assert torch.allclose(raw.flatten(1), joint_attention(matrices)[:, 0, 1:])


# ----------------------------------------------------------------------------- 6, 7. model patches


def test_fused_attention_is_switched_off_for_the_pass_and_restored(tiny_vit):
    model = copy.deepcopy(tiny_vit)
    images, targets = _images(model), torch.tensor([1, 2, 3])
    results = {}
    for fused in (True, False):
        for block in model.blocks:
            block.attn.fused_attn = fused
        for method in ("raw_attention", "attention_rollout", "transformer_attribution"):
            results[fused, method] = _attribute(method, model, images, targets)
        assert all(block.attn.fused_attn is fused for block in model.blocks)
    for method in ("raw_attention", "attention_rollout", "transformer_attribution"):
        assert results[True, method].abs().sum() > 0
        assert torch.equal(results[True, method], results[False, method])


class _Boom(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_patches_are_undone_when_the_pass_fails(tiny_vit, hf_vit):
    timm_model, hf_model = copy.deepcopy(tiny_vit), copy.deepcopy(hf_vit)
    for block in timm_model.blocks:
        block.attn.fused_attn = True
    timm_model.blocks[5].mlp.act = _Boom()
    hf_model.hf.config._attn_implementation = "sdpa"
    hf_model.hf.vit.layers[1].mlp.activation_fn = _Boom()
    for model in (timm_model, hf_model):
        model.train()
        hooks = _hook_count(model)
        with pytest.raises(RuntimeError, match="boom"):
            _attribute("transformer_attribution", model, _images(model, 2), torch.tensor([0, 1]))
        assert model.training and _hook_count(model) == hooks
    assert all(block.attn.fused_attn for block in timm_model.blocks)
    assert hf_model.hf.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- 8. real DINOv2 weights


def test_every_method_on_real_dinov2_weights_gives_the_patch_grid(dinov2):
    model, images = dinov2
    for method in VIT_METHODS:
        explanation = explain(model, images, method=method)
        expected = (2, 224, 224) if method == "full_lrp" else (2, 16, 16)
        assert explanation.raw.shape == expected, method
        assert torch.isfinite(explanation.raw).all() and (explanation.raw.flatten(1).abs().sum(1) > 0).all(), method
        assert explanation.maps.shape == (2, 224, 224)


# ----------------------------------------------------------------------------- 9. a known answer


def _one_patch_vit(patch):
    """A 2-block ViT whose every query attends to `patch` alone (the other softmax weights
    underflow to exactly 0), so the class token, and the logits, see that patch only."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=2)
    model = model.double().eval()
    gate, dim, heads = 0, model.embed_dim, model.blocks[0].attn.num_heads
    head_dim = dim // heads
    with torch.no_grad():
        # channel `gate` carries position only: +100 at `patch`, -100 everywhere else, in every block
        for tensor in (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.cls_token[0, 0]):
            tensor[gate] = 0
        model.pos_embed[..., gate] = -100.0
        model.pos_embed[0, 1 + patch, gate] = 100.0
        for block in model.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight[gate], layer.bias[gate] = 0, 0
            qkv = block.attn.qkv
            qkv.weight[: 2 * dim], qkv.bias[: 2 * dim] = 0, 0
            for h in range(heads):
                qkv.bias[h * head_dim] = 1000.0  # every query is the same: a score gap of thousands
                qkv.weight[dim + h * head_dim, gate] = 1.0  # keys read the gate channel
    return model


def test_a_model_that_sees_one_patch_is_attributed_to_that_patch():
    patch = 5  # row 1, column 1 of the 4x4 grid
    model = _one_patch_vit(patch)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    elsewhere = images.clone()
    elsewhere[..., 32:, :] = 0.0
    elsewhere[..., :16, :] = 5.0
    nearby = images.clone()
    nearby[..., 16:32, 16:32] += 1.0
    with torch.no_grad():
        assert torch.equal(model(elsewhere), model(images))  # only patch 5 can move the output ...
        assert not torch.allclose(model(nearby), model(images))  # ... and it does
    nonzero = {}
    for method in ("transformer_attribution", "attention_gradcam"):
        maps = torch.stack([_attribute(method, model, images, torch.full((2,), c)).flatten(1) for c in range(10)])
        assert (maps[..., patch] >= 0).all() and maps.sum(-1).gt(0).any(), method
        assert torch.equal(maps.abs().sum(-1), maps[..., patch]), method  # all the mass is on the patch
        nonzero[method] = maps[..., patch].gt(0).float().mean().item()
    assert nonzero["transformer_attribution"] == 1.0
    # Grad-CAM clamps at 0: classes whose mean gradient on the CLS row is negative get an empty map
    assert nonzero["attention_gradcam"] >= 0.5


# ----------------------------------------------------------------------------- 10. model randomisation


def _spearman(a, b):
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()))


def test_randomised_weights_change_the_transformer_attribution_map(dinov2):
    model, images = dinov2
    targets = torch.tensor([0, 1])
    trained = _attribute("transformer_attribution", model, images, targets)
    randomised = copy.deepcopy(model)
    torch.manual_seed(1)
    randomised.init_weights()
    random_maps = _attribute("transformer_attribution", randomised, images, targets)
    again = _attribute("transformer_attribution", model, images, targets)  # randomising the copy left the model alone
    ramp = torch.arange(10.0)
    assert _spearman(ramp, ramp.flip(0)) == pytest.approx(-1.0) and _spearman(ramp, ramp**3) == pytest.approx(1.0)
    for i in range(2):
        assert _spearman(trained[i].flatten(), again[i].flatten()) == pytest.approx(1.0)
        assert _spearman(trained[i].flatten(), random_maps[i].flatten()) < 0.5


# ----------------------------------------------------------------------------- options


def test_float64_computation_of_a_float32_model_is_the_float64_model_map(tiny_vit):
    """The float32 pass is ill-conditioned (see the module's docstring); compute_dtype gives the
    exact map of the same weights without touching the caller's model."""
    images, targets = _images(tiny_vit), torch.tensor([0, 1, 2])
    exact = _attribute("transformer_attribution", tiny_vit, images, targets, compute_dtype=torch.float64)
    model64 = copy.deepcopy(tiny_vit).double()
    assert torch.allclose(exact, _attribute("transformer_attribution", model64, images.double(), targets), rtol=1e-12)
    assert tiny_vit.head.weight.dtype == torch.float32


def test_sign_aware_stabiliser_is_an_option_and_unknown_options_are_named(tiny_vit):
    images, targets = _images(tiny_vit), torch.tensor([0, 1, 2])
    sign_aware = _attribute("transformer_attribution", tiny_vit, images, targets, stabilizer="sign_aware")
    assert sign_aware.shape == (3, 4, 4) and torch.isfinite(sign_aware).all()
    with pytest.raises(XtlError, match="stabilizer"):
        _attribute("transformer_attribution", tiny_vit, images, targets, stabilizer="zennit")
    with pytest.raises(XtlError, match="no option .head_fusion.; its options: verify=True, compute_dtype=None, stabilizer="):
        _attribute("transformer_attribution", tiny_vit, images, targets, head_fusion="max")
