"""Modified-backpropagation methods through Captum: DeepLift, Guided Backprop, Deconvolution.

- deeplift (Shrikumar et al. 2017): Captum's `DeepLift` (the Rescale rule): each nonlinearity's
  gradient is replaced by (output - its output on the baseline) / (input - its input on the
  baseline), so the map sums to logit(image) - logit(baseline) (summation-to-delta). The map is
  (image - baseline) x multipliers summed over the colour channels, signed. `baselines`: None (the
  all-zero input in the model's normalised space, i.e. the data set's mean image), a float, or a
  tensor broadcastable to the images. Cost: one forward pass to check the model, then one forward
  and one backward pass of the images and baselines together ([2B]).
- guided_backprop (Springenberg et al. 2015): the gradient with every ReLU's backward pass also
  rectified (only positive gradient flows back through a ReLU); the map is |that| summed over the
  colour channels. Cost: one forward pass to check the model, one forward and backward pass.
- deconvolution (Zeiler & Fergus 2014): the same, but a ReLU passes back the rectified gradient of
  its output whatever its input's sign (Captum's `Deconvolution`). Same cost and map.

Where they are sound, and what xtl does elsewhere (Captum changes the backward pass by hooks on
*modules*, so only what runs inside a hooked module of the right type is changed; anything else
silently gets the plain gradient, which is a wrong map, not a different flavour):

- DeepLift's rules are exact only for a network made of linear parts (convolutions, linear layers,
  eval-mode batch norm, average pooling, additions, reshapes) and nonlinearities that each run in
  a module of a type Captum has a rule for (`nn.ReLU`, `ELU`, `LeakyReLU`, `Sigmoid`, `Tanh`,
  `Softplus`, `MaxPool1d/2d/3d`, `Softmax`). Before the attribution xtl runs the model once on the
  first image under a torch function mode and refuses, in one line naming the operation and the
  module, a model that applies a nonlinearity outside such a module (functional `F.relu` as in
  torchvision's DenseNet, `GELU`/`SiLU`/`Hardswish` modules, `LayerNorm`, the softmax of
  attention) or multiplies two input-dependent tensors (attention's products, squeeze-and-excitation
  gates): there the Rescale rule is not applied (the plain gradient passes), summation-to-delta
  fails and the map is neither DeepLift nor any other named method. ViTs are refused for that
  reason (LayerNorm, GELU, softmax attention and its products: DeepLift has no rule for them;
  AttnLRP is the conservative method for ViTs) and the method is offered for CNNs and other models.
  A supported module that runs more than once per forward pass (torchvision's ResNet blocks call
  their one `self.relu` two or three times) would keep only its last call's input and reference,
  and Captum either fails or mixes the calls up; xtl handles it: for the call it puts, in the
  caller's model, a stand-in that runs a separate copy of the module at each call, and puts the
  original back after (also on error), so every call gets its own rule.
  Max pooling follows Captum's rule (each window's output difference goes to the argmax of the
  image and of the baseline), which is exact when the baseline is constant over each pooling
  window (the default all-zero baseline through a bias-free first convolution, as in ResNets) but
  otherwise can leave a small part of logit(image) - logit(baseline) unassigned (2% in
  `test_explain_propagation.py` with a constant 0.5 baseline); the summation-to-delta test uses
  ReLU networks with average pooling, and a ResNet from the default baseline.
- Guided Backprop and Deconvolution are defined for ReLU networks: Captum rectifies the gradient at
  `nn.ReLU` modules only (the hook keeps no state, so a ReLU module used several times is fine).
  xtl refuses, in one line, a model with a ReLU applied functionally (it would be left
  unrectified) or with any other activation (GELU, SiLU, ELU, sigmoid, ...: they pass the plain
  gradient, so the map would be "guided" only in part; a ViT would get the plain gradient).
  Max pooling, normalisation and products pass the plain gradient, as in the original method.
- In-place activations (`nn.ReLU(inplace=True)`) are switched to out-of-place for the call and
  switched back after (also on error): the caller's model is unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from xtl.errors import XtlError
from xtl.explain.base import ExplainMethod, register_method
from xtl.models import ModelDescription

# torch operations that are nonlinear in an input-dependent tensor (by __name__: F.relu, torch.relu
# and Tensor.relu all count)
_ACTIVATIONS = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "mish", "elu", "elu_", "selu", "celu", "leaky_relu",
    "leaky_relu_", "prelu", "rrelu", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "softplus", "softsign", "logsigmoid", "glu", "threshold", "threshold_",
})
_NONLINEAR = _ACTIVATIONS | frozenset({
    "softmax", "log_softmax", "_softmax", "softmin", "layer_norm", "group_norm", "instance_norm", "rms_norm",
    "normalize", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool2d",
    "exp", "exp_", "log", "log_", "sqrt", "rsqrt", "pow", "__pow__", "abs", "abs_", "clamp", "clamp_", "clip",
    "maximum", "minimum", "max", "min", "amax", "amin", "erf", "sin", "cos", "reciprocal", "sign",
    "scaled_dot_product_attention",
})
_PRODUCTS = frozenset({
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__", "__itruediv__",
    "matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention",
})


class _Trace(TorchFunctionMode):
    """Records, for one forward pass, the nonlinear operations on input-dependent tensors and the
    products of two input-dependent tensors, each with the innermost module that ran it."""

    def __init__(self, source: torch.Tensor, stack: list[nn.Module]) -> None:
        super().__init__()
        self.derived: dict[int, Any] = {id(source): source}  # id -> tensor (kept alive: ids stay unique)
        self.stack = stack
        self.ops: list[tuple[str, nn.Module | None, bool]] = []  # (name, module, is a product)

    def _is_derived(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and self.derived.get(id(value)) is value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs, _ = tree_flatten((args, kwargs))
        n_derived = sum(self._is_derived(v) for v in inputs)
        if n_derived:
            name = getattr(func, "__name__", "")
            module = self.stack[-1] if self.stack else None
            if name in _PRODUCTS and n_derived >= 2:
                self.ops.append((name, module, True))
            elif name in _NONLINEAR:
                self.ops.append((name, module, False))
            for value in tree_flatten(result)[0]:
                if isinstance(value, torch.Tensor):
                    self.derived[id(value)] = value
        return result


def trace_model(model: nn.Module, image: torch.Tensor) -> tuple[list[tuple[str, nn.Module | None, bool]], dict[nn.Module, int]]:
    """One forward pass of `image` [1, C, H, W] without gradients: the traced operations and how many
    times each module ran. Nothing is left on the model."""
    stack: list[nn.Module] = []
    calls: dict[nn.Module, int] = {}

    def enter(module, _inputs):
        stack.append(module)
        calls[module] = calls.get(module, 0) + 1

    def leave(module, _inputs, _output):
        if stack and stack[-1] is module:
            stack.pop()

    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        source = image.detach().clone()
        trace = _Trace(source, stack)
        with torch.no_grad(), trace:
            model(source)
    finally:
        for handle in handles:
            handle.remove()
    return trace.ops, calls


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(module, name)
    return names


def _where(module: nn.Module | None, names: dict[nn.Module, str]) -> str:
    if module is None or not names.get(module):
        return "in the model's own forward code"
    return f"in module {names[module]} ({type(module).__name__})"


def deeplift_rules() -> dict[type, Any]:
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    return SUPPORTED_NON_LINEAR


def check_deeplift(model: nn.Module, image: torch.Tensor, method: str) -> dict[nn.Module, int]:
    """The supported nonlinear modules that run more than once per forward pass, with their call
    counts; one line (XtlError) when DeepLift's rules do not cover the model."""
    ops, calls = trace_model(model, image)
    rules = deeplift_rules()
    names = _module_names(model)
    for name, module, is_product in ops:
        if is_product:
            raise XtlError(f"method {method} is not sound for {type(model).__name__}: it multiplies two input-dependent "
                           f"tensors ({name} {_where(module, names)}), which DeepLift's rules do not cover "
                           "(attention, gating); use integrated_gradients or an LRP method")
        if module is None or type(module) not in rules:
            raise XtlError(f"method {method} is not sound for {type(model).__name__}: {name} {_where(module, names)} is "
                           "a nonlinearity outside a module DeepLift has a rule for (nn.ReLU, ELU, LeakyReLU, Sigmoid, "
                           "Tanh, Softplus, MaxPool, Softmax), so it would pass the plain gradient; "
                           "use integrated_gradients")
    return {module: n for module, n in calls.items() if type(module) in rules and n > 1}


def check_relu_network(model: nn.Module, image: torch.Tensor, method: str) -> None:
    """One line (XtlError) unless every activation of the model is a ReLU run by an nn.ReLU module."""
    ops, _ = trace_model(model, image)
    names = _module_names(model)
    for name, module, is_product in ops:
        if is_product or name not in _ACTIVATIONS:
            continue
        if name in ("relu", "relu_") and isinstance(module, nn.ReLU):
            continue
        what = "a functional ReLU" if name in ("relu", "relu_") else f"the activation {name}"
        raise XtlError(f"method {method} is defined for ReLU networks with nn.ReLU modules; {type(model).__name__} "
                       f"applies {what} {_where(module, names)}, whose gradient Captum would not rectify; "
                       "use saliency or integrated_gradients")


class _PerCall(nn.Module):
    """Stands in for a module that runs `n` times per forward pass: call k runs copy k (mod n)."""

    def __init__(self, module: nn.Module, n: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(n))
        self.calls = 0

    def forward(self, *args, **kwargs):
        module = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        return module(*args, **kwargs)


@contextlib.contextmanager
def split_reused(model: nn.Module, reused: dict[nn.Module, int]) -> Iterator[None]:
    """Each module of `reused` replaced in its parents by a `_PerCall` stand-in (the call counters
    reset at each forward pass of `model`); the originals put back on exit."""
    if not reused:
        yield
        return
    standins = {module: _PerCall(module, n) for module, n in reused.items()}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def reset(_module, _inputs):
        for standin in standins.values():
            standin.calls = 0

    handle = model.register_forward_pre_hook(reset)
    try:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if child in standins:
                    swapped.append((parent, name, child))
                    parent._modules[name] = standins[child]
        yield
    finally:
        handle.remove()
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


@contextlib.contextmanager
def out_of_place(model: nn.Module) -> Iterator[None]:
    """Every module with `inplace=True` switched to False, switched back on exit."""
    switched = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    try:
        for module in switched:
            module.inplace = False
        yield
    finally:
        for module in switched:
            module.inplace = True


def as_baselines(images: torch.Tensor, baselines: float | torch.Tensor | None) -> torch.Tensor:
    if baselines is None:
        return torch.zeros_like(images)
    if isinstance(baselines, torch.Tensor):
        try:
            return torch.broadcast_to(baselines.to(images), images.shape).contiguous()
        except RuntimeError:
            raise XtlError(f"baselines of shape {tuple(baselines.shape)} do not broadcast to the images "
                           f"{tuple(images.shape)}") from None
    return torch.full_like(images, float(baselines))


@register_method
class DeepLiftMap(ExplainMethod):
    """Shrikumar et al. 2017: Captum's DeepLift (Rescale rule) from `baselines` (None: the all-zero
    normalised input, the mean image), summed over the colour channels; sums to logit(image) -
    logit(baseline). CNNs whose nonlinearities all run in modules DeepLift has a rule for; others
    are refused in one line (a ReLU module used several times is handled)."""

    name = "deeplift"
    families = frozenset({"cnn", "other"})
    signed = True
    reference = "Shrikumar, Greenside & Kundaje, Learning Important Features Through Propagating Activation Differences, ICML 2017"

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription,
        baselines: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        from captum.attr import DeepLift

        inputs = images.detach()
        start = as_baselines(inputs, baselines)
        with out_of_place(model):
            reused = check_deeplift(model, inputs[:1], self.name)
            with split_reused(model, reused), warnings.catch_warnings(), _captum_attributes(model):
                warnings.simplefilter("ignore", UserWarning)
                attributions = DeepLift(model).attribute(inputs.clone().requires_grad_(True), baselines=start,
                                                         target=targets)
        return attributions.sum(1)


@contextlib.contextmanager
def _captum_attributes(model: nn.Module) -> Iterator[None]:
    """Captum's DeepLift stores `input`, `output` (and `input_ref`) on the modules it hooks and deletes
    them in the backward pass; after an error they would stay: removed on exit if they were not there."""
    names = ("input", "output", "input_ref")
    had = {m: [n for n in names if n in m.__dict__] for m in model.modules()}
    try:
        yield
    finally:
        for module, present in had.items():
            for name in names:
                if name not in present and name in module.__dict__:
                    delattr(module, name)


class RectifiedGradient(ExplainMethod):
    """Captum's modified-ReLU gradient (`captum` names the class), |.| summed over the channels."""

    captum: str
    families = frozenset({"cnn", "other"})

    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, spec: ModelDescription
    ) -> torch.Tensor:
        import captum.attr

        inputs = images.detach()
        with out_of_place(model):
            check_relu_network(model, inputs[:1], self.name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                explainer = getattr(captum.attr, self.captum)(model)
                attributions = explainer.attribute(inputs.clone().requires_grad_(True), target=targets)
        return attributions.abs().sum(1)


@register_method
class GuidedBackpropMap(RectifiedGradient):
    """Springenberg et al. 2015: the gradient with the backward pass of every nn.ReLU also rectified
    (Captum's GuidedBackprop), |.| summed over the colour channels. ReLU networks only: a functional
    ReLU or another activation is refused in one line."""

    name = "guided_backprop"
    captum = "GuidedBackprop"
    reference = "Springenberg, Dosovitskiy, Brox & Riedmiller, Striving for Simplicity: The All Convolutional Net, ICLR Workshop 2015"


@register_method
class DeconvolutionMap(RectifiedGradient):
    """Zeiler & Fergus 2014: the backward pass through every nn.ReLU rectifies the gradient of its
    output, whatever its input's sign (Captum's Deconvolution), |.| summed over the colour channels.
    ReLU networks only, as guided_backprop."""

    name = "deconvolution"
    captum = "Deconvolution"
    reference = "Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014"
