"""AttnLRP (Achtibat et al., ICML 2024) and CP-LRP for ViTs, written from the paper, batched.

AttnLRP extends LRP to the attention layer with rules derived from Taylor decompositions, and it
computes them in one backward pass: every rule below is "input times a modified gradient", so the
model's forward is recomputed from its weights (the same reader as Chefer's attribution,
`xtl.explain.transformer_attribution.vit_layout`) with the gradient of each operation replaced
where the rule asks for it, and the pixel relevance is `images * d logit_c / d images`.

The rules, operation by operation (R = relevance, g = the modified gradient, so R_x = x ⊙ g_x):
- linear layers, the patch convolution and the head: the epsilon rule, whose gradient form is the
  plain gradient (biases absorb their share `b ⊙ g_b`);
- residual additions: the epsilon rule on `a + b`, again the plain gradient;
- LayerNorm: the identity rule on the division by the standard deviation, i.e. the standard
  deviation is a constant (detached); the centring and the affine `w x + b` are linear layers;
- GELU (any elementwise activation): the identity rule, R_in = R_out, i.e. `g_in = g_out · act(x)/x`;
- softmax: the paper's bias-absorbing linearisation at the input, `R_s = s ⊙ (R_A − A Σ_j R_A,j)`
  per row, which is exactly the plain gradient times the scores; what the softmax's implicit bias
  takes (`Σ R_A − Σ R_s`) is lost to the input, as the paper says;
- the two matrix products `q kᵀ` and `A v`: the uniform rule, half of the relevance to each
  factor (the gradient to each factor halved: a bilinear map conserves `Σ q g_q = Σ k g_k = Σ z g_z`).

`cp_lrp` (Ali et al., ICML 2022, "conservative propagation") differs in one place: the attention
probabilities are constants (detached), so all of the relevance of `A v` goes to `v` and none to
the queries and keys; softmax absorbs nothing.

The maps equal those of LXT 2.1, the authors' library, on the same Hugging Face ViT weights (LXT
puts the halves on q, k and v instead of on A, which is the same gradient; its 1e-10 in the GELU
rule is the only difference: tests/test_explain_attnlrp_lxt.py).

The map is the pixel relevance summed over the colour channels, [B, H, W] at input size, signed:
positive is evidence for the class, negative against it. In float64 the pixel relevance plus what
every bias-like tensor (biases, the class and register tokens, the position embedding) and every
softmax absorb equals the explained logit (`attnlrp_pass(..., ledger=True)`, tested).

Supported models: those of Chefer's attribution (timm `VisionTransformer` with class token,
register tokens, LayerScale, any grid; Hugging Face `ViTForImageClassification`; torchvision
`VisionTransformer`), with `nn.LayerNorm` (or no) normalisation layers: another norm is refused
in one line. Not supported, and why: attention pooling and mean-pooled heads (the layout reader
refuses them), q/k normalisation, and the gamma rule on the linear layers that the AttnLRP authors
use for sharper ViT pictures (it is a different rule, not a numerical setting).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xtl.errors import XtlError
from xtl.explain.base import ExplainMethod, register_method
from xtl.explain.transformer_attribution import (
    BlockWeights,
    VitLayout,
    _add_position,
    position_start,
    verify_logits,
    vit_layout,
)
from xtl.models import ModelDescription

ATTENTION_RULES = ("uniform", "constant")  # AttnLRP, CP-LRP


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant (the uniform rule)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def halved(x: Tensor) -> Tensor:
    return _ScaleGradient.apply(x, 0.5)


def identity_rule(activation: nn.Module, x: Tensor) -> Tensor:
    """`activation(x)` whose gradient is `act(x) / x` (zero where x = 0): R_in = R_out elementwise."""
    out = activation(x)
    ratio = torch.where(x != 0, out / torch.where(x != 0, x, 1), 0).detach()
    return x * ratio


def layer_norm_rule(norm: nn.Module, x: Tensor, ledger: "Ledger | None") -> Tensor:
    """LayerNorm with its standard deviation constant; Identity stays identity."""
    if isinstance(norm, nn.Identity):
        return x
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise XtlError(f"AttnLRP supports LayerNorm (or no) normalisation layers, not {type(norm).__name__}")
    centred = x - x.mean(-1, keepdim=True)
    std = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt().detach()
    y = centred / std
    if norm.weight is not None:
        y = y * norm.weight
    return y if norm.bias is None else add_bias(ledger, y, norm.bias)


def add_bias(ledger: "Ledger | None", x: Tensor, bias: Tensor) -> Tensor:
    """`x + bias` (broadcast); with a ledger the bias is expanded to `x`'s shape and recorded, so
    that its gradient, and so the relevance it takes, is per image."""
    if ledger is None:
        return x + bias
    expanded = bias.expand_as(x)
    ledger.biases.append(expanded)
    return x + expanded


def _linear(ledger: "Ledger | None", x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight) if bias is None else add_bias(ledger, F.linear(x, weight), bias)


@dataclass
class Ledger:
    """Where relevance goes besides the pixels: the bias-like tensors used in the forward pass,
    and each softmax's (input scores, output probabilities), for the conservation account."""

    biases: list[Tensor] = field(default_factory=list)
    softmax: list[tuple[Tensor, Tensor]] = field(default_factory=list)


@dataclass
class AttnLrpPass:
    """The result of one pass: pixel relevance [B, C, H, W] and the model's logits [B, K]; with a
    ledger, the relevance each bias-like tensor takes and each softmax absorbs, per image [B]."""

    pixels: Tensor
    logits: Tensor
    bias_relevance: Tensor | None = None
    softmax_absorbed: Tensor | None = None


def attnlrp_pass(layout: VitLayout, images: Tensor, targets: Tensor, attention_rule: str = "uniform",
                 ledger: bool = False) -> AttnLrpPass:
    """One forward with the rules' gradients and one backward from `logit[target]` of each image."""
    if attention_rule not in ATTENTION_RULES:
        raise XtlError(f"unknown attention_rule '{attention_rule}'; known: {', '.join(ATTENTION_RULES)}")
    book = Ledger() if ledger else None
    images = images.to(layout.patch_conv.weight.dtype).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = _forward(layout, images, attention_rule, book)
        chosen = logits.gather(1, targets.view(-1, 1)).sum()
        extra = ([t for t in book.biases] + [t for pair in book.softmax for t in pair]) if book else []
        gradients = torch.autograd.grad(chosen, [images, *extra], allow_unused=True)
    pixels = (images * gradients[0]).detach()
    result = AttnLrpPass(pixels, logits.detach())
    if book is not None:
        reference = torch.zeros(len(images), dtype=images.dtype, device=images.device)
        result.bias_relevance, result.softmax_absorbed = _account(book, gradients[1:], reference)
    return result


def _account(book: Ledger, gradients: tuple, reference: Tensor) -> tuple[Tensor, Tensor]:
    """Per image: Σ b ⊙ g_b over the (expanded) bias-like tensors, and Σ (A ⊙ g_A − s ⊙ g_s) over
    the softmaxes."""

    def per_image(tensor: Tensor, gradient: Tensor | None) -> Tensor:
        if gradient is None:
            return torch.zeros_like(reference)
        return (tensor * gradient).detach().flatten(1).sum(1)

    count = len(book.biases)
    biases = sum((per_image(t, g) for t, g in zip(book.biases, gradients[:count])), torch.zeros_like(reference))
    absorbed = torch.zeros_like(reference)
    pairs = gradients[count:]
    for (scores, attention), g_scores, g_attention in zip(book.softmax, pairs[0::2], pairs[1::2]):
        absorbed += per_image(attention, g_attention) - per_image(scores, g_scores)
    return biases, absorbed


def _forward(layout: VitLayout, images: Tensor, attention_rule: str, book: Ledger | None) -> Tensor:
    conv = layout.patch_conv
    patches = F.conv2d(images, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    if conv.bias is not None:
        patches = add_bias(book, patches, conv.bias.view(1, -1, 1, 1))
    grid = (patches.shape[-2], patches.shape[-1])
    patches = layer_norm_rule(layout.patch_norm, patches.flatten(2).transpose(1, 2), book)
    prefix = layout.prefix_tokens.expand(images.shape[0], -1, -1)
    if book is not None:
        book.biases.append(prefix)
    tokens = torch.cat([prefix, patches], dim=1)
    h = layer_norm_rule(layout.norm_pre, _with_position(layout, tokens, layout.position(grid), book), book)
    for weights in layout.blocks:
        h = _block(weights, h, attention_rule, book)
    pooled = layer_norm_rule(layout.fc_norm, layer_norm_rule(layout.final_norm, h[:, 0], book), book)
    return _linear(book, pooled, layout.head.weight, layout.head.bias)


def _with_position(layout: VitLayout, tokens: Tensor, position: Tensor | None, book: Ledger | None) -> Tensor:
    if position is None:
        return tokens
    if book is None:
        return _add_position(layout, tokens, position)
    start = position_start(layout, tokens, position)
    return torch.cat([tokens[:, :start], add_bias(book, tokens[:, start:], position)], dim=1)


def _block(weights: BlockWeights, h: Tensor, attention_rule: str, book: Ledger | None) -> Tensor:
    batch, count, _ = h.shape
    n1 = layer_norm_rule(weights.norm1, h, book)
    qkv = _linear(book, n1, weights.qkv_weight, weights.qkv_bias).reshape(batch, count, 3, weights.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    scores = halved(q * weights.scale) @ halved(k).transpose(-2, -1)
    attention = scores.softmax(dim=-1)
    if attention_rule == "constant":
        heads = attention.detach() @ v
    else:
        if book is not None:
            book.softmax.append((scores, attention))
        heads = halved(attention) @ halved(v)
    heads = heads.transpose(1, 2).reshape(batch, count, -1)
    branch = _linear(book, heads, weights.proj.weight, weights.proj.bias)
    h = h + (branch if weights.layer_scale1 is None else branch * weights.layer_scale1)
    n2 = layer_norm_rule(weights.norm2, h, book)
    hidden = identity_rule(weights.act, _linear(book, n2, weights.fc1.weight, weights.fc1.bias))
    branch = _linear(book, hidden, weights.fc2.weight, weights.fc2.bias)
    return h + (branch if weights.layer_scale2 is None else branch * weights.layer_scale2)


class _AttnLrpMethod(ExplainMethod):
    families: ClassVar[frozenset[str]] = frozenset({"vit"})
    callable_targets: ClassVar[bool] = False  # relevance starts at one class's logit
    signed: ClassVar[bool] = True
    decomposes_logit: ClassVar[bool] = True
    attention_rule: ClassVar[str] = "uniform"

    def attribute(self, model: nn.Module, images: Tensor, targets: Tensor, spec: ModelDescription | None = None,
                  verify: bool = True, compute_dtype: torch.dtype | None = None) -> Tensor:
        """Pixel relevance summed over channels [B, H, W]. `verify` compares the recomputed logits
        with the model's own forward (one more forward pass) so that an unsupported variant cannot
        pass silently; `compute_dtype=torch.float64` explains a float64 copy of the model."""
        layout = vit_layout(model)
        if compute_dtype is not None and compute_dtype != layout.patch_conv.weight.dtype:
            model = copy.deepcopy(model).to(compute_dtype)  # the caller's model stays as it is
            layout = vit_layout(model)
        was_training = model.training
        model.eval()
        try:
            result = attnlrp_pass(layout, images, targets.to(images.device).long(), self.attention_rule)
            if verify:
                verify_logits(model, images, _Logits(result.logits))
        finally:
            model.train(was_training)
        return result.pixels.sum(1)


@dataclass
class _Logits:
    logits: Tensor  # what verify_logits reads from a trace


@register_method
class AttnLrp(_AttnLrpMethod):
    """AttnLRP: LRP through attention with the uniform rule on both matrix products and the
    bias-absorbing softmax rule, in one backward pass; the pixel relevance, summed over channels."""

    name = "attnlrp"
    reference = ("Achtibat et al., AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for "
                 "Transformers, ICML 2024")


@register_method
class CpLrp(_AttnLrpMethod):
    """CP-LRP: as AttnLRP with the attention probabilities held constant, so that relevance flows
    through the values only; the pixel relevance, summed over channels."""

    name = "cp_lrp"
    reference = "Ali et al., XAI for Transformers: Better Explanations through Conservative Propagation, ICML 2022"
    attention_rule = "constant"
