"""Layer-wise relevance propagation for CNNs through Zennit: rule sets as data, canonizers per model.

Rule sets (`COMPOSITES`, one method each):
- lrp_epsilon: Zennit's EpsilonGammaBox (Montavon et al. 2019's recommendation for images): z^B
  (box) rule on the pixels with the box = the normalised images of [0, 1] pixels, gamma rule on the
  other convolutions, epsilon rule on the dense layers;
- lrp_alpha_beta: EpsilonAlpha2Beta1Flat: flat rule on the first layer, alpha=2 beta=1 on the
  convolutions, epsilon on the dense layers;
- lrp_zplus: z+ on every convolution and dense layer (Zennit's ZPlus also takes negative inputs).
Activations (ReLU, ReLU6) pass relevance unchanged, average pools and residual sums split it in
proportion to their inputs. The relevance starts at the target logit, so that with a conserving
rule set it sums over the input to that logit. Raw map = relevance summed over channels [B, H, W].

Canonizers (`canonizers_for`) make the model LRP-ready. They are applied to the caller's model for
the call and reverted after, also on errors, as Zennit's own context does (a deep copy per call
cost 2-7 % of the call); `lrp_ready` also switches in-place activations off and freezes the
parameters for the call, and puts back every parameter, buffer, submodule, hook and flag it found:
- torchvision ResNet: zennit.torchvision.ResNetCanonizer (batch norms merged, residual sums as modules);
- EfficientNet-Lite (efficientnet_lite_pytorch): every batch norm merged into the convolution
  before it by name (SequentialMergeBatchNorm merges none: the 'same'-padding convolutions hold a
  padding child, so a convolution is never the leaf right before its batch norm), and the
  MBConv skip connections turned into Sum modules;
- any other CNN: SequentialMergeBatchNorm (merges batch norms that directly follow a convolution
  or dense layer in module order; nothing to do for AlexNet, which has none).

With real weights, biases absorb relevance: on EfficientNet-Lite0 over 99 % of it ends in the
biases of the folded batch norms, mostly in the 3x3 depthwise convolutions (9 inputs per output).
The map is what reaches the pixels; it is normalised like every other map.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from xtl.explain.base import ExplainMethod, keyword_defaults, register_method
from xtl.models import ModelDescription as ModelSpec

# name -> (spec, canonizers, **options) -> zennit Composite
COMPOSITES: dict[str, Callable[..., object]] = {}


def composite(name: str):
    def wrapped(factory: Callable[..., object]) -> Callable[..., object]:
        COMPOSITES[name] = factory
        return factory

    return wrapped


@composite("lrp_epsilon")
def epsilon_gamma_box(spec: ModelSpec, canonizers: list, epsilon: float = 1e-6, gamma: float = 0.25):
    from zennit.composites import EpsilonGammaBox

    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std  # the box: what pixels in [0, 1] become
    return EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma, canonizers=canonizers)


@composite("lrp_alpha_beta")
def epsilon_alpha2_beta1_flat(spec: ModelSpec, canonizers: list, epsilon: float = 1e-6):
    from zennit.composites import EpsilonAlpha2Beta1Flat

    return EpsilonAlpha2Beta1Flat(epsilon=epsilon, canonizers=canonizers)


@composite("lrp_zplus")
def zplus(spec: ModelSpec, canonizers: list):
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import ZPlus
    from zennit.types import Convolution

    layer_map = layer_map_base() + [(Convolution, ZPlus()), (nn.Linear, ZPlus())]
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


class LrpMethod(ExplainMethod):
    """Relevance of the target logit on the model, canonized and hooked for the call only."""

    families = frozenset({"cnn"})
    signed = True
    decomposes_logit = True
    callable_targets = False  # relevance starts at one class's logit

    def option_defaults(self) -> dict:
        """The options of the method's zennit composite (after the description and canonizers)."""
        return keyword_defaults(COMPOSITES[self.name], skip=2)

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelSpec, **options
    ) -> torch.Tensor:
        from zennit.attribution import Gradient  # zennit imports torchvision: loaded on first use

        def start_at_target_logit(logits: torch.Tensor) -> torch.Tensor:
            one_hot = torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0)
            return one_hot * logits.detach()

        inputs = images.detach().clone().requires_grad_(True)
        with lrp_ready(model):
            rules = COMPOSITES[self.name](spec, canonizers_for(model), **options)
            with torch.enable_grad(), Gradient(model, rules, attr_output=start_at_target_logit) as attributor:
                _, relevance = attributor(inputs)
        return relevance.sum(1)


@register_method
class LrpEpsilon(LrpMethod):
    """LRP with Zennit's EpsilonGammaBox: epsilon rule in dense layers, gamma in convolutions, the box (z^B) rule at the input."""

    name = "lrp_epsilon"
    reference = "Bach et al. 2015 (LRP); EpsilonGammaBox composite of Zennit (Anders et al. 2021), Montavon et al. 2019"


@register_method
class LrpAlphaBeta(LrpMethod):
    """LRP with Zennit's EpsilonAlpha2Beta1Flat: alpha=2, beta=1 in convolutions, epsilon in dense layers, flat at the input."""

    name = "lrp_alpha_beta"
    reference = "Bach et al. 2015 (LRP alpha2-beta1); Zennit's EpsilonAlpha2Beta1Flat composite"


@register_method
class LrpZPlus(LrpMethod):
    """LRP with the z+ rule in every convolution and dense layer (deep Taylor decomposition)."""

    name = "lrp_zplus"
    reference = "Montavon et al., Explaining nonlinear classification decisions with deep Taylor decomposition, 2017"


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def lrp_ready(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode, frozen, with out-of-place activations (rules read module inputs later)
    for the block; on exit every module gets back its training flag, `inplace` flag, attributes,
    parameters, buffers, submodules and hooks, every parameter and buffer its data and every
    parameter its `requires_grad`: what Zennit's canonizers revert and what a failure halfway
    through registering them would leave. Nothing is copied, only references are kept."""
    saved = []
    for module in model.modules():
        saved.append((module, module.training, module.__dict__.get("inplace"), set(module.__dict__),
                       dict(module._parameters), dict(module._buffers), dict(module._modules),
                       {name: dict(getattr(module, name)) for name in _HOOK_DICTS if name in module.__dict__}))
    tensors = [(t, t.data, t.requires_grad) for module in model.modules()
               for t in [*module._parameters.values(), *module._buffers.values()] if t is not None]
    try:
        model.eval()
        for tensor, _, _ in tensors:
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(False)
        for module in model.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False
        yield model
    finally:
        for module, training, inplace, attributes, parameters, buffers, modules, hooks in saved:
            for key in set(module.__dict__) - attributes:  # e.g. an overridden forward
                del module.__dict__[key]
            for store, original in ((module._parameters, parameters), (module._buffers, buffers),
                                    (module._modules, modules), *((getattr(module, n), h) for n, h in hooks.items())):
                store.clear()  # by reference: the dicts hold the very objects found on entry
                store.update(original)
            if inplace is not None:
                module.inplace = inplace
            module.training = training
        for tensor, data, requires_grad in tensors:
            if tensor.data is not data:
                tensor.data = data
            if tensor.requires_grad != requires_grad:
                tensor.requires_grad_(requires_grad)


def canonizers_for(model: nn.Module) -> list:
    from efficientnet_lite_pytorch import EfficientNet
    from torchvision.models import ResNet
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    if isinstance(model, ResNet):
        return [ResNetCanonizer()]
    if isinstance(model, EfficientNet):
        return efficientnet_lite_canonizers(model)
    return [SequentialMergeBatchNorm()]


def efficientnet_lite_canonizers(model: nn.Module) -> list:
    from zennit.canonizers import AttributeCanonizer, NamedMergeBatchNorm

    pairs = [(["_conv_stem"], "_bn0"), (["_conv_head"], "_bn1")]
    for index, block in enumerate(model._blocks):
        prefix = f"_blocks.{index}."
        if hasattr(block, "_expand_conv"):
            pairs.append(([prefix + "_expand_conv"], prefix + "_bn0"))
        pairs += [([prefix + "_depthwise_conv"], prefix + "_bn1"), ([prefix + "_project_conv"], prefix + "_bn2")]
    return [NamedMergeBatchNorm(pairs), AttributeCanonizer(_mbconv_with_sum)]


def _mbconv_with_sum(name: str, module: nn.Module) -> dict | None:
    from efficientnet_lite_pytorch.model import MBConvBlock
    from zennit.layer import Sum

    if not isinstance(module, MBConvBlock) or module.has_se:  # -lite blocks have no squeeze-excitation
        return None
    return {"forward": _mbconv_forward.__get__(module), "canonizer_sum": Sum()}


def _mbconv_forward(self, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
    """MBConvBlock.forward in eval mode, with the skip connection through a Sum module."""
    x = inputs
    if self._block_args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(x)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    x = self._bn2(self._project_conv(x))
    args = self._block_args
    if args.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = self.canonizer_sum(torch.stack([inputs, x], dim=-1))
    return x
