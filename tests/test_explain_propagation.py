"""deeplift, guided_backprop and deconvolution: equal to Captum used directly where Captum is sound,
batched equals one by one, DeepLift's summation-to-delta in float64, a ReLU module used twice
handled (equal to Captum on the same network with separate ReLUs), unsound models refused in one
line, and the caller's model left as it was (also after an error)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from xtl.errors import XtlError
from xtl.explain import explain
from xtl.models import ModelDescription

torch.set_num_threads(1)


def _images(n: int, size: int = 16, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


class SmallCNN(nn.Module):
    """conv-relu-maxpool-conv-relu-avgpool-linear; `reuse`: one ReLU module for both activations."""

    def __init__(self, reuse: bool = False, inplace: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = self.relu1 if reuse else nn.ReLU(inplace=inplace)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x):
        return self.head(self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x))))))


class FunctionalReLU(SmallCNN):
    def forward(self, x):
        return self.head(torch.relu(self.conv2(self.pool(self.relu1(self.conv1(x))))))


class Gated(SmallCNN):  # squeeze-and-excitation-like: a product of two input-dependent tensors
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Sigmoid()

    def forward(self, x):
        h = self.relu1(self.conv1(x))
        return self.head(h * self.gate(h.mean((2, 3), keepdim=True)))


class WithGELU(SmallCNN):
    def __init__(self) -> None:
        super().__init__()
        self.relu2 = nn.GELU()


def _captum(method: str, model: nn.Module, x: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    from captum.attr import Deconvolution, DeepLift, GuidedBackprop

    explainer = {"deeplift": DeepLift, "guided_backprop": GuidedBackprop, "deconvolution": Deconvolution}[method](model)
    a = explainer.attribute(x.clone().requires_grad_(True), target=targets, **kwargs)
    return a.sum(1) if method == "deeplift" else a.abs().sum(1)


@pytest.mark.parametrize("method", ["deeplift", "guided_backprop", "deconvolution"])
def test_equal_to_captum_used_directly_and_batched_equals_one_by_one(method):
    model = SmallCNN().eval()
    x, targets = _images(3), torch.tensor([0, 3, 4])
    e = explain(model, x, targets, method)
    torch.testing.assert_close(e.raw, _captum(method, model, x, targets).detach(), rtol=1e-5, atol=1e-6)
    one = torch.cat([explain(model, x[k:k + 1], targets[k:k + 1], method).raw for k in range(3)])
    torch.testing.assert_close(e.raw, one, rtol=1e-5, atol=1e-6)
    assert e.signed == (method == "deeplift") and e.raw.shape == (3, 16, 16)


@pytest.mark.parametrize("method", ["deeplift", "guided_backprop"])
def test_a_relu_module_used_twice_gives_the_map_of_separate_relus(method):
    shared, separate = SmallCNN(reuse=True).eval(), SmallCNN(reuse=False).eval()  # the same weights
    x, targets = _images(2), torch.tensor([1, 2])
    expected = _captum(method, separate, x, targets).detach()
    torch.testing.assert_close(explain(shared, x, targets, method).raw, expected, rtol=1e-5, atol=1e-6)
    if method == "deeplift":  # Captum alone cannot: its hook finds the shared module's stored input gone
        with pytest.raises(RuntimeError, match="used more than once"):
            _captum(method, shared, x, targets)
    assert shared.relu1 is shared.relu2 and type(shared.relu1) is nn.ReLU


@pytest.mark.parametrize("model_name", ["relu_cnn", "resnet18"])
def test_deeplift_sums_to_the_logit_difference_in_float64(model_name):
    torch.manual_seed(0)
    if model_name == "relu_cnn":  # ReLUs (one module used twice), convolutions, average pooling, linear
        model = SmallCNN(reuse=True)
        model.pool = nn.AvgPool2d(2)
    else:  # calls each block's one ReLU module two times; max pooling (exact from the all-zero baseline only)
        model = torchvision.models.resnet18(num_classes=4)
    model = model.double().eval()
    x, targets = _images(2, 32, dtype=torch.float64), torch.tensor([1, 3])
    cases = [(None, torch.zeros_like(x))]
    if model_name == "relu_cnn":
        cases += [(0.5, torch.full_like(x, 0.5)),
                  (torch.linspace(-1, 1, 3, dtype=torch.float64).view(3, 1, 1),
                   torch.linspace(-1, 1, 3, dtype=torch.float64).view(1, 3, 1, 1).expand_as(x))]
    for baselines, start in cases:
        options = {} if baselines is None else {"baselines": baselines}
        raw = explain(model, x, targets, "deeplift", **options).raw  # Explanation.raw is float32
        with torch.no_grad():
            delta = model(x)[[0, 1], targets] - model(start)[[0, 1], targets]
        torch.testing.assert_close(raw.double().sum((1, 2)), delta, rtol=1e-5, atol=1e-5)


def _snapshot(model: nn.Module):
    return ([(name, module) for name, module in model.named_modules(remove_duplicate=False)],
            [getattr(m, "inplace", None) for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               and not getattr(m, "_backward_pre_hooks", None) for m in model.modules())


def _same(model: nn.Module, before) -> None:
    modules, inplace, state = _snapshot(model)
    assert [(n, id(m)) for n, m in modules] == [(n, id(m)) for n, m in before[0]]
    assert inplace == before[1]
    assert all(torch.equal(state[k], before[2][k]) for k in state)
    assert _no_hooks(model)
    assert not any(hasattr(m, "input") or hasattr(m, "output") for m in model.modules())


@pytest.mark.parametrize("method", ["deeplift", "guided_backprop"])
def test_the_callers_model_is_unchanged_also_after_an_error(method):
    model = SmallCNN(reuse=True, inplace=True).eval()
    before = _snapshot(model)
    x = _images(2)
    raw = explain(model, x, [0, 1], method).raw
    _same(model, before)
    # in-place ReLUs: the same map as the out-of-place model's
    torch.testing.assert_close(raw, explain(SmallCNN(reuse=True).eval(), x, [0, 1], method).raw)

    class Fails(nn.Module):  # passes xtl's check (run without gradients), fails in the attribution pass
        def forward(self, h):
            if torch.is_grad_enabled():
                raise ValueError("boom")
            return h

    model.head.insert(0, Fails())
    before = _snapshot(model)
    with pytest.raises(ValueError, match="boom"):
        explain(model, x[:1], 0, method)
    _same(model, before)


@pytest.mark.parametrize("method, model, message", [
    ("deeplift", FunctionalReLU(), "method deeplift is not sound for FunctionalReLU: relu in the model's own forward "
     "code is a nonlinearity outside a module DeepLift has a rule for (nn.ReLU, ELU, LeakyReLU, Sigmoid, Tanh, "
     "Softplus, MaxPool, Softmax), so it would pass the plain gradient; use integrated_gradients"),
    ("deeplift", WithGELU(), "method deeplift is not sound for WithGELU: gelu in module relu2 (GELU) is a nonlinearity "
     "outside a module DeepLift has a rule for (nn.ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus, MaxPool, Softmax), "
     "so it would pass the plain gradient; use integrated_gradients"),
    ("deeplift", Gated(), "method deeplift is not sound for Gated: it multiplies two input-dependent tensors (mul "
     "in the model's own forward code), which DeepLift's rules do not cover (attention, gating); use "
     "integrated_gradients or an LRP method"),
    ("guided_backprop", FunctionalReLU(), "method guided_backprop is defined for ReLU networks with nn.ReLU modules; "
     "FunctionalReLU applies a functional ReLU in the model's own forward code, whose gradient Captum would not "
     "rectify; use saliency or integrated_gradients"),
    ("deconvolution", WithGELU(), "method deconvolution is defined for ReLU networks with nn.ReLU modules; WithGELU "
     "applies the activation gelu in module relu2 (GELU), whose gradient Captum would not rectify; use saliency or "
     "integrated_gradients"),
])
def test_models_the_rules_do_not_cover_are_refused_in_one_line(method, model, message):
    model = model.eval()
    before = _snapshot(model)
    with pytest.raises(XtlError) as err:
        explain(model, _images(1), 0, method)
    assert str(err.value) == message and "\n" not in str(err.value)
    _same(model, before)


def test_vits_are_refused_for_what_they_are():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32).eval()
    x = _images(1, 32)
    with pytest.raises(XtlError, match="^method deeplift applies to CNNs and any model; model timm:vit_tiny_patch16_224 "
                                       r"is described as a VIT \(pass spec="):
        explain(vit, x, 0, "deeplift")
    # described as some other model, the check names what DeepLift / guided backprop cannot handle
    with pytest.raises(XtlError, match="^method deeplift is not sound for VisionTransformer: layer_norm in module "
                                       r"blocks.0.norm1 \(LayerNorm\) is a nonlinearity outside"):
        explain(vit, x, 0, "deeplift", spec=ModelDescription(family="other"))
    with pytest.raises(XtlError, match="^method guided_backprop is defined for ReLU networks with nn.ReLU modules; "
                                       r"VisionTransformer applies the activation gelu in module blocks.0.mlp.act \(GELU\)"):
        explain(vit, x, 0, "guided_backprop", spec=ModelDescription(family="other"))


def test_bad_baselines_are_one_line():
    with pytest.raises(XtlError) as err:
        explain(SmallCNN().eval(), _images(2), 0, "deeplift", baselines=torch.zeros(2, 3))
    assert str(err.value) == "baselines of shape (2, 3) do not broadcast to the images (2, 3, 16, 16)"
