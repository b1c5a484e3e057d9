"""explain() on models xtl's registry never built: a stock torchvision ResNet, a timm ViT, a
Hugging Face ViT, a user's own module; targets of every kind; options checked once."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from helpers import noise_images
from xtl.errors import XtlError
from xtl.explain import METHODS, Explanation, describe_methods, explain, methods_for
from xtl.models import ModelDescription, describe_model, preprocessing, resolve_data_config

torch.set_num_threads(1)


_images = noise_images


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=64).eval()


@pytest.fixture(scope="module")
def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=4)
    return ViTForImageClassification(config).eval()


# ----------------------------------------------------------------------------- stock models, no registry


def test_a_stock_torchvision_resnet_gets_the_libraries_gradcam_without_a_spec(resnet):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x, targets = _images(2, 64), [1, 7]
    assert not hasattr(resnet, "xtl_spec")
    ours = explain(resnet, x, targets, "gradcam", target_layer=resnet.layer4).maps
    with GradCAM(model=resnet, target_layers=[resnet.layer4]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets]))
    # the library resizes with OpenCV's bilinear, we with torch's: the maps agree up to resampling
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.99
    # inspection finds the same layer as the module given, and the dotted path names it too
    described = describe_model(resnet)
    assert described.family == "cnn" and described.classifier == "fc"
    assert torch.equal(explain(resnet, x, targets, "gradcam").raw, explain(resnet, x, targets, "gradcam", target_layer="layer4").raw)
    assert torch.equal(explain(resnet, x, targets, "gradcam").raw, explain(resnet, x, targets, "gradcam", target_layer=resnet.layer4).raw)


def test_every_applicable_method_runs_on_a_stock_resnet_and_a_timm_vit(resnet, timm_vit):
    few = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 2}, "scorecam": {"batch_size": 128},
           "kernel_shap": {"n_samples": 16}, "lime": {"n_samples": 16}, "gradient_shap": {"n_samples": 4}}
    for model, family, grid in ((resnet, "cnn", (2, 2)), (timm_vit, "vit", (4, 4))):
        assert describe_model(model).family == family
        x = _images(2, 64)
        for method in methods_for(family):
            e = explain(model, x, None, method, **few.get(method, {}))
            assert e.maps.shape == (2, 64, 64) and torch.isfinite(e.raw).all(), method
            assert e.signed == METHODS[method].signed
            if method in ("gradcam", "transformer_attribution"):
                assert e.raw.shape[-2:] == grid


def test_a_timm_vit_described_by_inspection_equals_the_registry_description(timm_vit):
    x = _images(2, 64)
    by_hand = ModelDescription(name="vit", family="vit", input_size=64, mean=(0.5,) * 3, std=(0.5,) * 3,
                               classifier="head", target_layer="blocks.-1.norm1", patch_size=16, prefix_tokens=1)
    for method in ("transformer_attribution", "gradcam"):
        assert torch.equal(explain(timm_vit, x, 1, method).raw, explain(timm_vit, x, 1, method, spec=by_hand).raw)

    def fold(tokens):  # pytorch-grad-cam's reshape_transform for a ViT
        return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)

    assert torch.equal(explain(timm_vit, x, 1, "gradcam").raw,
                       explain(timm_vit, x, 1, "gradcam", target_layer=timm_vit.blocks[-1].norm1, reshape_transform=fold).raw)


def test_a_hugging_face_vit_is_explained_as_it_comes(hf_vit):
    from xtl.models.hf import HFClassifier

    x = _images(2, 32)
    described = describe_model(hf_vit)
    assert (described.family, described.patch_size, described.classifier) == ("vit", 8, "classifier")
    for method in ("transformer_attribution", "attention_rollout", "gradcam", "saliency"):
        raw = explain(hf_vit, x, [0, 3], method).raw
        wrapped = explain(HFClassifier(hf_vit), x, [0, 3], method).raw
        assert torch.equal(raw, wrapped), method
    assert explain(hf_vit, x, None, "gradcam").targets.tolist() == hf_vit(pixel_values=x).logits.argmax(1).tolist()


def test_a_users_own_module_needs_a_layer_only_for_methods_that_use_one():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 3)).eval()
    x = _images(2, 16)
    saliency = explain(net, x, 2, "saliency")
    x_grad = x.clone().requires_grad_(True)
    net(x_grad)[:, 2].sum().backward()
    torch.testing.assert_close(saliency.raw, x_grad.grad.abs().sum(1))
    cam = explain(net, x, 2, "gradcam", target_layer=net[1])
    assert cam.raw.shape == (2, 16, 16)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    with pytest.raises(XtlError, match="needs a target layer .* pass target_layer= a module"):
        explain(mlp, x, 0, "gradcam")
    with pytest.raises(XtlError, match="applies to CNNs; model Sequential is described as neither"):
        explain(mlp, x, 0, "lrp_epsilon")
    with pytest.raises(XtlError, match="not a module of"):
        explain(net, x, 0, "gradcam", target_layer=nn.ReLU())


def test_a_token_layer_without_a_patch_size_asks_for_reshape_transform():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            tokens = self.mix(self.embed(x).flatten(2).transpose(1, 2))  # [B, 16, 8]
            return self.head(tokens.mean(1))

    model = Tokens().eval()
    x = _images(2, 16)
    with pytest.raises(XtlError, match="gives tokens .* pass reshape_transform="):
        explain(model, x, 0, "gradcam", target_layer="mix")
    e = explain(model, x, 0, "gradcam", target_layer="mix",
                reshape_transform=lambda t: t.transpose(1, 2).reshape(t.shape[0], 8, 4, 4))
    assert e.raw.shape == (2, 4, 4)


# ----------------------------------------------------------------------------- targets


def test_callable_targets_explain_any_scalar_of_the_output(resnet):
    x = _images(2, 32)
    by_index = explain(resnet, x, 3, "saliency").raw
    by_callable = explain(resnet, x, lambda logits: logits[:, 3], "saliency").raw
    torch.testing.assert_close(by_callable, by_index)
    # the softmax probability of class 3: compare with float64 autograd
    probability = explain(resnet, x, lambda logits: logits.softmax(1)[:, 3], "saliency").raw
    model64 = resnet.double()
    try:
        x64 = x.double().requires_grad_(True)
        model64(x64).softmax(1)[:, 3].sum().backward()
        torch.testing.assert_close(probability.double(), x64.grad.abs().sum(1), rtol=1e-3, atol=1e-7)
    finally:
        resnet.float()
    assert not torch.allclose(probability / probability.max(), by_index / by_index.max(), atol=1e-3)
    cam = explain(resnet, x, lambda logits: logits.softmax(1)[:, 3], "gradcam")
    assert cam.raw.shape == (2, 1, 1) and cam.targets.tolist() == [0, 0]
    with pytest.raises(XtlError, match="not a callable target"):
        explain(resnet, x, lambda logits: logits[:, 3], "lrp_epsilon")
    with pytest.raises(XtlError, match="one number per image"):
        explain(resnet, x, lambda logits: logits, "saliency")


def test_targets_of_every_kind_and_bad_ones_in_one_line(resnet):
    x = _images(3, 32)
    predicted = resnet(x).argmax(1)
    assert explain(resnet, x, None, "gradcam").targets.tolist() == predicted.tolist()
    assert explain(resnet, x, 4, "gradcam").targets.tolist() == [4, 4, 4]
    assert explain(resnet, x, [1, 2, 3], "gradcam").targets.tolist() == [1, 2, 3]
    assert explain(resnet, x, torch.tensor([1, 2, 3]), "gradcam").targets.tolist() == [1, 2, 3]
    assert explain(resnet, x[0], 4, "gradcam").raw.shape == (1, 1, 1)  # one image [3, H, W]
    for bad, message in (([1, 2], "one class per image: 3 images"), (10, "class 10 does not exist: .* 10 classes"),
                         (-1, "class -1 does not exist"), (1.5, "must be None, an int"),
                         (torch.tensor([0.0, 1.0, 2.0]), "class indices")):
        with pytest.raises(XtlError, match=message):
            explain(resnet, x, bad, "gradcam")
    with pytest.raises(XtlError, match="uint8: explain\\(\\) takes preprocessed float images"):
        explain(resnet, (x * 50).clamp(0, 255).to(torch.uint8), None, "gradcam")


# ----------------------------------------------------------------------------- options, help, export


def test_options_are_checked_once_by_name_and_type(resnet):
    x = _images(1, 32)
    with pytest.raises(XtlError, match="method gradcam has no option 'n_steps'; its options: target_layer=None, "
                                       "reshape_transform=None"):
        explain(resnet, x, 0, "gradcam", n_steps=3)
    with pytest.raises(XtlError, match="method saliency has no option 'abs'; its options: none"):
        explain(resnet, x, 0, "saliency", abs=False)
    with pytest.raises(XtlError, match="option n_steps of method integrated_gradients must be an int"):
        explain(resnet, x, 0, "integrated_gradients", n_steps=2.5)
    with pytest.raises(XtlError, match="option stdev of method smoothgrad must be a finite float"):
        explain(resnet, x, 0, "smoothgrad", stdev=float("nan"))
    with pytest.raises(XtlError, match="method lrp_epsilon has no option 'alpha'; its options: epsilon=1e-06, gamma=0.25"):
        explain(resnet, x, 0, "lrp_epsilon", alpha=2.0)


def test_every_method_is_listed_with_its_families_options_and_reference():
    text = describe_methods()
    for name, method in METHODS.items():
        assert name in text and name in explain.__doc__
        assert method.reference and (type(method).__doc__ or "").strip(), name
        for option in method.option_defaults():
            assert f"{option}=" in method.summary()
    assert "Selvaraju et al." in METHODS["gradcam"].summary() and "Chefer" in METHODS["transformer_attribution"].summary()
    assert "[ViT;" in METHODS["transformer_attribution"].summary() and "[any model;" in METHODS["saliency"].summary()


def test_an_explanation_saves_and_loads_itself(tmp_path, resnet):
    e = explain(resnet, _images(2, 32), [1, 2], "lrp_epsilon")
    path = e.save(tmp_path / "e.safetensors")
    back = Explanation.load(path)
    assert back.method == "lrp_epsilon" and back.signed is True
    assert torch.equal(back.raw, e.raw) and torch.equal(back.maps, e.maps) and torch.equal(back.targets, e.targets)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(XtlError, match="explanation file .*bad.safetensors cannot be read"):
        Explanation.load(tmp_path / "bad.safetensors")


def test_preprocessing_follows_the_models_own_description(timm_vit, resnet):
    assert resolve_data_config(timm_vit) == {"input_size": (3, 64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                             "interpolation": "bilinear"}
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    x = preprocessing(timm_vit)(images)
    assert x.shape == (2, 3, 64, 64) and float(x.min()) >= -1 and float(x.max()) <= 1
    y = preprocessing(resnet)(images)
    assert y.shape == (2, 3, 224, 224)
    torch.testing.assert_close(y[:, 0].mean(), ((images[:, 0].float() / 255 - 0.485) / 0.229).mean(), atol=2e-2, rtol=0)
