"""Faithfulness metrics: known answers on a model where one region alone decides, exact end points,
independence of the batch size, perturbation on a coarse grid, ROAD's imputation against a direct
float64 solve, and `xtl faithfulness` on a real (tiny) run."""

from __future__ import annotations

import csv
import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import CIFAR
from xtl.config import RunConfig
from xtl.data import Preprocess, SplitSpec, load_split
from xtl.evaluate import evaluate
from xtl.errors import XtlError
from xtl.faithfulness import (
    BASELINES, METRICS, baseline_inputs, faithfulness_run, perturbation_masks, random_maps, relevance_ranks,
    road_fill, road_noise, score, score_maps, uniform_maps,
)
from xtl.models import build_model
from xtl.models.registry import native_bf16
from xtl.runs import RunDir, split_spec
from xtl.train import finetune

torch.set_num_threads(1)
XTL = str(Path(sys.executable).with_name("xtl"))
ROWS, COLS = slice(6, 10), slice(6, 10)  # the deciding region: 16 of 256 pixels, away from the top rows


class RegionModel(nn.Module):
    """Two classes; only the mean of the region's pixels counts: class 0 while it is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = x[:, :, ROWS, COLS].mean((1, 2, 3))
        return torch.stack([8 * (evidence - 0.5), torch.zeros_like(evidence)], 1)


def _region_images(n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 16, 16, generator=g)
    images[:, :, ROWS, COLS] = 1 + 0.1 * torch.randn(n, 3, 4, 4, generator=g)
    region = torch.zeros(n, 16, 16)
    region[:, ROWS, COLS] = 1
    return images, torch.zeros(n, dtype=torch.long), region


@pytest.mark.parametrize("baseline", ["zero", "road"])
def test_the_region_map_beats_random_and_the_reversed_map_loses_on_every_metric(baseline):
    images, labels, region = _region_images()
    maps = {"region": region, "random": random_maps(tuple(region.shape), seed=0), "reversed": 1 - region}
    scores = score_maps(RegionModel(), images, labels, maps, steps=10, baseline=baseline)
    assert set(scores["region"].curves) == set(METRICS)
    for name, metric in METRICS.items():
        auc = {k: s.curves[name].auc.mean().item() for k, s in scores.items()}
        sign = 1 if metric.higher_is_better else -1
        assert sign * auc["region"] > sign * auc["random"] > sign * auc["reversed"], (name, auc)
    # the region is 6 % of the pixels: gone at the first 10 % step, so the prediction flips there
    assert scores["region"].curves["positive"].values[:, 1].sum() == 0
    assert scores["reversed"].curves["positive"].values.min() == 1


@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_deleting_every_pixel_gives_the_probability_of_the_baseline_input(baseline):
    images, labels, region = _region_images(4)
    model = RegionModel()
    expected_fill = {"zero": torch.zeros_like(images),
                     "mean": images.mean((2, 3), keepdim=True).expand_as(images)}.get(baseline)
    fill = baseline_inputs(images, baseline)
    if expected_fill is not None:
        assert torch.equal(fill, expected_fill)
    result = score(model, images, labels, region, steps=5, baseline=baseline)
    with torch.no_grad():
        p_fill, p_image = model(fill).softmax(1)[:, 0], model(images).softmax(1)[:, 0]
    assert torch.equal(result.curves["deletion"].values[:, -1], p_fill)
    assert torch.equal(result.curves["deletion"].values[:, 0], p_image)
    assert torch.equal(result.curves["insertion"].values[:, 0], p_fill)  # nothing revealed yet


def test_batch_sizes_1_and_64_give_identical_results():
    images, labels, region = _region_images()
    maps = {"region": region, "random": random_maps(tuple(region.shape), seed=3)}
    one = score_maps(RegionModel(), images, labels, maps, steps=7, batch_size=1)
    many = score_maps(RegionModel(), images, labels, maps, steps=7, batch_size=64)
    for name in maps:
        for metric in METRICS:
            assert torch.equal(one[name].curves[metric].values, many[name].curves[metric].values)
            assert torch.equal(one[name].curves[metric].auc, many[name].curves[metric].auc)


def test_a_real_cnn_agrees_across_batch_sizes_up_to_its_own_rounding():
    """A conv net's kernels sum in a different order for 1 and for 64 images (~1e-7): the inputs and
    the ranking are the same, so the accuracy curves are equal and the probabilities within 1e-6."""
    torch.manual_seed(0)
    model, spec = build_model("timm:resnet10t", 10, pretrained=False, input_size=32)
    test = load_split(str(CIFAR), SplitSpec("random", train_size=0, val_size=0, test_size=4, seed=0))["test"]
    images = Preprocess(32, spec.mean, spec.std)(test.images)
    maps = random_maps((4, 32, 32), seed=1)
    one = score(model.eval(), images, test.labels, maps, steps=5, batch_size=1)
    many = score(model, images, test.labels, maps, steps=5, batch_size=64)
    for metric in METRICS:
        torch.testing.assert_close(one.curves[metric].values, many.curves[metric].values, atol=1e-6, rtol=0)


def test_bf16_scoring_reads_the_same_curves_as_float32_within_its_rounding():
    """bf16 autocast only rounds the forward passes: same targets, same ranking, probabilities within
    bf16's few parts in a thousand. The default is bf16 where the device has it natively (a GPU, an
    AMX or AVX512-BF16 CPU: `native_bf16`), float32 elsewhere."""
    torch.manual_seed(0)
    model, spec = build_model("timm:resnet10t", 10, pretrained=False, input_size=32)
    test = load_split(str(CIFAR), SplitSpec("random", train_size=0, val_size=0, test_size=8, seed=0))["test"]
    images = Preprocess(32, spec.mean, spec.std)(test.images)
    maps = random_maps((8, 32, 32), seed=1)
    default = score(model.eval(), images, test.labels, maps, steps=5)
    float32 = score(model, images, test.labels, maps, steps=5, bf16=False)
    bf16 = score(model, images, test.labels, maps, steps=5, bf16=True)
    expected = bf16 if native_bf16("cpu") else float32
    torch.testing.assert_close(default.curves["deletion"].values, expected.curves["deletion"].values, atol=0, rtol=0)
    assert not torch.equal(bf16.curves["deletion"].values, float32.curves["deletion"].values)
    for metric in ("deletion", "insertion"):
        torch.testing.assert_close(bf16.curves[metric].values, float32.curves[metric].values, atol=0.02, rtol=0)


def test_ties_keep_raster_order_and_random_maps_are_seeded():
    maps = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert relevance_ranks(maps).tolist() == [[2, 0, 1, 3]]
    assert relevance_ranks(torch.zeros(1, 2, 2)).tolist() == [[0, 1, 2, 3]]  # uniform: row by row
    assert torch.equal(random_maps((2, 4, 4), seed=5), random_maps((2, 4, 4), seed=5))
    assert not torch.equal(random_maps((2, 4, 4), seed=5), random_maps((2, 4, 4), seed=6))


# ----------------------------------------------------------------------------- a coarse grid


def _cifar(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images of a seeded CIFAR-10 split, normalised, resized to `size`."""
    test = load_split(str(CIFAR), SplitSpec("random", train_size=0, val_size=0, test_size=n, seed=0))["test"]
    return Preprocess(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(test.images), test.labels


@pytest.mark.parametrize("size, grid", [((10, 10), 3), ((37, 29), 8), ((12, 12), 12)])
def test_grid_masks_cover_whole_blocks_and_count_cells(size, grid):
    """Each cell masks its whole block (rows y with y * G // H == i; blocks of H // G or H // G + 1 rows
    where H is not a multiple of G), never part of one, and the counts are of cells."""
    h, w = size
    maps = random_maps((4, h, w), seed=2, grid=grid)
    row_cell, col_cell = [y * grid // h for y in range(h)], [x * grid // w for x in range(w)]
    first_row, first_col = [row_cell.index(i) for i in range(grid)], [col_cell.index(i) for i in range(grid)]
    cells = maps[:, first_row][:, :, first_col]  # [4, G, G]: each cell's value, read at its first pixel
    assert torch.equal(cells[:, row_cell][:, :, col_cell], maps)  # the random reference is constant per block
    assert cells.flatten(1).unique(dim=1).shape[1] == grid * grid  # and random per cell
    assert set(np.bincount(row_cell)) <= {h // grid, -(-h // grid)}
    counts = torch.tensor([0, 1, 5, grid * grid - 1])
    ranks = relevance_ranks(cells)
    for most_first in (True, False):
        mask = perturbation_masks(ranks, counts, torch.full((4,), most_first), size, grid)
        for j, count in enumerate(counts.tolist()):
            values = maps[j][mask[j]]
            masked_cells = set(values.tolist())
            assert len(masked_cells) == count
            # whole blocks: every pixel holding a masked cell's value is masked
            assert int(mask[j].sum()) == sum(int((maps[j] == v).sum()) for v in masked_cells)
            if count:  # the most (least) relevant cells
                unmasked = maps[j][~mask[j]]
                assert (values.min() >= unmasked.max()) if most_first else (values.max() <= unmasked.min())


def test_a_grid_of_the_input_size_is_per_pixel_scoring():
    images, labels, region = _region_images()
    maps = {"region": region, "random": random_maps(tuple(region.shape), seed=1),
            "uniform": uniform_maps(tuple(region.shape))}
    pixels = score_maps(RegionModel(), images, labels, maps, steps=10)
    cells = score_maps(RegionModel(), images, labels, maps, steps=10, grid=16)
    assert torch.equal(random_maps((8, 16, 16), seed=1, grid=16), maps["random"])
    for name, metric in itertools.product(maps, METRICS):
        assert torch.equal(pixels[name].curves[metric].values, cells[name].curves[metric].values)


@pytest.mark.parametrize("baseline", ["zero", "road"])
def test_grid_scoring_equals_per_pixel_scoring_of_images_upsampled_from_the_grid(baseline):
    """An independent check: CIFAR images nearest-upsampled 32 -> 64 px, maps constant on each 2 x 2
    block. Per pixel, a block's 4 pixels are ranked together (distinct values per block) and with 8
    steps every masked count is a whole number of blocks, so grid=32 must give the same curves."""
    torch.manual_seed(0)
    model, _ = build_model("timm:resnet10t", 10, pretrained=False, input_size=64)
    small, labels = _cifar(4, 32)
    images = small.repeat_interleave(2, 2).repeat_interleave(2, 3)
    g = torch.Generator().manual_seed(4)
    blocks = {"random": torch.rand(4, 32, 32, generator=g),
              "saliency-like": small.abs().mean(1) + 1e-3 * torch.rand(4, 32, 32, generator=g)}
    maps = {name: m.repeat_interleave(2, 1).repeat_interleave(2, 2) for name, m in blocks.items()}
    pixels = score_maps(model.eval(), images, labels, maps, steps=8, baseline=baseline, batch_size=32)
    cells = score_maps(model, images, labels, maps, steps=8, baseline=baseline, batch_size=32, grid=32)
    for name, metric in itertools.product(maps, METRICS):
        assert torch.equal(pixels[name].curves[metric].values, cells[name].curves[metric].values), (name, metric)


# ----------------------------------------------------------------------------- ROAD


def _dense_road(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ROAD's linear system written out pixel by pixel and solved densely in float64: each masked pixel
    equals the weighted mean of its neighbours inside the image (1/6 direct, 1/12 diagonal)."""
    h, w = mask.shape
    unknown = {p: k for k, p in enumerate(zip(*np.nonzero(mask)))}
    a, b = np.zeros((len(unknown), len(unknown))), np.zeros((len(unknown), image.shape[0]))
    for (y, x), k in unknown.items():
        for dy, dx in itertools.product((-1, 0, 1), repeat=2):
            yy, xx, weight = y + dy, x + dx, 1 / 12 if dy and dx else 1 / 6
            if (dy or dx) and 0 <= yy < h and 0 <= xx < w:
                a[k, k] += weight
                if mask[yy, xx]:
                    a[k, unknown[yy, xx]] -= weight
                else:
                    b[k] += weight * image[:, yy, xx]
    solved = np.linalg.solve(a, b)
    out = image.copy()
    for (y, x), k in unknown.items():
        out[:, y, x] = solved[k]
    return out


@pytest.mark.parametrize("size", [12, 32])
def test_road_fill_solves_the_papers_linear_system(size):
    """Against a dense float64 solve on real CIFAR images: scattered pixels, whole blocks, one pixel
    short of everything; in float64 to a tight tolerance the same solution to 1e-8; float32 at the
    default tolerance to 1e-4 (normalised units; ROAD's noise is ~0.04)."""
    images, _ = _cifar(3, size)
    g = torch.Generator().manual_seed(size)
    masks = torch.stack([torch.rand(size, size, generator=g) < 0.5,
                         (torch.rand(size // 4, size // 4, generator=g) < 0.7).repeat_interleave(4, 0)
                         .repeat_interleave(4, 1),
                         torch.ones(size, size, dtype=torch.bool)])
    masks[2, size // 2, 0] = False  # one known pixel at the border
    expected = np.stack([_dense_road(images[i].double().numpy(), masks[i].numpy()) for i in range(3)])
    exact = road_fill(images.double(), masks, tolerance=1e-12)
    np.testing.assert_allclose(exact.numpy(), expected, atol=1e-8, rtol=0)
    filled = road_fill(images, masks)
    np.testing.assert_allclose(filled.double().numpy(), expected, atol=1e-4, rtol=0)
    known = ~masks[:, None].expand_as(images)
    assert torch.equal(filled[known], images[known])  # unmasked pixels untouched, bit for bit
    assert torch.equal(road_fill(images, torch.ones(3, size, size, dtype=torch.bool)), torch.zeros_like(images))


def test_road_noise_is_seeded_scaled_and_only_on_masked_pixels():
    images, labels = _cifar(4, 16)
    mask = torch.rand(4, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    noise = road_noise(tuple(images.shape), seed=3, pixel_std=(0.25, 0.5, 0.25))
    assert torch.equal(noise, road_noise(tuple(images.shape), seed=3, pixel_std=(0.25, 0.5, 0.25)))
    assert not torch.equal(noise, road_noise(tuple(images.shape), seed=4, pixel_std=(0.25, 0.5, 0.25)))
    # 0.01 of the [0, 1] range, in normalised units: 0.04 for std 0.25, 0.02 for std 0.5
    assert [round(float(noise[:, c].std()), 3) for c in range(3)] == pytest.approx([0.04, 0.02, 0.04], abs=0.002)
    added = road_fill(images, mask, noise) - road_fill(images, mask)
    on = mask[:, None].expand_as(images)
    torch.testing.assert_close(added[on], noise[on], atol=1e-6, rtol=0)
    assert torch.equal(added[~on], torch.zeros_like(added[~on]))
    # scoring: the same seed gives the same curves, another seed other probabilities
    _, _, region = _region_images(4)
    model = RegionModel()
    one, again, other = (score(model, images, labels, region, steps=4, baseline="road", seed=s) for s in (0, 0, 1))
    assert torch.equal(one.curves["deletion"].values, again.curves["deletion"].values)
    assert not torch.equal(one.curves["deletion"].values, other.curves["deletion"].values)


@pytest.mark.parametrize("call, option", [
    (lambda x, y, m: score(RegionModel(), x, y, m, grid=0), "score(): grid"),
    (lambda x, y, m: score(RegionModel(), x, y, m, grid=2.5), "score(): grid"),
    (lambda x, y, m: score(RegionModel(), x, y, m, grid="native"), "score(): grid"),
    (lambda x, y, m: score(RegionModel(), x, y, m, grid=17), "score(): grid"),
    (lambda x, y, m: score(RegionModel(), x, y, m, baseline="roads"), "score(): baseline"),
], ids=["zero", "fraction", "native_without_a_run", "finer_than_the_input", "unknown_baseline"])
def test_bad_grid_or_baseline_in_the_api_names_the_option(call, option):
    """The library names the Python parameter, not the CLI's option (issue 27)."""
    images, labels, region = _region_images(2)
    with pytest.raises(XtlError) as error:
        call(images, labels, region)
    assert option in str(error.value) and "--" not in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- a real run, through the CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cifar) -> RunDir:
    config = RunConfig(source=str(cifar), model="timm:resnet10t", pretrained=False, input_size=32, split="random",
                       train_size=40, val_size=10, test_size=12, stratified=True, batch_size=20, epochs=1, patience=0)
    run = RunDir(tmp_path_factory.mktemp("runs") / "cnn")
    data = load_split(config.source, split_spec(config))
    finetune(config, data, run, progress=False)
    evaluate(run, data, device="cpu")
    return run


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_each_runs_table_and_figure_and_the_combined_table(tiny_run, tmp_path):
    second = tmp_path / "copy"
    shutil.copytree(tiny_run.path, second)
    result = subprocess.run([XTL, "faithfulness", str(tiny_run.path), str(second), "--methods",
                             "gradcam,saliency,transformer_attribution", "--images", "6", "--steps", "4",
                             "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = _read(tiny_run.file("faithfulness.csv"))
    # transformer_attribution does not apply to a CNN; the two reference maps are always there
    assert [r["method"] for r in rows] == ["gradcam", "saliency", "random", "uniform"] * 2
    assert [r["baseline"] for r in rows] == ["zero"] * 4 + ["road"] * 4  # the default: both baselines
    assert {r["grid"] for r in rows} == {"32"}  # the default: the common grid, CIFAR's own pixels
    for column in ("deletion", "insertion", "positive", "negative", "positive_true", "negative_true"):
        assert all(0 <= float(r[column]) <= 1 for r in rows)
    assert rows[0]["n_images"] == "6" and float(rows[0]["score_images_per_s"]) > 0
    assert (tiny_run.figures / "faithfulness_curves.png").stat().st_size > 10_000
    combined = _read(tiny_run.file("faithfulness_combined.csv"))
    assert [r["run"] for r in combined] == ["cnn"] * 8 + ["copy"] * 8
    assert [r["deletion"] for r in combined[:8]] == [r["deletion"] for r in combined[8:]]  # same model, same numbers
    assert (tiny_run.figures / "faithfulness_combined.png").is_file()
    assert "Faithfulness" in result.stdout


def test_a_bad_option_is_a_one_line_error_naming_it(tiny_run):
    result = subprocess.run([XTL, "faithfulness", str(tiny_run.path), "--baseline", "grey"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--baseline" in lines[0] and "zero, mean, blur" in lines[0], result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--grid", "0"], "option --grid must be a number of cells per side >= 1, common, native, model or none (pixels), not 0"),
    (["--grid", "fine"], "option --grid must be a number of cells per side, common, model, native or none, not 'fine'"),
    (["--grid", "33"], "option --grid must be at most the input's 32 px per side, not 33"),
    (["--baseline", "roads"], "option --baseline must be one of zero, mean, blur, road, not 'roads'"),
], ids=["zero", "not_a_number", "finer_than_the_input", "unknown_baseline"])
def test_a_bad_grid_or_baseline_is_a_one_line_error_naming_it(tiny_run, args, fragment):
    result = subprocess.run([XTL, "faithfulness", str(tiny_run.path), "--images", "2", "--no-progress", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--faithfulness-grid", "0"], "option --faithfulness-grid must be a number >= 1, common, model, native or none (pixels), not 0"),
    (["--faithfulness-baseline", "roads"], "option --faithfulness-baseline must be one or more of zero, mean, blur, road"),
], ids=["grid", "baseline"])
def test_a_bad_pipeline_grid_or_baseline_is_a_one_line_error_naming_it(args, fragment):
    result = subprocess.run([XTL, "run", *args, "--show-config"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_native_grid_and_plain_progress_lines_on_a_non_terminal(tiny_run, tmp_path, capsys):
    """grid="native" is the source's 32 px: on this 32 px model, per pixel; off a terminal (pytest's
    captured stderr) progress is one plain line per batch and one per method."""
    copies = [tmp_path / name for name in ("pixel", "native")]
    for copy in copies:
        shutil.copytree(tiny_run.path, copy, ignore=shutil.ignore_patterns("faithfulness*"))
    options = dict(methods=["saliency"], n_images=4, steps=3, explain_batch_size=2, resume=False, baseline="zero")
    capsys.readouterr()
    pixel = faithfulness_run([RunDir(copies[0])], progress=False, grid=None, **options)[0]
    assert capsys.readouterr().err == ""
    native = faithfulness_run([RunDir(copies[1])], progress=True, grid="native", **options)[0]
    lines = capsys.readouterr().err.splitlines()
    assert native.grid == 32 and [r["grid"] for r in native.rows()] == ["32"] * 3
    assert [r["grid"] for r in _read(copies[0] / "faithfulness.csv")] == ["pixel"] * 3
    for a, b in zip(pixel.methods, native.methods):
        assert all(torch.equal(a.curves[c].auc, b.curves[c].auc) for c in a.curves), a.method
    assert len(lines) == 2 + 3, lines
    assert lines[0].startswith("faithfulness native (zero, grid 32): batch 1/2 (2 of 4 images) saliency ")
    assert lines[0].endswith(" s elapsed)") and "random" in lines[0] and "uniform" in lines[0]
    assert [line.split(": ")[1].split(" (")[0] for line in lines[2:]] == [
        f"{m} scored on 4 images" for m in ("saliency", "random", "uniform")]


def test_stored_explanations_are_scored_instead_of_explained_again(tiny_run, tmp_path, monkeypatch):
    """After `xtl explain`, faithfulness scores the stored maps of the same images (the make-run
    pipeline explains the first test images once), with the scores of maps computed afresh."""
    from xtl.explain.runner import explain_run
    from xtl.faithfulness import runner as faithfulness_runner

    copies = [tmp_path / name for name in ("fresh", "stored")]
    for copy in copies:
        shutil.copytree(tiny_run.path, copy, ignore=shutil.ignore_patterns("faithfulness*", "explanations"))
    explain_run(RunDir(copies[1]), ["saliency", "gradcam"], "test", 6, 4, "predicted", device="cpu", progress=False)
    options = dict(methods=["saliency", "gradcam"], n_images=8, steps=4, explain_batch_size=4, resume=False,
                   progress=False, baseline="zero")
    explained: dict[str, int] = {"fresh": 0, "stored": 0}
    real = faithfulness_runner._explain_all

    def counting(key):
        def counted(model, spec, images, targets, method, batch_size, options, bar, title):
            if "true class" not in title:  # the predicted class's maps (true-class maps are never stored)
                explained[key] += len(images)
            return real(model, spec, images, targets, method, batch_size, options, bar, title)
        return counted

    monkeypatch.setattr(faithfulness_runner, "_explain_all", counting("fresh"))
    fresh = faithfulness_run([RunDir(copies[0])], **options)[0]
    monkeypatch.setattr(faithfulness_runner, "_explain_all", counting("stored"))
    stored = faithfulness_run([RunDir(copies[1])], **options)[0]
    assert explained["fresh"] == 2 * 8
    # 6 of 8 images were stored: the last 2 per method are explained (plus any image whose predicted
    # class differs between explain's float32 forward and scoring's)
    assert 2 * 2 <= explained["stored"] < 2 * 8
    # equal up to float rounding of the maps (another batch and memory layout can reorder near-ties):
    # probabilities per image; the 0/1 accuracy curves of this random-init model can flip one step
    for a, b in zip(fresh.methods, stored.methods):
        for column in ("deletion", "insertion"):
            torch.testing.assert_close(a.curves[column].auc, b.curves[column].auc, rtol=0, atol=5e-3)
        for column in a.curves:
            assert abs(a.curves[column].auc.mean() - b.curves[column].auc.mean()) < 0.05, column


def test_the_model_grid_is_the_cam_layers_cells_or_the_vits_patches(tiny_run, tmp_path, cifar):
    """grid="model" (the quick preset's): the side of the CAM layer's output for a CNN, the patch grid
    for a ViT, read off the model itself; scoring with it equals scoring with that number."""
    from xtl.explain.cam import layer_outputs
    from xtl.faithfulness.runner import model_grid
    from xtl.models import build_model, submodule

    copy = tmp_path / "cnn"
    shutil.copytree(tiny_run.path, copy, ignore=shutil.ignore_patterns("faithfulness*"))
    model, spec = RunDir(copy).load_model()
    x = torch.zeros(1, 3, 64, 64)
    with torch.inference_mode(), layer_outputs(submodule(model, spec.target_layer)) as outputs:
        model(x)
    assert model_grid(model, spec, x) == outputs[0].shape[-1] == 2  # resnet10t: stride 32 at 64 px
    vit, vit_spec = build_model("timm:vit_tiny_patch16_224", 10, pretrained=False, input_size=64)
    assert model_grid(vit, vit_spec, x) == 4
    options = dict(methods=["saliency"], n_images=4, steps=3, explain_batch_size=2, resume=False, progress=False)
    by_name = faithfulness_run([RunDir(copy)], grid="model", **options)[0]
    by_number = faithfulness_run([RunDir(copy)], grid=1, **options)[0]  # 32 px input: 1 x 1 cells
    assert by_name.grid == 1
    for a, b in zip(by_name.methods, by_number.methods):
        assert all(torch.equal(a.curves[c].auc, b.curves[c].auc) for c in a.curves)


# ----------------------------------------------------------------------------- settings: checked once, one object


@pytest.mark.parametrize("options, fragment", [
    (dict(explain_batch_size=0), "option --explain-batch-size must be at least 1, not 0"),
    (dict(n_images=0), "option --images must be at least 1, not 0"),
    (dict(split="dev"), "option --split must be train, val or test, not 'dev'"),
    (dict(steps=0), "option --steps must be at least 1, not 0"),
    (dict(batch_size=0), "option --batch-size must be at least 1, not 0"),
    (dict(baseline="grey"), "option --baseline must be one of zero, mean, blur, road, not 'grey'"),
    (dict(grid=0), "option --grid must be a number of cells per side >= 1, common, native, model or none (pixels), not 0"),
    (dict(methods=["gradcam", "nope"]), "option --methods: unknown method(s) nope"),
])
def test_the_settings_check_every_option_when_made(options, fragment):
    from xtl.faithfulness import FaithfulnessSettings

    with pytest.raises(XtlError) as error:
        FaithfulnessSettings(**options)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    # the run-level entry point checks through the same object, before loading any run
    with pytest.raises(XtlError) as from_run:
        faithfulness_run([RunDir("/nonexistent")], **options)
    assert str(from_run.value) == str(error.value)


def test_the_settings_resolve_a_named_grid_and_keep_the_cache_key_of_earlier_versions():
    """A named grid must be resolved (`with_grid`) before images are scored; the resume cache's key
    holds the settings as it always did, so caches written before the settings object stay valid."""
    from xtl.faithfulness import FaithfulnessSettings
    from xtl.faithfulness.cache import cache_settings

    settings = FaithfulnessSettings(steps=4, grid="native", methods=["saliency"], method_options={"saliency": {}})
    assert settings.methods == ("saliency",)
    with pytest.raises(XtlError, match="--grid native"):
        settings.cells
    assert settings.with_grid(8).cells == 8 and settings.grid == "native"  # frozen: a new object
    with pytest.raises(AttributeError):
        settings.steps = 5  # type: ignore[misc]
    std = (0.5, 0.5, 0.5)
    common = dict(steps=4, batch_size=64, explain_batch_size=8, seed=0, method_options={"saliency": {}}, protocol=2)
    assert cache_settings(settings.with_grid(None), std) == dict(common, baseline="zero")
    assert cache_settings(FaithfulnessSettings(steps=4, baseline="road", grid=8, method_options={"saliency": {}}),
                          std) == dict(common, baseline="road", grid=8, pixel_std=[0.5, 0.5, 0.5])


# ----------------------------------------------------------------------------- the terminal table


def _table_rows(run: str, model: str, methods=("transformer_attribution", "integrated_gradients", "random")) -> list[dict]:
    from xtl.faithfulness.tables import table_columns

    rows = []
    for k, method in enumerate(methods):
        row = {"run": run, "model": model, "method": method, "n_images": 100.0, "steps": 10.0, "baseline": "zero",
               "grid": "pixel", "explain_s": 1.25, "score_images_per_s": 12.5}
        for column, _ in table_columns():
            row[column], row[f"{column}_std"] = 0.1 * (k + 1), 0.25
        rows.append(row)
    return rows


def test_the_terminal_table_never_cuts_a_name_and_says_what_plus_minus_is():
    from rich.console import Console

    from xtl.faithfulness import faithfulness_table
    from xtl.faithfulness.tables import half_width

    long_model = "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k"
    rows = _table_rows(long_model, long_model) + _table_rows("second-run", "efficientnet_lite0")
    console = Console(record=True, width=100)
    console.print(faithfulness_table(rows))
    text = console.export_text()
    assert all(len(line) <= 100 for line in text.splitlines())
    assert long_model in text and "second-run (efficientnet_lite0)" in text
    assert "transformer_attribution" in text and "integrated_gradients" in text and "…" not in text
    # 1.96 x 0.25 / sqrt(100) = 0.049: the half-width of the 95 % interval of the mean over images
    assert half_width(rows[0], "deletion") == pytest.approx(0.049)
    assert "0.100 ±" in text and "0.049" in text
    words = " ".join(text.split())
    assert "± : half-width of the 95 % confidence interval of the mean over the images" in words
    assert "1.96 × sample std of the per-image values / √images" in words
    assert "the paired tests (faithfulness_tests.csv) decide which map set is better" in words


@pytest.mark.parametrize("markup", [True, False])
def test_the_best_cells_are_bold_on_any_console_never_markup_text(markup):
    """xtl run prints user text literally (markup off): the table's emphasis is a style, not markup."""
    from rich.console import Console

    from xtl.faithfulness import faithfulness_table

    console = Console(record=True, width=160, markup=markup, force_terminal=True, color_system="standard")
    console.print(faithfulness_table(_table_rows("run", "efficientnet_lite0")))
    plain = console.export_text(clear=False)
    assert "[bold]" not in plain and "[/bold]" not in plain and "0.100 ±" in plain
    assert "\x1b[1m" in console.export_text(styles=True)  # the best cells are drawn bold


def test_the_markdown_table_says_what_plus_minus_is():
    from xtl.faithfulness import markdown_table

    text = markdown_table(_table_rows("run", "efficientnet_lite0"))
    assert "| efficientnet_lite0 |" in text and "0.100 ± 0.049" in text
    assert "random and uniform are reference maps." in text and "± : half-width of the 95 %" in text
    assert text.rstrip().endswith("so such a map is not a decomposition of the logit.")


@pytest.mark.parametrize("grid", [None, 4])
def test_random_maps_made_a_batch_at_a_time_are_the_rows_of_all(grid):
    """Faithfulness makes its random reference a batch at a time: the same values as all at once, in
    any order of batches (skipped rows drawn and dropped, earlier rows drawn again)."""
    from xtl.faithfulness.perturbation import RandomMaps, random_maps

    whole = random_maps((30, 16, 12), seed=5, grid=grid)
    maker = RandomMaps((30, 16, 12), seed=5, grid=grid)
    for part in (slice(4, 9), slice(9, 10), slice(20, 30), slice(0, 3), slice(None)):
        assert torch.equal(maker.rows(part), whole[part])
    if grid is not None:
        assert torch.equal(whole[:, :4, :3], whole[:, :1, :1].expand(-1, 4, 3))  # constant over a cell
