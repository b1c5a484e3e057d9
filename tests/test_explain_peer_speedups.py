"""What bench/peers.py made faster stays equal to the libraries (issue 16): EigenCAM's reduced SVD
gives pytorch-grad-cam's maps, sign included; LRP on the caller's model (no deep copy) gives the
maps of the former deep-copy path and leaves the model exactly as it was, also when the call fails."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from xtl.explain import explain
from xtl.explain.cam import first_component_projection
from xtl.explain.cnn_lrp import COMPOSITES, canonizers_for
from xtl.models import build_model, submodule

torch.set_num_threads(1)

LRP = ["lrp_epsilon", "lrp_alpha_beta", "lrp_zplus"]


def _build(name: str, pretrained: bool = False, size: int = 64):
    torch.manual_seed(0)
    model, spec = build_model(name, 10, pretrained=pretrained, input_size=size)
    return model.eval(), spec


# ----------------------------------------------------------------------------- EigenCAM


@pytest.mark.parametrize("shape", [(8, 512, 2, 2), (8, 2048, 7, 7), (8, 1280, 4, 4), (4, 64, 16, 16), (3, 192, 6, 6)])
def test_eigencam_projection_equals_pytorch_grad_cams_sign_included(shape):
    """The library's per-image full SVD against one reduced SVD of the batch: equal, every sign the same."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    generator = torch.Generator().manual_seed(sum(shape))
    activations = torch.relu(torch.randn(shape, generator=generator)) * torch.rand(shape[0], shape[1], 1, 1, generator=generator)
    activations[0, 0, 0, 0] = float("nan")  # the library sets NaN to 0
    theirs = torch.from_numpy(get_2d_projection(activations.numpy()))
    ours = first_component_projection(activations)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    scale = theirs.abs().amax((1, 2), keepdim=True)
    assert ((ours - theirs).abs() / scale).amax() < 1e-5  # a flipped sign would give ~2


def test_eigencam_maps_equal_pytorch_grad_cam_on_a_batch_of_cifar():
    from pytorch_grad_cam import EigenCAM

    from conftest import CIFAR
    from xtl.data import Preprocess, SplitSpec, load_split

    for name, pretrained, size in (("efficientnet_lite0", True, 128), ("resnet34", False, 64)):
        model, spec = _build(name, pretrained, size)
        test = load_split(str(CIFAR), SplitSpec("random", train_size=0, val_size=0, test_size=8, seed=0))["test"]
        x = Preprocess(size, spec.mean, spec.std)(test.images)
        ours = explain(model, x, test.labels, "eigencam").maps
        with EigenCAM(model, target_layers=[submodule(model, spec.target_layer)]) as cam:
            theirs = torch.from_numpy(cam(input_tensor=x, targets=None))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- LRP on the caller's model


def _state(model: nn.Module) -> dict:
    """Everything a call could change: tensors (values, storage, identity), modules, flags, hooks."""
    return {
        "tensors": {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()},
        "parameters": [(name, p, p.requires_grad) for name, p in model.named_parameters()],
        "buffers": [(name, b) for name, b in model.named_buffers()],
        "modules": [(name, m, type(m), m.training, m.__dict__.get("inplace"), sorted(m.__dict__),
                     len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                    for name, m in model.named_modules()],
    }


def _assert_same(before: dict, model: nn.Module) -> None:
    after = _state(model)
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, (value, pointer) in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key][0]), key
        assert pointer == after["tensors"][key][1], key
    for (n1, p1, g1), (n2, p2, g2) in zip(before["parameters"], after["parameters"], strict=True):
        assert n1 == n2 and p1 is p2 and g1 == g2, n1
    for (n1, b1), (n2, b2) in zip(before["buffers"], after["buffers"], strict=True):
        assert n1 == n2 and b1 is b2, n1
    for m1, m2 in zip(before["modules"], after["modules"], strict=True):
        assert m1[0] == m2[0] and m1[1] is m2[1] and m1[2:] == m2[2:], m1[0]


def _zennit_on_a_deep_copy(model: nn.Module, spec, images: torch.Tensor, targets: torch.Tensor, method: str):
    """The former path (a frozen deep copy per call, out-of-place activations), Zennit used directly."""
    from zennit.attribution import Gradient

    clone = copy.deepcopy(model).eval().requires_grad_(False)
    for module in clone.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    rules = COMPOSITES[method](spec, canonizers_for(clone))
    inputs = images.clone().requires_grad_(True)

    def target_logit(logits):
        return torch.zeros_like(logits).scatter_(1, targets[:, None], 1.0) * logits.detach()

    with torch.enable_grad(), Gradient(clone, rules, attr_output=target_logit) as attributor:
        _, relevance = attributor(inputs)
    return relevance.sum(1)


@pytest.fixture(scope="module")
def cnns():
    return {"resnet34": _build("resnet34"), "efficientnet_lite0": _build("efficientnet_lite0", pretrained=True)}


@pytest.mark.parametrize("name", ["resnet34", "efficientnet_lite0"])
def test_lrp_maps_equal_the_deep_copy_path_and_the_model_is_left_as_it_was(cnns, name):
    model, spec = cnns[name]
    model.train()  # explain() puts it in eval for the call; lrp must not leave anything else behind
    frozen = next(model.parameters())
    frozen.requires_grad_(False)  # a partly frozen model stays partly frozen
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([1, 5, 8])
    before = _state(model)
    if name == "resnet34":
        assert any(m[4] is True for m in before["modules"]), "torchvision ResNets have in-place ReLUs"
    for method in LRP:
        ours = explain(model, x, targets, method).raw
        _assert_same(before, model)
        theirs = _zennit_on_a_deep_copy(model, spec, x, targets, method)
        assert ours.abs().amax() > 0
        torch.testing.assert_close(ours, theirs, atol=1e-6 * theirs.abs().amax().item(), rtol=1e-6)
    frozen.requires_grad_(True)
    model.eval()


@pytest.mark.parametrize("name", ["resnet34", "efficientnet_lite0"])
def test_lrp_leaves_the_model_as_it_was_when_the_call_fails(cnns, name, monkeypatch):
    model, _ = cnns[name]
    before = _state(model)
    # halfway through the forward: canonizers applied and hooks registered
    with pytest.raises(RuntimeError):
        explain(model, torch.randn(2, 1, 64, 64), [0, 1], "lrp_epsilon")
    _assert_same(before, model)

    # halfway through registering the canonizers, where Zennit itself reverts nothing
    from zennit.canonizers import Canonizer

    class Fails(Canonizer):
        def apply(self, root_module):
            raise RuntimeError("canonizer failed")

        def register(self):
            pass

        def remove(self):
            pass

    import xtl.explain.cnn_lrp as cnn_lrp

    real = cnn_lrp.canonizers_for
    monkeypatch.setattr(cnn_lrp, "canonizers_for", lambda m: real(m) + [Fails()])
    with pytest.raises(RuntimeError, match="canonizer failed"):
        explain(model, torch.randn(2, 3, 64, 64), [0, 1], "lrp_alpha_beta")
    _assert_same(before, model)
    monkeypatch.undo()
    # and the model still gives the maps it gave before the failures
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(explain(model, x, [0, 1], "lrp_zplus").raw,
                               explain(copy.deepcopy(model), x, [0, 1], "lrp_zplus").raw, atol=0, rtol=0)
