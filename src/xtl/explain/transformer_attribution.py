"""Chefer et al. (CVPR 2021) transformer attribution for ViTs, and the paper's baselines.

Written from the paper and `../shared/docs/chefer-transformer-attribution.md` (the formulas the
authors' reference implementation computes). The forward pass is recomputed here from the model's
weights for the whole batch, attention probabilities explicit; autograd serves only for
`grad_b = d y_c / d A_b`; the LRP relevance pass then runs rule by rule, also batched (every sum
a rule takes "over the whole tensor" is taken per image).

Registered methods (ViTs only): `transformer_attribution`, `lrp_rollout`, `partial_lrp`,
`full_lrp` (a pixel map [B, H, W]), `raw_attention`, `attention_rollout`, `attention_gradcam`.
Every other method returns the raw patch-grid map [B, h, w], row-major, prefix tokens dropped.

Options:
- `stabilizer="reference"` (default): the reference's non-sign-aware `a / (b + 1e-9)`;
  `"sign_aware"` adds 1e-9 with the sign of `b` instead. The LRP pass is ill-conditioned in
  float32 (residual-stream elements near 1e-8 meet the 1e-9 stabiliser, `A v` and `q kᵀ`
  cancel), so float32 and float64 maps of the same weights can differ by tens of percent;
  the sign-aware variant does not cure that, and it moves maps (on a random-init ViT-Ti in
  float64 by about 0.1 % of the map's maximum): it is a stabilised variant, not the paper's method.
- `start_layer=0` (the rollouts and transformer_attribution): the first block of the product.
- `head_fusion="mean"|"max"|"min"`, `discard_ratio=0.0` (attention_rollout only).
- `compute_dtype=torch.float64`: explain a float64 copy of the model, i.e. the exact map of
  its weights; costs a copy of the model per call (see the numerics note above).
- `verify=True`: compare the recomputed logits with the model's own forward (one more forward
  pass) and raise if they differ, so that an unsupported model variant cannot pass silently.

Supported models: timm `VisionTransformer` (class token, register tokens, LayerScale,
`global_pool="token"`), Hugging Face `ViTForImageClassification` inside `HFClassifier`, and
torchvision `VisionTransformer` (`vit_b_16` and kin; only images of the `image_size` it was built
with, as its own forward asserts; a `representation_size` pre-logits head is refused).
Beyond the spec (written for the plain ViT): LayerScale multiplies a branch elementwise, a
one-to-one connection, so it passes relevance unchanged (any conservative rule does; the
residual add rule still sees the scaled branch); register tokens are ordinary tokens to every
rule and to the rollouts, and are dropped from the maps like the class token.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xtl.errors import XtlError
from xtl.explain.base import ExplainMethod, keyword_defaults, register_method, tokens_to_grid
from xtl.models import ModelDescription

EPSILON = 1e-9
Divide = Callable[[Tensor, Tensor], Tensor]

# ----------------------------------------------------------------------------- the model as weights


@dataclass(frozen=True)
class BlockWeights:
    """One pre-norm block: `h + ls1(proj(attention(norm1(h))))`, then `+ ls2(fc2(act(fc1(norm2(.)))))`."""

    norm1: nn.Module
    qkv_weight: Tensor  # [3D, D], output rows ordered (q|k|v, head, head_dim)
    qkv_bias: Tensor | None
    num_heads: int
    scale: float
    proj: nn.Linear
    layer_scale1: Tensor | None
    norm2: nn.Module
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    layer_scale2: Tensor | None


@dataclass(frozen=True)
class VitLayout:
    """What the forward and relevance passes read from a timm or Hugging Face ViT."""

    patch_conv: nn.Conv2d
    patch_norm: nn.Module
    prefix_tokens: Tensor  # [1, P, D]: the class token first, then register tokens
    position: Callable[[tuple[int, int]], Tensor | None]  # grid -> [1, P+N or N, D]
    position_covers_prefix: bool
    norm_pre: nn.Module
    blocks: list[BlockWeights]
    final_norm: nn.Module
    fc_norm: nn.Module
    head: nn.Linear

    @property
    def num_prefix(self) -> int:
        return self.prefix_tokens.shape[1]


def vit_layout(model: nn.Module) -> VitLayout:
    """Read a supported ViT's weights and modules; an XtlError names what is not supported."""
    from xtl.models.hf import HFClassifier

    if isinstance(model, HFClassifier):
        return _hf_layout(model.hf)
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return _timm_layout(model)
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

    if isinstance(model, TorchvisionViT):
        return _torchvision_layout(model)
    raise XtlError("transformer attribution supports timm VisionTransformer, torchvision VisionTransformer and "
                   f"HF ViT, not {type(model).__name__}")


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise XtlError(f"transformer attribution does not support this ViT: {what}")


def _timm_layout(model: nn.Module) -> VitLayout:
    from timm.layers import resample_abs_pos_embed

    _require(model.cls_token is not None and model.global_pool == "token", "it needs a class token read by the head")
    _require(getattr(model, "attn_pool", None) is None, "attention pooling")
    _require(isinstance(model.head, nn.Linear), "the head is not a Linear layer")
    patch_embed = model.patch_embed
    _require(isinstance(getattr(patch_embed, "proj", None), nn.Conv2d), "the patch embedding is not one convolution")
    _require(not getattr(patch_embed, "dynamic_img_pad", False), "dynamic image padding")
    prefix = [model.cls_token] + ([model.reg_token] if model.reg_token is not None else [])
    prefix_count = model.num_prefix_tokens

    def position(grid: tuple[int, int]) -> Tensor | None:
        if model.pos_embed is None or not model.dynamic_img_size:
            return model.pos_embed
        return resample_abs_pos_embed(
            model.pos_embed, new_size=grid, old_size=patch_embed.grid_size,
            num_prefix_tokens=0 if model.no_embed_class else prefix_count,
        )

    return VitLayout(
        patch_conv=patch_embed.proj, patch_norm=patch_embed.norm, prefix_tokens=torch.cat(prefix, dim=1),
        position=position, position_covers_prefix=not model.no_embed_class, norm_pre=model.norm_pre,
        blocks=[_timm_block(i, block) for i, block in enumerate(model.blocks)],
        final_norm=model.norm, fc_norm=model.fc_norm, head=model.head,
    )


def _timm_block(index: int, block: nn.Module) -> BlockWeights:
    from timm.layers import Attention, LayerScale, Mlp
    from timm.models.vision_transformer import Block

    _require(type(block) is Block, f"block {index} is a {type(block).__name__}")
    attn, mlp = block.attn, block.mlp
    _require(type(attn) is Attention, f"block {index} attention is a {type(attn).__name__}")
    plain = all(isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm))
    _require(plain and getattr(attn, "gate", None) is None, f"block {index} has q/k or output norms or a gate")
    _require(type(mlp) is Mlp and isinstance(mlp.norm, nn.Identity), f"block {index} MLP is a {type(mlp).__name__}")

    def gamma(scale: nn.Module) -> Tensor | None:
        _require(isinstance(scale, (LayerScale, nn.Identity)), f"block {index} layer scale is a {type(scale).__name__}")
        return scale.gamma if isinstance(scale, LayerScale) else None

    return BlockWeights(
        norm1=block.norm1, qkv_weight=attn.qkv.weight, qkv_bias=attn.qkv.bias, num_heads=attn.num_heads,
        scale=attn.scale, proj=attn.proj, layer_scale1=gamma(block.ls1), norm2=block.norm2,
        fc1=mlp.fc1, act=mlp.act, fc2=mlp.fc2, layer_scale2=gamma(block.ls2),
    )


def _hf_layout(hf: nn.Module) -> VitLayout:
    vit = getattr(hf, "vit", None)
    _require(vit is not None and hasattr(vit, "layers") and isinstance(hf.classifier, nn.Linear),
             f"Hugging Face {type(hf).__name__} (only ViTForImageClassification, transformers 5 layout)")
    embeddings = vit.embeddings
    return VitLayout(
        patch_conv=embeddings.patch_embeddings.projection, patch_norm=nn.Identity(),
        prefix_tokens=embeddings.cls_token, position=lambda grid: embeddings.position_embeddings,
        position_covers_prefix=True, norm_pre=nn.Identity(), blocks=[_hf_block(layer) for layer in vit.layers],
        final_norm=vit.layernorm, fc_norm=nn.Identity(), head=hf.classifier,
    )


def _hf_block(layer: nn.Module) -> BlockWeights:
    attn = layer.attention
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    biases = [p.bias for p in projections]
    return BlockWeights(
        norm1=layer.layernorm_before, qkv_weight=torch.cat([p.weight for p in projections]),
        qkv_bias=None if any(b is None for b in biases) else torch.cat(biases),
        num_heads=attn.num_attention_heads, scale=attn.scaling, proj=attn.o_proj, layer_scale1=None,
        norm2=layer.layernorm_after, fc1=layer.mlp.fc1, act=layer.mlp.activation_fn, fc2=layer.mlp.fc2,
        layer_scale2=None,
    )


def _torchvision_layout(model: nn.Module) -> VitLayout:
    """torchvision's `VisionTransformer` (`vit_b_16` and kin): one class token, the position
    embedding on every token, `heads.head` reading the final norm's class token. It accepts only
    images of the `image_size` it was built with (its forward asserts so), and so does this reader."""
    _require(isinstance(model.conv_proj, nn.Conv2d), "the patch embedding is a convolution stem, not one convolution")
    heads = list(model.heads.named_children())
    _require(len(heads) == 1 and heads[0][0] == "head" and isinstance(model.heads.head, nn.Linear),
             "the head has a pre_logits layer (representation_size) or is not one Linear layer")
    encoder, expected = model.encoder, (model.image_size // model.patch_size,) * 2

    def position(grid: tuple[int, int]) -> Tensor:
        if tuple(grid) != expected:
            raise XtlError(f"torchvision VisionTransformer takes only {model.image_size}x{model.image_size} images "
                           f"(its image_size), not a {grid[0]}x{grid[1]} patch grid")
        return encoder.pos_embedding

    return VitLayout(
        patch_conv=model.conv_proj, patch_norm=nn.Identity(), prefix_tokens=model.class_token, position=position,
        position_covers_prefix=True, norm_pre=nn.Identity(),
        blocks=[_torchvision_block(i, block) for i, block in enumerate(encoder.layers)],
        final_norm=encoder.ln, fc_norm=nn.Identity(), head=model.heads.head,
    )


def _torchvision_block(index: int, block: nn.Module) -> BlockWeights:
    from torchvision.models.vision_transformer import EncoderBlock

    _require(type(block) is EncoderBlock, f"block {index} is a {type(block).__name__}")
    attn, mlp = block.self_attention, block.mlp
    _require(type(attn) is nn.MultiheadAttention and attn.batch_first and attn._qkv_same_embed_dim
             and attn.bias_k is None and attn.bias_v is None and not attn.add_zero_attn,
             f"block {index} attention is not a plain batch-first nn.MultiheadAttention with one in_proj")
    layers = list(mlp)
    _require(len(layers) == 5 and isinstance(layers[0], nn.Linear) and isinstance(layers[3], nn.Linear)
             and all(isinstance(m, nn.Dropout) for m in (layers[2], layers[4])),
             f"block {index} MLP is not Linear, activation, Dropout, Linear, Dropout")
    # in_proj rows are (q|k|v, head, head_dim), as timm's qkv; MHA scales q by head_dim ** -0.5
    return BlockWeights(
        norm1=block.ln_1, qkv_weight=attn.in_proj_weight, qkv_bias=attn.in_proj_bias, num_heads=attn.num_heads,
        scale=attn.head_dim ** -0.5, proj=attn.out_proj, layer_scale1=None, norm2=block.ln_2,
        fc1=layers[0], act=layers[1], fc2=layers[3], layer_scale2=None,
    )


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Within: eval mode, timm attention without SDPA (`fused_attn` off), HF attention eager, and
    `nn.MultiheadAttention` (torchvision) on its explicit `softmax(q kᵀ) v` path: its fast path
    off and `need_weights=True` forced (the weights are computed, then dropped by the caller).
    Everything is restored on exit, also after an exception."""
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    hf_config = getattr(getattr(model, "hf", None), "config", None)
    hf_attention = getattr(hf_config, "_attn_implementation", None)
    multihead = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    handles = []
    was_training = model.training
    try:
        for module, _ in fused:
            module.fused_attn = False
        if hf_config is not None:
            hf_config._attn_implementation = "eager"
        if multihead:
            torch.backends.mha.set_fastpath_enabled(False)
        for module in multihead:
            handles.append(module.register_forward_pre_hook(_need_weights, with_kwargs=True))
        model.eval()
        yield model
    finally:
        for module, flag in fused:
            module.fused_attn = flag
        if hf_config is not None:
            hf_config._attn_implementation = hf_attention
        for handle in handles:
            handle.remove()
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def _need_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`nn.MultiheadAttention.forward(query, key, value, key_padding_mask, need_weights, ...)`
    with `need_weights=True`: the path that forms the attention probabilities explicitly."""
    if len(args) > 4:
        return (*args[:4], True, *args[5:]), kwargs
    return args, {**kwargs, "need_weights": True}


# ----------------------------------------------------------------------------- the forward pass


@dataclass
class BlockTrace:
    """One block's activations, names as in the spec; tensors [B, N, D] or per head [B, H, N, .]."""

    h: Tensor
    n1: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    attention: Tensor  # A, [B, H, N, N]
    heads_out: Tensor  # A v with the heads concatenated: the proj input, [B, N, D]
    branch1: Tensor  # ls1(proj(heads_out))
    hm: Tensor
    n2: Tensor
    hidden: Tensor  # act(fc1(n2)): the fc2 input
    branch2: Tensor  # ls2(fc2(hidden))
    attention_gradient: Tensor | None = None  # d y_c / d A


@dataclass
class ForwardTrace:
    images: Tensor
    tokens: Tensor  # [B, P+N, D]: prefix tokens and patch embeddings, before the position embedding
    position: Tensor | None
    blocks: list[BlockTrace]
    cls_normed: Tensor  # the final norm's output at the class token, [B, D]
    pooled: Tensor  # the head's input, [B, D]
    logits: Tensor
    grid: tuple[int, int]
    num_prefix: int


def vit_forward(layout: VitLayout, images: Tensor, targets: Tensor | None = None) -> ForwardTrace:
    """The model's forward, recomputed with every activation kept; with `targets`, also
    `d logit[target] / d A_b` for every block (each image's own logit)."""
    images = images.to(layout.patch_conv.weight.dtype).detach()
    with torch.enable_grad() if targets is not None else torch.no_grad():
        images.requires_grad_(targets is not None)  # so that the graph reaches A even with frozen weights
        trace = _forward(layout, images)
        if targets is not None:
            chosen = trace.logits.gather(1, targets.view(-1, 1)).sum()
            gradients = torch.autograd.grad(chosen, [block.attention for block in trace.blocks])
            for block, gradient in zip(trace.blocks, gradients):
                block.attention_gradient = gradient
    return _detached(trace)


def _forward(layout: VitLayout, images: Tensor) -> ForwardTrace:
    patches = layout.patch_conv(images)
    grid = (patches.shape[-2], patches.shape[-1])
    patches = layout.patch_norm(patches.flatten(2).transpose(1, 2))
    prefix = layout.prefix_tokens.expand(images.shape[0], -1, -1)
    tokens = torch.cat([prefix, patches], dim=1)
    position = layout.position(grid)
    h = layout.norm_pre(_add_position(layout, tokens, position))
    blocks = []
    for weights in layout.blocks:
        block = _block_forward(weights, h)
        blocks.append(block)
        h = block.hm + block.branch2
    cls_normed = layout.final_norm(h[:, 0])
    pooled = layout.fc_norm(cls_normed)
    return ForwardTrace(images, tokens, position, blocks, cls_normed, pooled, layout.head(pooled), grid,
                        layout.num_prefix)


def _add_position(layout: VitLayout, tokens: Tensor, position: Tensor | None) -> Tensor:
    if position is None:
        return tokens
    start = position_start(layout, tokens, position)
    return torch.cat([tokens[:, :start], tokens[:, start:] + position], dim=1)


def position_start(layout: VitLayout, tokens: Tensor, position: Tensor) -> int:
    """The first token the position embedding is added to; one line when the counts disagree."""
    start = 0 if layout.position_covers_prefix else layout.num_prefix
    if position.shape[1] != tokens.shape[1] - start:
        raise XtlError(f"the position embedding has {position.shape[1]} tokens, the image gives "
                       f"{tokens.shape[1] - start}: use the model's input size")
    return start


def _block_forward(weights: BlockWeights, h: Tensor) -> BlockTrace:
    batch, count, _ = h.shape
    n1 = weights.norm1(h)
    qkv = F.linear(n1, weights.qkv_weight, weights.qkv_bias).reshape(batch, count, 3, weights.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attention = ((q * weights.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    heads_out = (attention @ v).transpose(1, 2).reshape(batch, count, -1)
    branch1 = _layer_scale(weights.layer_scale1, weights.proj(heads_out))
    hm = h + branch1
    n2 = weights.norm2(hm)
    hidden = weights.act(weights.fc1(n2))
    branch2 = _layer_scale(weights.layer_scale2, weights.fc2(hidden))
    return BlockTrace(h, n1, q, k, v, attention, heads_out, branch1, hm, n2, hidden, branch2)


def _layer_scale(gamma: Tensor | None, x: Tensor) -> Tensor:
    return x if gamma is None else x * gamma


def _detached(trace: ForwardTrace) -> ForwardTrace:
    for item in [trace, *trace.blocks]:
        for f in fields(item):
            value = getattr(item, f.name)
            if isinstance(value, Tensor):
                setattr(item, f.name, value.detach())
    return trace


def verify_logits(model: nn.Module, images: Tensor, trace: ForwardTrace) -> None:
    """Raise when the recomputed forward does not reproduce the model's own logits."""
    with torch.no_grad():
        expected = model(images.to(trace.logits.dtype))
    tolerance = (1e-4 if expected.dtype == torch.float64 else 2e-3) * max(1.0, expected.abs().max().item())
    deviation = (trace.logits - expected).abs().max().item()
    if deviation > tolerance:
        raise XtlError(f"transformer attribution cannot reproduce this model's logits (off by {deviation:.3g}): "
                       "an unsupported ViT variant")


# ----------------------------------------------------------------------------- LRP rules


def stabilised_divide(stabilizer: str = "reference") -> Divide:
    """`a ⊘ b`: `a / (b + 1e-9)` where `b != 0`, else 0 ("reference"), or with the 1e-9 signed
    like `b` ("sign_aware")."""
    if stabilizer == "reference":
        def divide(a: Tensor, b: Tensor) -> Tensor:
            denominator = b + EPSILON
            denominator = torch.where(denominator == 0, EPSILON, denominator)  # as the reference does
            return torch.where(b != 0, a / denominator, 0.0)
    elif stabilizer == "sign_aware":
        def divide(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(b != 0, a / (b + torch.where(b >= 0, EPSILON, -EPSILON)), 0.0)
    else:
        raise XtlError(f"unknown stabilizer '{stabilizer}'; known: reference, sign_aware")
    return divide


def linear_rule(x: Tensor, weight: Tensor, relevance: Tensor, divide: Divide) -> Tensor:
    """alpha=1, beta=0 through `x @ weight.T` (bias ignored): the relevance of `x`."""
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    ratio = divide(relevance, F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg))
    return x_pos * (ratio @ w_pos) + x_neg * (ratio @ w_neg)


def add_rule(a: Tensor, b: Tensor, relevance: Tensor, divide: Divide) -> tuple[Tensor, Tensor]:
    """`z = a + b`: shares `a ⊙ (R ⊘ z)` and `b ⊙ (R ⊘ z)`, rescaled per image so that their
    totals are in proportion |Σa| : |Σb| and add up to ΣR."""
    ratio = divide(relevance, a + b)
    relevance_a, relevance_b = a * ratio, b * ratio
    dims = tuple(range(1, relevance.ndim))
    sum_a, sum_b = relevance_a.sum(dims, keepdim=True), relevance_b.sum(dims, keepdim=True)
    total, both = relevance.sum(dims, keepdim=True), sum_a.abs() + sum_b.abs()
    share_a, share_b = divide(sum_a.abs(), both) * total, divide(sum_b.abs(), both) * total
    return relevance_a * divide(share_a, sum_a), relevance_b * divide(share_b, sum_b)


def fork_rule(x: Tensor, skip: Tensor, branch: Tensor, divide: Divide) -> Tensor:
    """The residual stream forks into skip and branch: `x ⊙ (R1 ⊘ x + R2 ⊘ x)`."""
    return x * (divide(skip, x) + divide(branch, x))


def attention_value_rule(attention: Tensor, v: Tensor, relevance: Tensor, divide: Divide) -> tuple[Tensor, Tensor]:
    """`o = A v` per head: (R_A, R_v), each half of the relevance."""
    ratio = divide(relevance, attention @ v)
    return attention * (ratio @ v.transpose(-2, -1)) / 2, v * (attention.transpose(-2, -1) @ ratio) / 2


def query_key_rule(q: Tensor, k: Tensor, relevance: Tensor, divide: Divide) -> tuple[Tensor, Tensor]:
    """`q kᵀ` (softmax and the d^-½ scale pass relevance unchanged): (R_q, R_k)."""
    ratio = divide(relevance, q @ k.transpose(-2, -1))
    return q * (ratio @ k) / 2, k * (ratio.transpose(-2, -1) @ q) / 2


def patch_conv_rule(images: Tensor, conv: nn.Conv2d, relevance: Tensor, stabilizer: str) -> Tensor:
    """z^B rule through the patch convolution, bounds L, H = each image's min and max pixel."""
    low = images.amin(dim=(1, 2, 3), keepdim=True).expand_as(images)
    high = images.amax(dim=(1, 2, 3), keepdim=True).expand_as(images)
    w_pos, w_neg = conv.weight.clamp(min=0), conv.weight.clamp(max=0)

    def forward(x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, stride=conv.stride, padding=conv.padding)

    z = forward(images, conv.weight) - forward(low, w_pos) - forward(high, w_neg)
    ratio = relevance / (z + EPSILON) if stabilizer == "reference" else stabilised_divide(stabilizer)(relevance, z)
    extra = images.shape[-1] - ((z.shape[-1] - 1) * conv.stride[1] - 2 * conv.padding[1] + conv.kernel_size[1])

    def backward(w: Tensor) -> Tensor:
        return F.conv_transpose2d(ratio, w, stride=conv.stride, padding=conv.padding, output_padding=extra)

    return images * backward(conv.weight) - low * backward(w_pos) - high * backward(w_neg)


# ----------------------------------------------------------------------------- the relevance pass


@dataclass
class Relevance:
    attention: list[Tensor | None]  # R_A per block [B, H, N, N]; None below the lowest block asked for
    embedded: Tensor | None = None  # at the first block's input, when the pass went that far


def lrp(layout: VitLayout, trace: ForwardTrace, targets: Tensor, stabilizer: str = "reference",
        lowest_block: int = 0, to_embedding: bool = False) -> Relevance:
    """The LRP pass from `onehot(target)` at the head down to block `lowest_block` (and on to the
    embedding with `to_embedding`)."""
    divide = stabilised_divide(stabilizer)
    with torch.no_grad():
        start = F.one_hot(targets, trace.logits.shape[1]).to(trace.logits.dtype)
        pooled = linear_rule(trace.pooled, layout.head.weight, start, divide)
        # fc_norm and the final LayerNorm pass relevance unchanged; pooling gives it all to token 0
        relevance = torch.zeros_like(trace.blocks[-1].h)
        relevance[:, 0] = trace.cls_normed * divide(pooled, trace.cls_normed)
        attention: list[Tensor | None] = [None] * len(trace.blocks)
        for index in range(len(trace.blocks) - 1, lowest_block - 1, -1):
            go_on = index > lowest_block or to_embedding
            relevance, attention[index] = _block_relevance(
                layout.blocks[index], trace.blocks[index], relevance, divide, go_on)
    return Relevance(attention, relevance if to_embedding else None)


def _block_relevance(weights: BlockWeights, block: BlockTrace, relevance: Tensor, divide: Divide,
                     to_input: bool) -> tuple[Tensor | None, Tensor]:
    skip, branch = add_rule(block.hm, block.branch2, relevance, divide)
    # LayerScale passes `branch` unchanged to fc2; GELU and LayerNorm pass relevance unchanged.
    hidden = linear_rule(block.hidden, weights.fc2.weight, branch, divide)
    normed = linear_rule(block.n2, weights.fc1.weight, hidden, divide)
    skip, branch = add_rule(block.h, block.branch1, fork_rule(block.hm, skip, normed, divide), divide)
    heads_out = linear_rule(block.heads_out, weights.proj.weight, branch, divide)
    batch, count, _ = heads_out.shape
    heads_out = heads_out.reshape(batch, count, weights.num_heads, -1).transpose(1, 2)
    attention, value = attention_value_rule(block.attention, block.v, heads_out, divide)
    if not to_input:
        return None, attention
    query, key = query_key_rule(block.q, block.k, attention, divide)
    qkv = torch.stack([query, key, value]).permute(1, 3, 0, 2, 4).reshape(batch, count, -1)
    n1 = linear_rule(block.n1, weights.qkv_weight, qkv, divide)
    return fork_rule(block.h, skip, n1, divide), attention


def pixel_relevance(layout: VitLayout, trace: ForwardTrace, embedded: Tensor, stabilizer: str = "reference") -> Tensor:
    """Full LRP below the blocks: keep the token share of the position add, drop the prefix
    tokens, then the patch convolution (z^B); [B, 3, H, W]."""
    prefix = trace.num_prefix
    with torch.no_grad():
        patches = embedded[:, prefix:]  # norm_pre passes relevance unchanged
        if trace.position is not None:
            start = 0 if layout.position_covers_prefix else prefix
            tokens = trace.tokens[:, start:]
            divide = stabilised_divide(stabilizer)
            kept, _ = add_rule(tokens, trace.position.expand_as(tokens), embedded[:, start:], divide)
            patches = kept[:, prefix - start:]
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, *trace.grid)  # patch_norm passes it on
        return patch_conv_rule(trace.images, layout.patch_conv, grid, stabilizer)


# ----------------------------------------------------------------------------- maps from the passes


def joint_attention(matrices: list[Tensor]) -> Tensor:
    """`J = M_{L-1} ··· M_1 M_0` (later blocks on the left)."""
    joint = matrices[0]
    for matrix in matrices[1:]:
        joint = matrix @ joint
    return joint


def with_identity(matrix: Tensor) -> Tensor:
    return matrix + torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def attention_rollout_matrices(attentions: list[Tensor], head_fusion: str = "mean",
                               discard_ratio: float = 0.0) -> list[Tensor]:
    """Abnar & Zuidema's `M_b`: heads fused, the lowest `discard_ratio` of each row dropped (never
    the class-token column), plus I, rows normalised to sum 1. `attentions`: [B, H, N, N] each."""
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise XtlError(f"unknown head_fusion '{head_fusion}'; known: mean, max, min")
    if not 0.0 <= discard_ratio < 1.0:
        raise XtlError(f"discard_ratio must be in [0, 1), not {discard_ratio}")
    matrices = []
    for attention in attentions:
        fused = _discard_lowest(fuse[head_fusion](attention), discard_ratio)
        matrix = with_identity(fused)
        matrices.append(matrix / matrix.sum(-1, keepdim=True))
    return matrices


def _discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    count = int(ratio * (fused.shape[-1] - 1))
    if count == 0:
        return fused
    ranked = fused.clone()
    ranked[..., 0] = torch.inf  # the class-token column is never dropped
    lowest = ranked.topk(count, dim=-1, largest=False).indices
    return fused.scatter(-1, lowest, 0.0)


def cls_row_map(matrix: Tensor, trace: ForwardTrace) -> Tensor:
    """The class token's row without the prefix columns, as the patch grid [B, h, w]."""
    return tokens_to_grid(matrix[:, 0, trace.num_prefix:], *trace.grid)


# ----------------------------------------------------------------------------- registered methods

class _VitMethod(ExplainMethod):
    """Shared procedure: read the layout, recompute the forward (with attention gradients when
    the method needs them), check it against the model, then make the map (`raw_map`).

    Options: `verify` and `compute_dtype` (every method), then the keyword parameters of the
    method's `raw_map`."""

    families: ClassVar[frozenset[str]] = frozenset({"vit"})
    callable_targets: ClassVar[bool] = False  # relevance starts at one class's logit
    needs_gradients: ClassVar[bool] = False

    def option_defaults(self) -> dict:
        return {"verify": True, "compute_dtype": None, **keyword_defaults(self.raw_map, skip=3)}

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor, spec: ModelDescription | None = None,
                  verify: bool = True, compute_dtype: torch.dtype | None = None, **options) -> Tensor:
        self.check_options(options)
        layout = vit_layout(model)
        if compute_dtype is not None and compute_dtype != layout.patch_conv.weight.dtype:
            model = copy.deepcopy(model).to(compute_dtype)  # the caller's model stays as it is
            layout = vit_layout(model)
        targets = targets.to(images.device).long()
        with explicit_attention(model):
            trace = vit_forward(layout, images, targets if self.needs_gradients else None)
            if verify:
                verify_logits(model, images, trace)
            return self.raw_map(layout, trace, targets, **options)

    def raw_map(self, layout: VitLayout, trace: ForwardTrace, targets: Tensor, **options) -> Tensor:
        raise NotImplementedError


def _check_start_layer(start_layer: int, trace: ForwardTrace) -> int:
    if not 0 <= start_layer < len(trace.blocks):
        raise XtlError(f"start_layer must be in [0, {len(trace.blocks)}), not {start_layer}")
    return start_layer


@register_method
class TransformerAttribution(_VitMethod):
    """Chefer et al.: rollout of `mean_heads(max(grad_b ⊙ R_A,b, 0)) + I`, the CLS row."""

    name = "transformer_attribution"
    reference = "Chefer, Gur & Wolf, Transformer Interpretability Beyond Attention Visualization, CVPR 2021"
    needs_gradients = True

    def raw_map(self, layout, trace, targets, stabilizer="reference", start_layer=0):
        start = _check_start_layer(start_layer, trace)
        relevance = lrp(layout, trace, targets, stabilizer, lowest_block=start)
        pairs = zip(trace.blocks[start:], relevance.attention[start:])
        weighted = [(block.attention_gradient * r).clamp(min=0).mean(1) for block, r in pairs]
        return cls_row_map(joint_attention([with_identity(m) for m in weighted]), trace)


@register_method
class LrpRollout(_VitMethod):
    """Rollout of `mean_heads(max(R_A,b, 0)) + I` (no gradients), the CLS row."""

    name = "lrp_rollout"
    reference = "Chefer et al. 2021 (the LRP rollout baseline of their paper)"

    def raw_map(self, layout, trace, targets, stabilizer="reference", start_layer=0):
        start = _check_start_layer(start_layer, trace)
        relevance = lrp(layout, trace, targets, stabilizer, lowest_block=start)
        positive = [r.clamp(min=0).mean(1) for r in relevance.attention[start:]]
        return cls_row_map(joint_attention([with_identity(m) for m in positive]), trace)


@register_method
class PartialLrp(_VitMethod):
    """`mean_heads(max(R_A, 0))` of the last block, the CLS row."""

    name = "partial_lrp"
    reference = "Voita et al., ACL 2019 (partial LRP), as Chefer et al. 2021 compute it"

    def raw_map(self, layout, trace, targets, stabilizer="reference"):
        last = len(trace.blocks) - 1
        relevance = lrp(layout, trace, targets, stabilizer, lowest_block=last)
        return cls_row_map(relevance.attention[last].clamp(min=0).mean(1), trace)


@register_method
class FullLrp(_VitMethod):
    """LRP down to the pixels, summed over channels: a map [B, H, W] at input size."""

    name = "full_lrp"
    reference = "Binder et al. 2016 (LRP), for transformers as Chefer et al. 2021 compute it"
    signed = True

    def raw_map(self, layout, trace, targets, stabilizer="reference"):
        relevance = lrp(layout, trace, targets, stabilizer, to_embedding=True)
        return pixel_relevance(layout, trace, relevance.embedded, stabilizer).sum(1)


@register_method
class RawAttention(_VitMethod):
    """The last block's attention, mean over heads, the CLS row."""

    name = "raw_attention"
    reference = "the last block's attention, a baseline of Chefer et al. 2021"
    class_discriminative = False
    gradient_based = False

    def raw_map(self, layout, trace, targets):
        return cls_row_map(trace.blocks[-1].attention.mean(1), trace)


@register_method
class AttentionRollout(_VitMethod):
    """Abnar & Zuidema's attention rollout (see `attention_rollout_matrices`), the CLS row."""

    name = "attention_rollout"
    reference = "Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020"
    class_discriminative = False
    gradient_based = False

    def raw_map(self, layout, trace, targets, head_fusion="mean", discard_ratio=0.0, start_layer=0):
        start = _check_start_layer(start_layer, trace)
        attentions = [block.attention for block in trace.blocks[start:]]
        return cls_row_map(joint_attention(attention_rollout_matrices(attentions, head_fusion, discard_ratio)), trace)


@register_method
class AttentionGradCam(_VitMethod):
    """Last block: per head the CLS row of A weighted by the mean gradient on it; mean over
    heads, then clamped at 0."""

    name = "attention_gradcam"
    reference = "Selvaraju et al. 2017 on attention, a baseline of Chefer et al. 2021"
    needs_gradients = True

    def raw_map(self, layout, trace, targets):
        last, prefix = trace.blocks[-1], trace.num_prefix
        cam = last.attention[:, :, 0, prefix:]
        weights = last.attention_gradient[:, :, 0, prefix:].mean(-1, keepdim=True)
        return tokens_to_grid((cam * weights).mean(1).clamp(min=0), *trace.grid)
