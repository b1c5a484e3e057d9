"""xtl's AttnLRP and CP-LRP against LXT's own (Achtibat et al.'s library), on the same weights.

The reference, tests/references/lxt_attnlrp.safetensors, was made once with LXT 2.1 in a separate
environment by tests/references/make_lxt_attnlrp.py (its docstring gives the exact pip commands:
torch 2.14.1, transformers 4.57.6, `pip install --no-deps lxt==2.1`; LXT cannot live in the
project's environment: its `lxt.efficient` needs transformers 4 and it patches global classes).
It holds a tiny random Hugging Face ViTForImageClassification in float64 (32 px, patch 8, hidden
48, 3 layers, 4 heads, non-zero biases, class token and position embedding), 4 CIFAR-10 test
images, and LXT's pixel relevance `x * x.grad` per channel for each image's predicted class and
for class 7, with LXT's AttnLRP patch map (LayerNorm with the standard deviation detached, the
identity rule on GELU with x + 1e-10 in the denominator, the gradient at q and k divided by 4
and at v by 2) and with its CP-LRP map (q and k detached). Its CP-LRP equals LXT's shipped
torchvision `vit_torch.cp_LRP` on the same weights to 5e-17 (recorded in the file's metadata).

The only intended difference is LXT's 1e-10 in the GELU rule (xtl divides exactly), so the maps
must agree to far better than the size of the difference between the methods themselves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from xtl.explain import explain

torch.set_num_threads(1)

REFERENCE = Path(__file__).parent / "references" / "lxt_attnlrp.safetensors"


@pytest.fixture(scope="module")
def reference():
    from transformers import ViTConfig, ViTForImageClassification

    spec = importlib.util.spec_from_file_location("make_lxt_attnlrp", REFERENCE.parent / "make_lxt_attnlrp.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)  # imports torch, numpy and PIL only
    tensors = load_file(str(REFERENCE))
    with safe_open(str(REFERENCE), framework="pt") as f:
        metadata = f.metadata()
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model = ViTForImageClassification(ViTConfig(**json.loads(metadata["config"]))).double().eval()
    model.load_state_dict(maker.hf_to_transformers5(state))
    return model, tensors, metadata


def test_the_reference_model_reproduces_the_stored_logits(reference):
    model, tensors, metadata = reference
    assert metadata["lxt_version"] == "2.1"
    with torch.no_grad():
        logits = model(tensors["images"]).logits
    assert torch.allclose(logits, tensors["logits"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("method", "key"), [("attnlrp", "relevance"), ("cp_lrp", "relevance_cp")])
def test_maps_equal_lxts_on_the_same_weights(reference, method, key):
    model, tensors, _ = reference
    images = tensors["images"][tensors["image_index"]]
    targets = tensors["targets"]
    ours = explain(model, images, targets, method=method).raw  # summed over channels, [8, 32, 32]
    theirs = tensors[key].sum(1)
    assert ours.dtype == torch.float32  # Explanation.raw is float32: compare at that precision
    scale = theirs.abs().max()
    assert torch.allclose(ours.double(), theirs, rtol=1e-5, atol=1e-6 * scale)
    # the two variants differ by far more than that, so the comparison can tell them apart
    other = tensors["relevance_cp" if key == "relevance" else "relevance"].sum(1)
    assert (other - theirs).abs().max() > 0.05 * scale


def test_pixel_relevance_per_channel_equals_lxts_in_float64(reference):
    """Before the channel sum and the float32 result type: the float64 pass itself. Measured: the
    largest difference is 2e-10 (AttnLRP) and 4e-10 (CP-LRP) for maps of largest value 0.025 and
    0.046, i.e. below 1e-8 of the scale: LXT's 1e-10 in the GELU rule."""
    from xtl.explain.attnlrp import attnlrp_pass
    from xtl.explain.transformer_attribution import vit_layout
    from xtl.models.hf import HFClassifier

    model, tensors, _ = reference
    images = tensors["images"][tensors["image_index"]]
    layout = vit_layout(HFClassifier(model))
    for rule, key in (("uniform", "relevance"), ("constant", "relevance_cp")):
        ours = attnlrp_pass(layout, images, tensors["targets"], rule).pixels
        assert torch.allclose(ours, tensors[key], rtol=0, atol=2e-8 * tensors[key].abs().max())
