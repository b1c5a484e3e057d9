"""`xtl explain IMAGE... --model M`: any image file, any model (a run, timm:, torchvision:, hf:),
overlays, raw maps, a figure and the top-5 per image; one-line errors for bad input."""

from __future__ import annotations

import csv
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import XTL, tiny_run
from xtl.cli import app
from xtl.errors import XtlError
from xtl.explain import drawing, explain
from xtl.explain.files import class_names_of, load_image_model, read_image, unique_names

runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory, cifar):
    """Three real CIFAR-10 test images as files of different formats and sizes, two with the same stem."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    cat = sorted((cifar / "test" / "cat").iterdir())[0]
    ship = sorted((cifar / "test" / "ship").iterdir())[0]
    shutil.copy(cat, folder / "a" / "pet.jpg")
    Image.open(ship).resize((48, 40)).save(folder / "b" / "pet.png")
    Image.open(cat).convert("L").save(folder / "grey.bmp")
    return folder


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A local weights file for timm:test_resnet (the hub path with a file instead of a download)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def test_image_files_with_a_timm_name_give_overlays_raw_maps_figures_and_top5(photos, timm_weights, tmp_path):
    out = tmp_path / "out"
    _invoke("explain", photos, "--model", "timm:test_resnet", "--weights", timm_weights, "--method", "gradcam",
            "--method", "integrated_gradients", "--out", out, "--batch-size", 2)
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["a_pet", "b_pet", "grey"]  # the repeated stem "pet" is told apart by its folder
    for name in names:
        for f in ("gradcam.png", "gradcam.npy", "integrated_gradients.png", "integrated_gradients.npy", "figure.png"):
            assert (out / name / f).is_file(), (name, f)
    # the raw map is explain()'s own on the same preprocessed image, and the overlay draws it
    loaded = load_image_model("timm:test_resnet", "cpu", timm_weights)
    image = read_image(photos / "a" / "pet.jpg", loaded.spec.input_size)
    x = loaded.preprocess(image[None])
    for method in ("gradcam", "integrated_gradients"):
        expected = explain(loaded.model, x, None, method, spec=loaded.spec)
        saved = np.load(out / "a_pet" / f"{method}.npy")
        np.testing.assert_allclose(saved, expected.raw[0].numpy(), rtol=1e-4, atol=1e-6)
        drawn = np.asarray(Image.open(out / "a_pet" / f"{method}.png"))
        assert np.abs(drawn.astype(int) - drawing.overlay(image, expected.raw[0], signed=expected.signed)).max() <= 1
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == ["pet.jpg", "pet.png", "grey.bmp"]
    probabilities = loaded.model(x).detach().softmax(1)[0]
    assert rows[0]["top1"] == loaded.class_names[int(probabilities.argmax())]
    assert abs(float(rows[0]["p1"]) - float(probabilities.max())) < 1e-3
    assert rows[0]["explained"] == rows[0]["top1"]
    assert "tench" in loaded.class_names[0]  # ImageNet's names for a pretrained 1,000-class head
    # a second call with another method keeps the first call's files
    _invoke("explain", photos / "grey.bmp", "--model", "timm:test_resnet", "--weights", timm_weights,
            "--method", "saliency", "--out", out)
    assert (out / "grey" / "saliency.png").is_file() and (out / "grey" / "gradcam.png").is_file()


def test_a_run_folder_as_the_model_uses_its_classes_and_a_class_name_target(photos, cifar, tmp_path):
    run = tiny_run(tmp_path / "run", cifar, "timm:resnet10t", 32, accelerator="cpu")
    out = tmp_path / "out"
    _invoke("explain", photos / "a" / "pet.jpg", "--model", run.path, "--methods", "gradcam,lrp_epsilon",
            "--target", "ship", "--out", out)
    with open(out / "predictions.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["explained"] == "ship" and row["top1"] in run.class_names
    raw = np.load(out / "pet" / "lrp_epsilon.npy")
    assert raw.shape == (32, 32) and (raw < 0).any()  # LRP keeps its sign


def test_class_names_of_a_hugging_face_head_are_its_labels():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=3, id2label={0: "cat", 1: "dog", 2: "ship"},
                       label2id={"cat": 0, "dog": 1, "ship": 2})
    assert class_names_of(ViTForImageClassification(config)) == ["cat", "dog", "ship"]


def test_unique_names_tell_repeated_stems_apart(tmp_path):
    paths = [tmp_path / "x" / "a.jpg", tmp_path / "y" / "a.jpg", tmp_path / "b.jpg", tmp_path / "x" / "a.png"]
    names = unique_names(paths)
    assert len(set(names)) == 4 and names[2] == "b"


@pytest.mark.parametrize("case, fragment", [
    ("missing", "image {photos}/nope.jpg does not exist"),
    ("not_an_image", "not_an_image.jpg cannot be read"),
    ("empty_folder", "holds no images"),
    ("unknown_method", "unknown explanation method 'gradcan'"),
    ("bad_target", "option --target must be predicted, a class index or a class name"),
    ("vit_only", "option --method: none of transformer_attribution applies to CNN model"),
    ("no_inputs", "give run directories, or image files with --model"),
])
def test_bad_input_is_one_line(case, fragment, photos, timm_weights, tmp_path):
    model = ["--model", "timm:test_resnet", "--weights", str(timm_weights), "--out", str(tmp_path / "o")]
    args = {"missing": [str(photos / "nope.jpg"), *model],
            "not_an_image": [str(tmp_path / "not_an_image.jpg"), *model],
            "empty_folder": [str(tmp_path / "empty"), *model],
            "unknown_method": [str(photos / "grey.bmp"), *model, "--method", "gradcan"],
            "bad_target": [str(photos / "grey.bmp"), *model, "--target", "no such class"],
            "vit_only": [str(photos / "grey.bmp"), *model, "--method", "transformer_attribution"],
            "no_inputs": model}[case]
    (tmp_path / "not_an_image.jpg").write_text("hello")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["explain", *args])
    assert isinstance(result.exception, XtlError), result.output
    assert fragment.format(photos=photos) in str(result.exception)
    assert not (tmp_path / "o" / "predictions.csv").exists()


def test_the_command_exits_2_with_one_line(tmp_path):
    result = subprocess.run([XTL, "explain", str(tmp_path / "nope.jpg"), "--model", "timm:test_resnet"],
                            capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "does not exist" in lines[0], result.stderr


def test_list_methods_and_help_name_every_method():
    from xtl.explain import METHODS

    listed = _invoke("explain", "--list-methods").output
    helped = runner.invoke(app, ["explain", "--help"], terminal_width=400).output
    for name, method in METHODS.items():
        assert name in listed and name in " ".join(helped.split()), name
    assert "Options: target_layer=None" in listed and "Chefer" in listed
