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
    assert unique_names([tmp_path / "new\nline.jpg", tmp_path / "-x.jpg"]) == ["new_line", "-x"]  # one line each


@pytest.mark.parametrize("case, fragment", [
    ("missing", "image {photos}/nope.jpg does not exist"),
    ("not_an_image", "none of the 1 image file(s) could be explained"),
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


def _awkward_and_bad_files(folder, cifar):
    """Valid images in awkward encodings and shapes, and files that are not images, in one folder."""
    folder.mkdir()
    rgb = np.asarray(Image.open(sorted((cifar / "test" / "ship").iterdir())[0]).convert("RGB"))
    good = {
        "cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p, quality=95),
        "sixteen.png": lambda p: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(p),
        "palette_alpha.png": lambda p: Image.fromarray(rgb).convert("P").save(p, transparency=bytes(range(256))),
        "one_pixel.png": lambda p: Image.fromarray(rgb[:1, :1]).save(p),
        "long.png": lambda p: Image.new("RGB", (20000, 20), (200, 30, 30)).save(p),
        "animated.gif": lambda p: Image.fromarray(rgb).save(p, save_all=True, append_images=[Image.fromarray(255 - rgb)]),
    }
    for name, write in good.items():
        write(folder / name)
    exif = Image.fromarray(rgb[:, :16]).getexif()
    exif[0x0112] = 6
    Image.fromarray(rgb[:, :16]).save(folder / "rotated.jpg", exif=exif, quality=95)
    good["rotated.jpg"] = None
    bad = {"truncated.jpg": "cannot be read as an image", "text.jpg": "cannot be read as an image",
           "empty.png": "is empty", "link_to_text.jpg": "cannot be read as an image"}
    data = (cifar / "test" / "cat" / sorted(p.name for p in (cifar / "test" / "cat").iterdir())[0]).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "text.jpg").write_text("name,label\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "link_to_text.jpg").symlink_to(folder / "text.jpg")
    return sorted(good), bad


def test_one_bad_file_among_many_is_skipped_and_the_others_are_written(photos, timm_weights, cifar, tmp_path):
    """Issue 28: a file that cannot be read among many is skipped with one line naming it, the good
    images (awkward ones included: CMYK, 16-bit, palette with alpha, 1 x 1, 20,000 x 20, an animated
    GIF's first frame, an EXIF rotation) are explained and written, and the last line counts the
    skipped; the exit status is 0 because something was explained."""
    folder = tmp_path / "mixed"
    good, bad = _awkward_and_bad_files(folder, cifar)
    out = tmp_path / "out"
    result = _invoke("explain", photos / "grey.bmp", folder, "--model", "timm:test_resnet", "--weights", timm_weights,
                     "--method", "saliency", "--out", out, "--batch-size", 4)
    for name, reason in bad.items():
        assert f"skipped: image file {folder / name} {reason}" in result.output, (name, result.output)
    assert f"{len(good) + 1} image(s) explained" in result.output and f"{len(bad)} skipped (named above)" in result.output
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image"] for r in rows) == sorted([str(photos / "grey.bmp")] + [str(folder / n) for n in good])
    for name in good:
        assert (out / name.rsplit(".", 1)[0] / "saliency.npy").is_file(), name
    assert not any((out / name.rsplit(".", 1)[0]).exists() for name in bad)


def test_awkward_images_decode_as_training_images_do(cifar, tmp_path):
    """`xtl explain` image files are decoded by the training decoder (`decode_image`): EXIF rotation
    applied (a 32 x 16 image stored rotated gives the same square as its upright version), a long thin
    image is cropped before it is resized, so it costs a square's memory."""
    good, _ = _awkward_and_bad_files(tmp_path / "files", cifar)
    for name in good:
        image = read_image(tmp_path / "files" / name, 24)
        assert image.shape == (3, 24, 24) and image.dtype == torch.uint8, name
    long = read_image(tmp_path / "files" / "long.png", 24)
    assert (long[0] == 200).all() and (long[1] == 30).all()


def test_nothing_explained_is_one_line_and_writes_nothing(timm_weights, cifar, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_text("hello")
    (folder / "b.png").write_bytes(b"")
    result = runner.invoke(app, ["explain", str(folder), "--model", "timm:test_resnet", "--weights", str(timm_weights),
                                 "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, XtlError), result.output
    assert str(result.exception) == "none of the 2 image file(s) could be explained: every one was skipped (each is named above)"
    assert f"skipped: image file {folder / 'a.jpg'} cannot be read as an image" in result.output
    assert not (tmp_path / "o" / "predictions.csv").exists()
    help_text = " ".join(runner.invoke(app, ["explain", "--help"], terminal_width=400).output.split())
    assert "skipped" in help_text and "exit status" in help_text


def test_the_class_shown_as_predicted_is_the_class_explained(photos, timm_weights, tmp_path, monkeypatch):
    """Issue 28: under bf16 autocast the probabilities can rank two close classes the other way round
    from the float32 pass that computes a map; the figure said "predicted: cat" beside a map of deer.
    The map now explains the class of the probabilities shown. Pinned where the two passes disagree
    by construction: the probabilities' pass is made to predict each image's least likely class."""
    from xtl.explain import files

    def least_likely_first(model, x):
        with torch.no_grad():
            return (-model(x).float()).softmax(1)

    monkeypatch.setattr(files, "class_probabilities", least_likely_first)
    out = tmp_path / "out"
    _invoke("explain", photos / "a" / "pet.jpg", "--model", "timm:test_resnet", "--weights", timm_weights,
            "--method", "saliency", "--out", out)
    with open(out / "predictions.csv", newline="") as f:
        row = next(csv.DictReader(f))
    loaded = load_image_model("timm:test_resnet", "cpu", timm_weights)
    x = loaded.preprocess(read_image(photos / "a" / "pet.jpg", loaded.spec.input_size)[None])
    with torch.no_grad():
        least = int(loaded.model(x).argmin(1))
    assert row["explained"] == row["top1"] == loaded.class_names[least]
    expected = explain(loaded.model, x, least, "saliency").raw[0].numpy()
    np.testing.assert_allclose(np.load(out / "pet" / "saliency.npy"), expected, rtol=1e-5, atol=1e-7)


def test_a_model_without_a_classification_head_is_refused_before_any_work(photos, tmp_path):
    """Issue 28: the DINOv2 backbone (timm `num_classes=0`) outputs features; explaining "its predicted
    class" ran for 15-47 s and ended in an IndexError. It is refused in one line, nothing written."""
    import timm

    assert class_names_of(timm.create_model("test_vit", num_classes=0)) == []
    result = runner.invoke(app, ["explain", str(photos / "grey.bmp"), "--model", "vit_s14_dinov2", "--method",
                                 "saliency", "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, XtlError), result.output
    assert str(result.exception) == ("option --model: vit_s14_dinov2 has no classification head (it outputs features, "
                                     "not class scores), so there is no class to explain; fine-tune it first "
                                     "(xtl finetune --model vit_s14_dinov2), or pass a run folder")
    assert not (tmp_path / "o").exists()


def test_an_out_folder_inside_the_input_folder_is_not_read_as_input(photos, timm_weights, tmp_path):
    """Issue 28 probe: `xtl explain DIR --out DIR/out` run twice explained its own overlays and
    figures the second time (6 images from 2). The output folder is left out of the inputs; an
    `--out` that holds an input folder is refused in one line, since the overlays would mix with the
    images."""
    folder = tmp_path / "in"
    shutil.copytree(photos, folder)
    args = ["explain", folder, "--model", "timm:test_resnet", "--weights", timm_weights, "--method", "saliency"]
    for _ in range(2):
        result = _invoke(*args, "--out", folder / "out")
        assert "3 image(s) explained" in result.output
    with open(folder / "out" / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    for out in (folder, tmp_path):
        refused = runner.invoke(app, [str(a) for a in (*args, "--out", out)])
        assert isinstance(refused.exception, XtlError)
        assert str(refused.exception).startswith(f"option --out: {out} holds the input folder {folder}")


def test_calls_sharing_an_out_folder_overwrite_nothing_of_each_other(photos, timm_weights, tmp_path):
    """Issue 28 probe: a second call with the same --out replaced `predictions.csv` (the first call's rows
    were lost) and wrote another image called `pet` into the first call's `pet/`. Each image folder now
    names its image, an image of the same name gets `pet_2/`, and the table keeps every call's rows;
    explaining the first image again reuses its folder."""
    out = tmp_path / "shared"
    model = ["--model", "timm:test_resnet", "--weights", timm_weights, "--method", "saliency", "--out", out]
    _invoke("explain", photos / "a" / "pet.jpg", *model)
    first = np.load(out / "pet" / "saliency.npy")
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("the user's")
    _invoke("explain", photos / "b" / "pet.png", *model)
    _invoke("explain", photos / "grey.bmp", *model[:-2], "--out", out)
    assert (out / "pet" / "image.txt").read_text().strip() == str((photos / "a" / "pet.jpg").resolve())
    assert (out / "pet_2" / "image.txt").read_text().strip() == str((photos / "b" / "pet.png").resolve())
    np.testing.assert_array_equal(np.load(out / "pet" / "saliency.npy"), first)
    with open(out / "predictions.csv", newline="") as f:
        images = sorted(row["image"] for row in csv.DictReader(f))
    assert images == sorted(str(p) for p in (photos / "a" / "pet.jpg", photos / "b" / "pet.png", photos / "grey.bmp"))
    _invoke("explain", photos / "a" / "pet.jpg", *model)  # the same image again: its own folder, one row
    assert not (out / "pet_3").exists() and (out / "notes" / "mine.txt").read_text() == "the user's"
    with open(out / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
