"""Localisation with known ground truth (issue 17): the generated benchmark, the scores of maps whose
answer is known, and `xtl localisation` end to end on a tiny setting."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from helpers import XTL, one_line_error
from xtl.analysis.localisation import (
    CSV_COLUMNS,
    BenchmarkSettings,
    generate,
    localisation_summary,
    reference_maps,
    score_maps,
    to_canvas,
    write_image_folder,
)
from xtl.cli import app
from xtl.errors import XtlError

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
TINY = BenchmarkSettings(canvas=48, object_min=16, object_max=28, train_images=20, val_images=4, images=12, seed=3)
runner = CliRunner()


def test_the_same_seed_gives_the_same_canvases_and_another_seed_others():
    first, again = generate(CIFAR, TINY, "test", 12), generate(CIFAR, TINY, "test", 12)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.masks, again.masks)
    assert first.objects == again.objects and first.backgrounds == again.backgrounds
    other = generate(CIFAR, BenchmarkSettings(**{**TINY.__dict__, "seed": 4}), "test", 12)
    assert not np.array_equal(first.images, other.images)
    # training canvases draw from CIFAR's train partition, test canvases from its test partition
    assert all(k.startswith("test/") for k in first.objects)
    assert all(k.startswith("train/") for k in generate(CIFAR, TINY, "train", 6).objects)


def test_the_mask_is_where_the_object_was_pasted():
    drawn = generate(CIFAR, TINY, "test", 12)
    classes = sorted(p.name for p in (CIFAR / "train").iterdir())
    for image, mask, label, (top, left, side, _), key in zip(drawn.images, drawn.masks, drawn.labels, drawn.boxes,
                                                             drawn.objects):
        assert TINY.object_min <= side <= TINY.object_max
        assert mask.sum() == side * side and mask[top:top + side, left:left + side].all()
        # the pixels inside are the object's, resized; the label is the object's class
        with Image.open(CIFAR / key) as obj:
            expected = np.asarray(obj.convert("RGB").resize((side, side), Image.Resampling.BILINEAR))
        assert np.array_equal(image[mask].reshape(side, side, 3), expected)
        assert key.split("/")[1] == classes[label]
    # the classes are balanced and a CIFAR background is never of the object's class
    assert np.bincount(drawn.labels, minlength=10).max() - np.bincount(drawn.labels, minlength=10).min() <= 1
    for label, background in zip(drawn.labels, drawn.backgrounds):
        assert background.startswith("texture:") or background != f"cifar:{classes[label]}"


def test_the_image_folder_holds_the_canvases_and_their_masks(tmp_path):
    # canvases of earlier, larger settings are removed; a folder of something else is refused
    folder, other = tmp_path / "data", tmp_path / "other"
    write_image_folder(CIFAR, BenchmarkSettings(**{**TINY.__dict__, "images": 20, "train_images": 30}), folder)
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(XtlError, match="was not written by xtl localisation"):
        write_image_folder(CIFAR, TINY, other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    classes, masks = write_image_folder(CIFAR, TINY, folder)
    assert len(list(folder.glob("train/*/*.png"))) == TINY.train_images + TINY.val_images
    assert sorted(masks) == sorted(str(p.relative_to(folder)) for p in folder.glob("test/*/*.png"))
    stored = np.load(folder / "masks.npz")
    assert [masks[k].sum() for k in stored["keys"]] == [m.sum() for m in stored["masks"]]
    drawn = generate(CIFAR, TINY, "test", TINY.images)
    key = f"test/{classes[drawn.labels[5]]}/00005.png"
    assert np.array_equal(np.asarray(Image.open(folder / key)), drawn.images[5]) and np.array_equal(masks[key], drawn.masks[5])


def test_an_oracle_map_scores_one_an_inverted_map_zero_and_a_flat_map_a_miss():
    masks = torch.from_numpy(generate(CIFAR, TINY, "test", 12).masks)
    oracle = score_maps(masks.float(), masks)
    inverted = score_maps(1 - masks.float(), masks)
    for name in ("pointing_game", "relevance_mass", "relevance_rank"):
        assert torch.allclose(oracle[name], torch.ones(12)), name
        assert torch.allclose(inverted[name], torch.zeros(12)), name
    # a flat map points nowhere: a miss, and the mask's share for mass and rank
    flat = score_maps(torch.zeros(12, TINY.canvas, TINY.canvas), masks)
    share = masks.flatten(1).float().mean(1)
    assert flat["flat"].all() and not flat["pointing_game"].any()
    assert torch.allclose(flat["relevance_mass"], share) and torch.allclose(flat["relevance_rank"], share)
    # uniform noise: relevance mass near the mask's share of the canvas
    noise = score_maps(reference_maps("random", 12, TINY.canvas), masks)["relevance_mass"]
    assert abs(noise.mean().item() - masks.float().mean().item()) < 0.03


def test_maps_are_brought_to_the_canvas_grid():
    fine = torch.zeros(1, 96, 96)
    fine[0, :48, :48] = 4.0  # a pixel-level map at twice the canvas size
    down = to_canvas(fine, 48, signed=False)
    assert down.shape == (1, 48, 48) and down[0, :24, :24].eq(4).all() and down[0, 24:].eq(0).all()
    coarse = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])  # a signed 2 x 2 grid: its positive part
    up = to_canvas(coarse, 48, signed=True)
    assert up.shape == (1, 48, 48) and up.min() == 0 and up[0, 0, 0] == 1 and up[0, 0, -1] == 0


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    out = tmp_path_factory.mktemp("localisation")
    result = runner.invoke(app, [
        "localisation", "--out", str(out), "--models", "timm:resnet10t", "--random-init", "--images", "8",
        "--train-images", "20", "--val-images", "4", "--epochs", "1", "--canvas", "32", "--input-size", "32",
        "--methods", "gradcam,saliency,random,centre", "--source", str(CIFAR), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output


def test_xtl_localisation_runs_end_to_end_and_writes_its_table_and_figures(tiny_benchmark):
    out, output = tiny_benchmark
    rows = localisation_summary(out)
    assert [(r["model"], r["method"]) for r in rows] == [("timm:resnet10t", m) for m in ("gradcam", "saliency", "random", "centre")]
    assert list(rows[0]) == CSV_COLUMNS
    for r in rows:
        assert r["n_images"] == 8
        for metric in ("pointing_game", "relevance_mass", "relevance_rank"):
            assert 0 <= r[f"{metric}_low"] <= r[metric] <= r[f"{metric}_high"] <= 1
    assert (out / "localisation.png").stat().st_size > 0 and (out / "gallery_timm_resnet10t.png").stat().st_size > 0
    assert (out / "runs" / "timm_resnet10t" / "model.safetensors").is_file()
    assert "Localisation" in output and "pointing game" in output
    assert localisation_summary(out / "nothing-here") == []


def test_a_second_run_of_the_same_settings_reuses_the_fine_tuned_model(tiny_benchmark):
    out, _ = tiny_benchmark
    weights = out / "runs" / "timm_resnet10t" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    result = runner.invoke(app, [
        "localisation", "--out", str(out), "--models", "timm:resnet10t", "--random-init", "--images", "8",
        "--train-images", "20", "--val-images", "4", "--epochs", "1", "--canvas", "32", "--input-size", "32",
        "--methods", "random", "--source", str(CIFAR), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert weights.stat().st_mtime_ns == before
    assert [r["method"] for r in localisation_summary(out)] == ["random"]
    assert len(list((out / "data" / "test").glob("*/*.png"))) == 8
    # other settings into the same folder: one line, nothing trained over the run
    result = runner.invoke(app, [
        "localisation", "--out", str(out), "--models", "timm:resnet10t", "--random-init", "--images", "8",
        "--train-images", "20", "--val-images", "4", "--epochs", "2", "--canvas", "32", "--input-size", "32",
        "--methods", "random", "--source", str(CIFAR), "--no-progress", "--device", "cpu"])
    assert isinstance(result.exception, XtlError) and "holds a run of other settings" in str(result.exception)


@pytest.mark.parametrize("options, fragment", [
    (["--images", "0"], "option --images must be >= 1, not 0"),
    (["--epochs", "0"], "option --epochs must be >= 1, not 0"),
    (["--methods", "bogus"], "option --methods: unknown method 'bogus'"),
    (["--methods", "attnlrp", "--models", "efficientnet_lite0"], "option --methods: none of attnlrp applies to efficientnet_lite0"),
    (["--models", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["--canvas", "8"], "option --canvas must be in [16, 512], not 8"),
    (["--device", "tpu"], "--device"),
], ids=["images", "epochs", "unknown_method", "method_of_another_family", "unknown_model", "canvas", "device"])
def test_bad_options_are_one_line(options, fragment, tmp_path):
    result = runner.invoke(app, ["localisation", "--out", str(tmp_path / "o"), *options])
    assert isinstance(result.exception, XtlError), result.output + repr(result.exception)
    message = str(result.exception)
    assert "\n" not in message and fragment in message, message
    assert not (tmp_path / "o").exists()


def test_the_command_has_help_naming_its_options():
    result = runner.invoke(app, ["localisation", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--models", "--methods", "--images", "--epochs", "--seed", "--device"):
        assert option in result.output, option


def test_a_bad_option_exits_2_in_one_line_from_the_shell(tmp_path):
    result = subprocess.run([XTL, "localisation", "--out", str(tmp_path / "o"), "--images", "-1"],
                            capture_output=True, text=True, timeout=120)
    one_line_error(result, "option --images must be >= 1, not -1")
