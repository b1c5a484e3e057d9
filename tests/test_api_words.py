"""Issue 27, the Python API answers in Python words: library errors name Python parameters (the CLI
keeps its `option --steps`), and the habits of PyTorch users work (list targets, pytorch-grad-cam's
ClassifierOutputTarget, float64 or bf16 inputs, a model for `methods_for`, a timm ViT built by its
class, a run folder as a str). Real CIFAR-10 images, tiny randomly initialised models."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from xtl.errors import XtlError
from xtl.explain import explain, methods_for
from xtl.models import describe_model, preprocessing

from helpers import cifar_uint8, random_resnet10t

torch.set_num_threads(1)


def _cifar(cifar: Path, n: int = 2, classes=("cat", "ship")) -> tuple[torch.Tensor, torch.Tensor]:
    return cifar_uint8(cifar, n, classes)


@pytest.fixture(scope="module")
def cnn():
    return random_resnet10t()


@pytest.fixture(scope="module")
def data(cifar, cnn):
    """(uint8 images, preprocessed 64 px images, labels): 4 real CIFAR-10 test images."""
    pixels, labels = _cifar(cifar)
    return pixels, preprocessing(spec=replace(describe_model(cnn), input_size=64))(pixels), labels


@pytest.fixture(scope="module")
def class_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- Python words in score()


@pytest.mark.parametrize("options, message", [
    (dict(steps=0), "score(): steps must be at least 1, not 0"),
    (dict(steps=5000), "score(): steps must be at most 1,000"),
    (dict(steps=2.5), "score(): steps must be an int, not 2.5"),
    (dict(batch_size=0), "score(): batch_size must be at least 1, not 0"),
    (dict(baseline="grey"), "score(): baseline must be one of zero, mean, blur, road, not 'grey'"),
    (dict(grid=0), "score(): grid must be a number of cells per side >= 1 or None (pixels), not 0"),
    (dict(grid=65), "score(): grid must be at most the input's 64 px per side, not 65"),
], ids=["steps", "steps_too_many", "steps_float", "batch_size", "baseline", "grid", "grid_finer_than_input"])
def test_score_names_its_python_parameters(cnn, data, options, message):
    from xtl.faithfulness import score

    _, x, labels = data
    with pytest.raises(XtlError) as error:
        score(cnn, x, labels, torch.rand(len(x), 64, 64), **options)
    text = _one_line(error)
    assert text.startswith(message), text
    assert "option --" not in text


def test_score_maps_and_baseline_inputs_name_themselves_and_the_cli_keeps_its_words(cnn, data):
    from xtl.faithfulness import FaithfulnessSettings, baseline_inputs, score_maps

    _, x, labels = data
    with pytest.raises(XtlError) as error:
        score_maps(cnn, x, labels, {"gradcam": torch.rand(len(x), 64, 64)}, steps=0)
    assert _one_line(error) == "score_maps(): steps must be at least 1, not 0"
    with pytest.raises(XtlError) as error:
        baseline_inputs(x, "grey")
    assert _one_line(error) == "baseline_inputs(): baseline must be one of zero, mean, blur, road, not 'grey'"
    # the command line's settings object still speaks in options (tests/test_faithfulness.py pins them)
    with pytest.raises(XtlError, match="^option --steps must be at least 1, not 0$"):
        FaithfulnessSettings(steps=0)
    with pytest.raises(XtlError, match="^option --grid must be a number of cells per side >= 1, common, native, model "
                                       r"or none \(pixels\), not 0$"):
        FaithfulnessSettings(grid=0)


# ----------------------------------------------------------------------------- targets as PyTorch users give them


def test_a_list_of_labels_is_one_class_per_image(cnn, data):
    _, x, _ = data
    listed = explain(cnn, x, [3, 5, 8, 0], "gradcam")
    assert listed.targets.tolist() == [3, 5, 8, 0]
    assert torch.equal(listed.raw, explain(cnn, x, torch.tensor([3, 5, 8, 0]), "gradcam").raw)


def test_pytorch_grad_cams_classifier_output_target_means_its_class(cnn, data):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    _, x, _ = data
    one = explain(cnn, x, [ClassifierOutputTarget(3)], "gradcam")  # one for every image
    assert one.targets.tolist() == [3, 3, 3, 3]
    assert torch.equal(one.raw, explain(cnn, x, 3, "gradcam").raw)
    each = explain(cnn, x, [ClassifierOutputTarget(c) for c in (3, 5, 8, 0)], "saliency")
    assert each.targets.tolist() == [3, 5, 8, 0]
    assert torch.equal(each.raw, explain(cnn, x, [3, 5, 8, 0], "saliency").raw)
    # a method that explains classes only (no callable targets: LRP) takes them as classes too
    assert explain(cnn, x[:1], [ClassifierOutputTarget(8)], "lrp_epsilon").targets.tolist() == [8]
    with pytest.raises(XtlError) as error:
        explain(cnn, x, [ClassifierOutputTarget(3)] * 3, "gradcam")
    assert _one_line(error) == "targets: 3 per-image targets for 4 images; give one per image (or one for all)"


def test_other_per_image_callables_are_read_on_each_images_output(cnn, data):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    _, x, _ = data
    for method in ("gradcam", "saliency"):
        ours = explain(cnn, x, [ClassifierOutputSoftmaxTarget(c) for c in (3, 5, 8, 0)], method)
        for i, c in enumerate((3, 5, 8, 0)):
            alone = explain(cnn, x[i:i + 1], lambda logits, c=c: logits.softmax(1)[:, c], method)
            assert torch.allclose(ours.raw[i], alone.raw[0], atol=1e-6, rtol=1e-5), (method, i)
    shared = explain(cnn, x, [ClassifierOutputSoftmaxTarget(5)], "gradcam")  # one callable: one call for all
    assert torch.allclose(shared.raw, explain(cnn, x, lambda logits: logits.softmax(1)[:, 5], "gradcam").raw,
                          atol=1e-6, rtol=1e-5)
    with pytest.raises(XtlError, match="explains a class of the model, not a callable target"):
        explain(cnn, x[:1], [ClassifierOutputSoftmaxTarget(5)], "lrp_epsilon")


# ----------------------------------------------------------------------------- inputs: dtype, device, pixels


def test_float64_and_bf16_images_are_converted_to_the_models_float32(cnn, data):
    _, x, _ = data
    reference = explain(cnn, x, [3, 5, 8, 0], "gradcam")
    as_double = explain(cnn, x.double(), [3, 5, 8, 0], "gradcam")
    assert as_double.raw.dtype == torch.float32 and torch.allclose(as_double.raw, reference.raw, atol=1e-5)
    as_bf16 = explain(cnn, x.bfloat16(), [3, 5, 8, 0], "saliency")
    assert as_bf16.raw.dtype == torch.float32 and as_bf16.raw.shape == (4, 64, 64)
    assert torch.equal(as_bf16.raw, explain(cnn, x.bfloat16().float(), [3, 5, 8, 0], "saliency").raw)


def test_images_on_another_device_than_the_model_are_one_line_naming_both(cnn, data):
    _, x, _ = data
    with pytest.raises(XtlError) as error:
        explain(cnn, x.to("meta"), 3, "gradcam")
    assert _one_line(error) == ("explain(): images are on meta but the model's parameters on cpu; "
                                "move them with images.to('cpu')")


def test_raw_pixels_get_one_warning_naming_the_preprocessing(cnn, data):
    pixels, x, _ = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explain(cnn, pixels.float(), 3, "gradcam")
    mine = [w for w in caught if "preprocessed images" in str(w.message)]
    assert len(mine) == 1 and mine[0].category is UserWarning
    assert "xtl.models.preprocessing(model)" in str(mine[0].message) and "255" in str(mine[0].message)
    assert mine[0].filename == __file__  # it points at the caller's line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explain(cnn, x, 3, "gradcam")
    assert not [w for w in caught if "preprocessed images" in str(w.message)]


# ----------------------------------------------------------------------------- models and runs


def test_a_timm_vit_built_by_its_class_is_described_as_a_vit(class_vit, cifar):
    description = describe_model(class_vit)
    assert description.family == "vit" and description.patch_size == 8 and description.input_size == 32
    assert description.target_layer == "blocks.-1.norm1" and description.prefix_tokens == 1
    pixels, _ = _cifar(cifar)
    x = preprocessing(class_vit)(pixels)
    assert x.shape[-1] == 32
    e = explain(class_vit, x, None, "attention_rollout")
    assert e.raw.shape == (4, 4, 4)  # the 4 x 4 patch grid
    assert explain(class_vit, x, None, "gradcam").raw.shape == (4, 4, 4)


def test_methods_for_takes_a_model_or_a_family(cnn, class_vit):
    from xtl.explain import METHODS

    assert methods_for(cnn) == methods_for("cnn") == methods_for(describe_model(cnn))
    assert methods_for(class_vit) == methods_for("vit")
    assert "attention_rollout" in methods_for(class_vit) and "attention_rollout" not in methods_for(cnn)
    assert methods_for(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))) == methods_for("other")
    assert set(methods_for("other")) <= set(METHODS)
    with pytest.raises(XtlError) as error:
        methods_for("cnm")
    assert _one_line(error) == "methods_for(): family must be cnn, vit or other, a model or a ModelDescription, not 'cnm'"


def test_stored_maps_are_read_from_a_run_folder_given_as_a_str_or_a_path(tmp_path, cifar):
    from helpers import class_folder, tiny_run
    from xtl.explain.runner import RunExplainer, read_stored_maps, stored_maps_for
    from xtl.runs import RunDir

    folder = class_folder(tmp_path / "data", cifar, per_part=(("train", 14), ("test", 8)))
    run = tiny_run(tmp_path / "runs" / "cnn", folder, "timm:resnet10t", 32, train_size=30, val_size=6, test_size=16)
    RunExplainer(run, device="cpu").stream(["saliency"], 8, 8, "predicted", progress=False)
    expected = read_stored_maps(run, "saliency")
    assert expected is not None and len(expected[2]) == 8
    for given in (str(run.path), run.path):
        found = read_stored_maps(given, "saliency")
        assert all(torch.equal(a, b) for a, b in zip(found, expected))
        some = stored_maps_for(given, "saliency", "test", [int(expected[2][0])])
        assert torch.equal(some[int(expected[2][0])][0], expected[0][0].float())
    with pytest.raises(XtlError, match="not int"):
        read_stored_maps(3, "saliency")
    assert isinstance(run, RunDir)
