"""Faithfulness metrics: known answers on a model where one region alone decides, exact end points,
independence of the batch size, and `xtl faithfulness` on a real (tiny) run."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import CIFAR
from xtl.config import RunConfig
from xtl.data import Preprocess, SplitSpec, load_split
from xtl.evaluate import evaluate
from xtl.faithfulness import (
    BASELINES, METRICS, baseline_inputs, random_maps, relevance_ranks, score, score_maps,
)
from xtl.models import build_model
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


def test_the_region_map_beats_random_and_the_reversed_map_loses_on_every_metric():
    images, labels, region = _region_images()
    maps = {"region": region, "random": random_maps(tuple(region.shape), seed=0), "reversed": 1 - region}
    scores = score_maps(RegionModel(), images, labels, maps, steps=10)
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
    """bf16 autocast (the GPU default) only rounds the forward passes: same targets, same ranking,
    probabilities within bf16's few parts in a thousand; float32 is the CPU default."""
    torch.manual_seed(0)
    model, spec = build_model("timm:resnet10t", 10, pretrained=False, input_size=32)
    test = load_split(str(CIFAR), SplitSpec("random", train_size=0, val_size=0, test_size=8, seed=0))["test"]
    images = Preprocess(32, spec.mean, spec.std)(test.images)
    maps = random_maps((8, 32, 32), seed=1)
    default = score(model.eval(), images, test.labels, maps, steps=5)
    float32 = score(model, images, test.labels, maps, steps=5, bf16=False)
    bf16 = score(model, images, test.labels, maps, steps=5, bf16=True)
    torch.testing.assert_close(default.curves["deletion"].values, float32.curves["deletion"].values, atol=0, rtol=0)
    assert not torch.equal(bf16.curves["deletion"].values, float32.curves["deletion"].values)
    for metric in ("deletion", "insertion"):
        torch.testing.assert_close(bf16.curves[metric].values, float32.curves[metric].values, atol=0.02, rtol=0)


def test_ties_keep_raster_order_and_random_maps_are_seeded():
    maps = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert relevance_ranks(maps).tolist() == [[2, 0, 1, 3]]
    assert relevance_ranks(torch.zeros(1, 2, 2)).tolist() == [[0, 1, 2, 3]]  # uniform: row by row
    assert torch.equal(random_maps((2, 4, 4), seed=5), random_maps((2, 4, 4), seed=5))
    assert not torch.equal(random_maps((2, 4, 4), seed=5), random_maps((2, 4, 4), seed=6))


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
    assert [r["method"] for r in rows] == ["gradcam", "saliency", "random", "uniform"]
    for column in ("deletion", "insertion", "positive", "negative", "positive_true", "negative_true"):
        assert all(0 <= float(r[column]) <= 1 for r in rows)
    assert rows[0]["n_images"] == "6" and float(rows[0]["score_images_per_s"]) > 0
    assert (tiny_run.figures / "faithfulness_curves.png").stat().st_size > 10_000
    combined = _read(tiny_run.file("faithfulness_combined.csv"))
    assert [r["run"] for r in combined] == ["cnn"] * 4 + ["copy"] * 4
    assert [r["deletion"] for r in combined[:4]] == [r["deletion"] for r in combined[4:]]  # same model, same numbers
    assert (tiny_run.figures / "faithfulness_combined.png").is_file()
    assert "Faithfulness" in result.stdout


def test_a_bad_option_is_a_one_line_error_naming_it(tiny_run):
    result = subprocess.run([XTL, "faithfulness", str(tiny_run.path), "--baseline", "grey"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--baseline" in lines[0] and "zero, mean, blur" in lines[0], result.stderr
