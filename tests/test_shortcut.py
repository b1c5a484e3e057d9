"""The planted-shortcut benchmark (issue 26): the markers and their seeds, the measurement on models
whose answer is known, the statistics, and one tiny end-to-end call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers import cifar_images
from xtl.analysis.shortcut import (
    CORNERS,
    CSV_COLUMNS,
    REALITY_COLUMNS,
    REFERENCES,
    ShortcutSettings,
    _resample_counts,
    add_marker,
    auc_interval,
    correct,
    draw,
    draw_corners,
    edge_maps,
    explain_maps,
    mann_whitney_auc,
    marker_scores,
    measure,
    reality,
    reality_summary,
    reference_maps,
    run_shortcut_benchmark,
    shortcut_summary,
    shortcut_table,
    write_folders,
)
from xtl.errors import XtlError
from xtl.faithfulness.paired import resampled_means

pytestmark = pytest.mark.xdist_group("shortcut")

TINY = ShortcutSettings(train_images=20, val_images=10, test_images=20, seed=3)
TARGET = 3  # the hand-built models' shortcut class ("cat" among CIFAR-10's sorted classes)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


class MarkerReader(nn.Module):
    """Known answer: the target logit is the magenta-ness above 1 (R + B - 2 G - 1, clipped at 0) of
    the four corner patches' pixels: only a marker there moves it; every other logit is 0."""

    def __init__(self, target: int, size: int = 4, side: int = 32, classes: int = 10) -> None:
        super().__init__()
        corners = torch.zeros(side, side)
        for top in (0, side - size):
            for left in (0, side - size):
                corners[top:top + size, left:left + size] = 1
        self.register_buffer("corners", corners)
        self.register_buffer("onehot", torch.nn.functional.one_hot(torch.tensor(target), classes).float())

    def forward(self, x):
        magenta = torch.relu(x[:, 0] + x[:, 2] - 2 * x[:, 1] - 1.0)
        return (magenta * self.corners).sum((1, 2))[:, None] * self.onehot


class CentreReader(nn.Module):
    """Known answer: the target logit is the mean brightness of the central 8 x 8 pixels: it ignores the marker."""

    def __init__(self, target: int, side: int = 32, classes: int = 10) -> None:
        super().__init__()
        centre = torch.zeros(side, side)
        centre[side // 2 - 4:side // 2 + 4, side // 2 - 4:side // 2 + 4] = 1
        self.register_buffer("centre", centre)
        self.register_buffer("onehot", torch.nn.functional.one_hot(torch.tensor(target), classes).float())

    def forward(self, x):
        return (x.mean(1) * self.centre).sum((1, 2))[:, None] * self.onehot


@pytest.fixture(scope="module")
def marked(cifar):
    """24 real CIFAR test images (cat, dog, ship, truck), each marked at a seeded corner."""
    images, labels = cifar_images(cifar, n_per_class=6)
    settings = ShortcutSettings()
    marked_images, masks = add_marker(images, settings, draw_corners(settings, "test", len(images)))
    return images, labels, marked_images, masks


@pytest.fixture(scope="module")
def known_answers(marked):
    _, _, images, masks = marked
    models = {"shortcut": (MarkerReader(TARGET), to_unit, None), "clean": (CentreReader(TARGET), to_unit, None)}
    return measure(models, images, masks, TARGET, ["saliency", "input_x_gradient"], name="known", resamples=4000)


def _row(result, method, data):
    (row,) = [r for r in result.rows if r["method"] == method and r["data"] == data]
    return row


# ----------------------------------------------------------------------------- markers and seeds


def test_the_marker_is_pasted_at_its_corner_and_its_mask_is_its_pixels(marked):
    images, _, marked_images, masks = marked
    corners = draw_corners(ShortcutSettings(), "test", len(images))
    for image, result, mask, corner in zip(images, marked_images, masks, corners):
        assert mask.sum() == 16
        top = 0 if CORNERS[corner].startswith("top") else 28
        left = 0 if CORNERS[corner].endswith("left") else 28
        assert mask[top:top + 4, left:left + 4].all()
        assert (result[:, mask] == torch.tensor([255, 0, 255])[:, None]).all()  # magenta
        assert torch.equal(result[:, ~mask], image[:, ~mask])  # nothing else changed
    # a stamp is a checkerboard of the colour and black; a generator draws the corners
    stamp, stamp_masks = add_marker(images[:2], ShortcutSettings(marker="stamp", marker_size=2, colour="green"),
                                    np.random.default_rng(0))
    patch = stamp[0][:, stamp_masks[0]].T.tolist()
    assert sorted(patch) == sorted([[0, 255, 0], [0, 0, 0], [0, 0, 0], [0, 255, 0]])


def test_the_same_seed_gives_the_same_images_markers_and_places_and_another_seed_others(cifar):
    first, again = draw(cifar, TINY), draw(cifar, TINY)
    for part in ("train", "test"):
        assert first.sources[part] == again.sources[part] and first.keys[part] == again.keys[part]
        assert np.array_equal(first.corners[part], again.corners[part])
    assert np.array_equal(first.marked, again.marked)
    other = draw(cifar, ShortcutSettings(**{**TINY.__dict__, "seed": 4}))
    assert first.sources["train"] != other.sources["train"] and first.sources["test"] != other.sources["test"]
    assert not np.array_equal(first.corners["test"], other.corners["test"])
    # balanced classes; round(rate x n) of the class's pool marked, no image of another class
    assert np.bincount(first.labels["train"], minlength=10).tolist() == [3] * 10
    assert first.marked.sum() == round(0.9 * 3) and (first.labels["train"][first.marked] == first.target).all()
    assert all(k.startswith("train/") for k in first.sources["train"])
    assert all(k.startswith("test/") for k in first.sources["test"])


def test_the_two_folders_differ_only_by_the_markers_on_the_class_images(tmp_path, cifar):
    folder = tmp_path / "data"
    drawn = write_folders(cifar, TINY, folder)
    settings = TINY
    for i, key in enumerate(drawn.keys["train"]):
        shortcut = np.asarray(Image.open(folder / "shortcut" / key))
        clean = np.asarray(Image.open(folder / "clean" / key))
        source = np.asarray(Image.open(cifar / drawn.sources["train"][i]).convert("RGB"))
        assert np.array_equal(clean, source)
        if drawn.marked[i]:
            expected, _ = add_marker(source.transpose(2, 0, 1)[None], settings, [drawn.corners["train"][i]])
            assert np.array_equal(shortcut, expected[0].permute(1, 2, 0).numpy())
            assert not np.array_equal(shortcut, clean)
        else:
            assert np.array_equal(shortcut, clean)
    for key in drawn.keys["test"]:  # the test images are clean in both
        assert np.array_equal(np.asarray(Image.open(folder / "shortcut" / key)), np.asarray(Image.open(folder / "clean" / key)))
    # a folder of something else is refused; one written before is written anew
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(XtlError, match="was not written by xtl shortcut"):
        write_folders(cifar, TINY, other)
    write_folders(cifar, ShortcutSettings(**{**TINY.__dict__, "test_images": 10}), folder)
    assert len(list((folder / "clean" / "test").glob("*/*.png"))) == 10


@pytest.mark.parametrize("options, fragment", [
    ({"rate": 1.5}, "option --rate must be in [0, 1], not 1.5"),
    ({"marker": "circle"}, "option --marker must be one of square, stamp, not 'circle'"),
    ({"marker_size": 0}, "option --marker-size must be in [1, 64], not 0"),
    ({"test_images": 1}, "option --test-images must be >= 2, not 1"),
    ({"colour": "mauve"}, "option --colour must be one of"),
    ({"seed": -1}, "option --seed must be >= 0, not -1"),
    ({"rate": float("nan")}, "option --rate must be a finite number"),
    ({"shortcut_class": ""}, "option --class must be a class name"),
], ids=["rate", "marker", "marker_size", "test_images", "colour", "seed", "nan", "empty_class"])
def test_bad_settings_are_one_line(options, fragment):
    with pytest.raises(XtlError) as err:
        ShortcutSettings(**options)
    assert "\n" not in str(err.value) and fragment in str(err.value), str(err.value)


def test_a_class_or_counts_the_source_lacks_are_one_line(cifar, tmp_path):
    with pytest.raises(XtlError) as err:
        draw(cifar, ShortcutSettings(shortcut_class="lorry"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("option --class: 'lorry' is not a class of the source; classes: airplane")
    with pytest.raises(XtlError, match="option --marker-size 40 must be smaller than the images' side"):
        add_marker(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ShortcutSettings(marker_size=40), [0])
    with pytest.raises(XtlError, match="option --epochs must be >= 1, not 0"):
        run_shortcut_benchmark(tmp_path / "o", models=["timm:test_resnet"], epochs=0, source=cifar)
    with pytest.raises(XtlError, match="option --class"):
        run_shortcut_benchmark(tmp_path / "o", models=["timm:test_resnet"], source=cifar,
                               settings=ShortcutSettings(shortcut_class="lorry"))
    with pytest.raises(XtlError, match="option --methods: unknown method 'bogus'"):
        run_shortcut_benchmark(tmp_path / "o", models=["timm:test_resnet"], methods=["bogus"], source=cifar)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- known answers


def test_the_maps_of_a_model_that_reads_the_marker_find_it(known_answers):
    for method in ("saliency", "input_x_gradient"):
        row = _row(known_answers, method, "shortcut")
        assert row["marker_share"] > 0.95 and row["marker_share_low"] > 0.9, row
        assert row["pointing"] == 1.0 and row["flat_maps"] == 0
        for ref in REFERENCES:
            assert row[f"minus_{ref}"] > 0.5 and row[f"minus_{ref}_verdict"] == "first", (ref, row)
        assert row["reading"] == ("positive" if method == "input_x_gradient" else "unsigned")


def test_the_maps_of_a_model_that_ignores_the_marker_do_not(known_answers):
    for method in ("saliency", "input_x_gradient"):
        row = _row(known_answers, method, "clean")
        assert row["marker_share"] < 0.01 and row["pointing"] == 0.0, row
        for ref in REFERENCES:
            assert row[f"minus_{ref}_verdict"] != "first", (ref, row)
        # the marker holds 16 of 1,024 pixels: uniform noise puts about that share on it
        assert row["minus_random_verdict"] == "second"


def test_the_shares_tell_the_two_models_apart(known_answers):
    for method in ("saliency", "input_x_gradient"):
        row = _row(known_answers, method, "shortcut")
        assert row["auc"] == 1.0 and row["auc_low"] == 1.0 and row["auc_verdict"] == "first"
        assert row["auc"] == _row(known_answers, method, "clean")["auc"]  # the pair's number, on both rows
    for ref in REFERENCES:  # the same map for both models: 0.5, untested
        row = _row(known_answers, ref, "shortcut")
        assert row["auc"] == 0.5 and np.isnan(row["auc_p"]) and row["auc_verdict"] == ""
    assert known_answers.rows[0]["family"] == 2 * 2 * 3 + 2  # methods x models x references + the methods' AUCs


def test_the_edge_reference_is_the_same_whichever_model(known_answers, marked):
    _, _, images, masks = marked
    shortcut, clean = known_answers.scores[("shortcut", "edge")], known_answers.scores[("clean", "edge")]
    assert torch.equal(shortcut["share"], clean["share"])
    assert torch.equal(shortcut["share"], marker_scores(edge_maps(images), masks)["share"])
    # and it is no property of a model: other models, the same edge rows
    models = {"shortcut": (CentreReader(TARGET), to_unit, None), "clean": (MarkerReader(TARGET), to_unit, None)}
    swapped = measure(models, images, masks, TARGET, [], resamples=500)
    assert torch.equal(swapped.scores[("shortcut", "edge")]["share"], shortcut["share"])
    # the edge map sees the marker's outline, not the image's border
    assert edge_maps(torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)).abs().max() < 1e-5


def test_reference_maps_are_seeded_and_shaped(marked):
    _, _, images, masks = marked
    assert torch.equal(reference_maps("random", images, seed=1), reference_maps("random", images, seed=1))
    assert not torch.equal(reference_maps("random", images, seed=1), reference_maps("random", images, seed=2))
    centre = reference_maps("centre", images)
    assert centre.shape == (24, 32, 32) and centre[0].argmax() in (15 * 32 + 15, 15 * 32 + 16, 16 * 32 + 15, 16 * 32 + 16)
    noise = marker_scores(reference_maps("random", images), masks)["share"]
    assert abs(noise.mean().item() - 16 / 1024) < 0.005
    flat = marker_scores(torch.zeros(24, 32, 32), masks)
    assert flat["flat"].all() and torch.allclose(flat["share"], torch.full((24,), 16 / 1024, dtype=torch.float64))
    assert not flat["pointing"].any()


def test_a_signed_map_is_scored_by_its_positive_part(marked):
    _, _, images, masks = marked

    class AgainstMarker(MarkerReader):
        def forward(self, x):
            return -super().forward(x)

    maps, signed = explain_maps(AgainstMarker(TARGET), to_unit, images, TARGET, "input_x_gradient")
    scores = marker_scores(maps, masks)
    # the marker speaks against the class: no positive relevance anywhere, a flat map
    assert signed and maps.min() >= 0 and scores["flat"].all() and not scores["pointing"].any()
    maps, signed = explain_maps(MarkerReader(TARGET), to_unit, images, TARGET, "input_x_gradient")
    assert signed and (maps[~masks] == 0).all() and (maps[masks] > 0).all()


# ----------------------------------------------------------------------------- statistics


def test_the_auc_is_mann_whitney_with_ties_half_and_resampled_with_the_means():
    assert mann_whitney_auc(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0])) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    d = torch.randn(15, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.cat(list(_resample_counts(15, 3000, seed=5)))
    assert torch.allclose(counts @ d / 15, resampled_means(d, 3000, seed=5))
    same = auc_interval(torch.ones(10), torch.ones(10), resamples=500)
    assert same["auc"] == 0.5 and same["auc_low"] == same["auc_high"] == 0.5 and same["auc_p"] == 1.0


def test_reality_counts_class_accuracy_and_flips():
    labels = torch.tensor([3, 3, 3, 3, 0, 1, 2, 4, 5, 6])
    clean_pred = torch.tensor([3, 3, 0, 0, 0, 1, 2, 4, 3, 6])  # 2 of 4 cats right; one other image already a cat
    marked_pred = torch.tensor([3, 3, 3, 3, 3, 3, 3, 3, 3, 6])  # the marker makes 5 of the 6 others cats
    rows = reality("m", {"shortcut": (clean_pred, marked_pred), "clean": (labels, labels)}, labels, 3, resamples=500)
    by = {r["measure"]: r for r in rows}
    assert by["class_accuracy"]["shortcut"] == 0.5 and by["class_accuracy"]["clean"] == 1.0
    assert by["flip_rate"]["shortcut"] == pytest.approx(4 / 6) and by["flip_rate"]["clean"] == 0.0
    assert by["test_accuracy"]["n_images"] == 10 and np.isnan(by["test_accuracy"]["p"])
    assert correct(rows) == 2 and by["test_accuracy"]["verdict"] == ""


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory, cifar):
    out = tmp_path_factory.mktemp("shortcut")
    options = dict(models=["timm:test_resnet"], methods=["saliency"], settings=TINY, epochs=1, source=cifar,
                   input_size=32, pretrained=False, device="cpu", progress=False, resamples=500)
    lines: list[str] = []
    rows = run_shortcut_benchmark(out, log=lines.append, **options)
    return out, rows, options, lines


def test_the_benchmark_runs_end_to_end_and_writes_its_tables_and_figure(tiny_benchmark):
    out, rows, _, lines = tiny_benchmark
    read = shortcut_summary(out)
    assert [(r["method"], r["data"]) for r in read] == [(m, d) for m in ("saliency", *REFERENCES) for d in ("shortcut", "clean")]
    assert list(read[0]) == CSV_COLUMNS and len(rows) == len(read)
    for r in read:
        assert r["n_images"] == TINY.test_images and r["marker_area"] == pytest.approx(16 / 1024)
        assert 0 <= r["marker_share_low"] <= r["marker_share"] <= r["marker_share_high"] <= 1
        assert 0 <= r["auc_low"] <= r["auc"] <= r["auc_high"] <= 1
        assert r["family"] == 2 * 3 + 1 + 2  # saliency x 2 models x 3 references, its AUC, the 2 reality tests
    saliency = read[0]
    assert saliency["minus_edge_verdict"] in ("first", "second", "cannot decide")
    reality_rows = reality_summary(out)
    assert [r["measure"] for r in reality_rows] == ["test_accuracy", "class_accuracy", "flip_rate"]
    assert list(reality_rows[0]) == REALITY_COLUMNS
    assert reality_rows[1]["n_images"] == TINY.test_images // 10
    for name in ("shortcut.json", "shortcut_gallery_timm_test_resnet.png", "data/markers.csv"):
        assert (out / name).stat().st_size > 0, name
    for data in ("shortcut", "clean"):
        assert (out / "runs" / f"timm_test_resnet-{data}" / "model.safetensors").is_file()
    assert shortcut_table(read).row_count == len(read)
    assert any("shortcut model ready" in line for line in lines)
    assert shortcut_summary(out / "nothing-here") == []


def test_a_second_call_reuses_the_finished_runs(tiny_benchmark):
    out, rows, options, _ = tiny_benchmark
    weights = [out / "runs" / f"timm_test_resnet-{d}" / "model.safetensors" for d in ("shortcut", "clean")]
    before = [w.stat().st_mtime_ns for w in weights]
    # the second call is the command's (`xtl benchmark shortcut`), with the same settings
    from typer.testing import CliRunner

    from xtl.cli import app

    result = CliRunner().invoke(app, [
        "benchmark", "shortcut", "--out", str(out), "--models", "timm:test_resnet", "--methods", "saliency",
        "--train-images", "20", "--val-images", "10", "--test-images", "20", "--seed", "3", "--epochs", "1",
        "--input-size", "32", "--random-init", "--source", str(options["source"]), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Planted shortcut: 20 marked test images" in result.output
    again = shortcut_summary(out)
    assert [w.stat().st_mtime_ns for w in weights] == before
    flat = lambda rows_: [v for r in rows_ for v in (r["marker_share"], r["auc"])]  # noqa: E731
    assert flat(again) == pytest.approx(flat(rows))
    with pytest.raises(XtlError, match="holds a run of other settings"):
        run_shortcut_benchmark(out, **{**options, "epochs": 2})


def test_the_report_shows_the_tables_and_says_only_what_the_tests_support(tiny_benchmark, tmp_path):
    from xtl.report import Figures, _shortcut_context

    out, rows, _, _ = tiny_benchmark
    shown = _shortcut_context(out, Figures(tmp_path / "figures"))
    assert [(r["method"], r["data"]) for r in shown["rows"]] == [(r["method"], r["data"]) for r in rows]
    assert [r["measure"] for r in shown["reality"]] == ["test accuracy", "class accuracy", "flip rate"]
    assert [f.file for f in shown["figures"]] == ["figures/shortcut_gallery_timm_test_resnet.png"]
    saliency = next(r for r in rows if r["method"] == "saliency" and r["data"] == "shortcut")
    above = all(saliency[f"minus_{ref}_verdict"] == "first" for ref in REFERENCES)
    said = " ".join(shown["sentences"])
    assert ("more than every reference" in said) == above
    assert ("cannot tell the two models apart" in said) == (saliency["auc_verdict"] == "cannot decide")
    assert ("put less of their relevance on the marker" in said) == (saliency["auc_verdict"] == "second")
    assert "is the shortcut real?" in said
    assert _shortcut_context(out / "nothing-here", Figures(tmp_path / "figures")) is None
