"""The grid pointing game (issue 26): known-answer models on real CIFAR-10 test images, the mosaics'
seeding, the references, and the command on tiny runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xtl.analysis.grid_pointing import (
    GridSettings, Player, candidates, compose, draw_mosaics, grid_pointing, mosaic_inputs, paired_tests, play_model,
    quadrant_masks, reference_maps, score, summary_rows, to_pixels,
)
from xtl.data.transforms import Preprocess
from xtl.errors import XtlError
from xtl.models import ModelDescription

from helpers import tiny_run

pytestmark = pytest.mark.xdist_group("grid_pointing")
SIZE = 32  # the models' input side; tiles of the half layout are 16 px


@pytest.fixture(scope="module")
def cifar_test(cifar) -> tuple[torch.Tensor, torch.Tensor]:
    """Six real CIFAR-10 test images of each class, uint8 [60, 3, 32, 32], and their labels."""
    from torchvision.io import decode_image

    classes = sorted(p.name for p in (cifar / "test").iterdir())
    images, labels = [], []
    for c, name in enumerate(classes):
        for path in sorted((cifar / "test" / name).iterdir())[:6]:
            images.append(decode_image(str(path)))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


class QuadrantOracle(nn.Module):
    """Knows where each class is: class c's logit is the mean of the quadrant whose content is an image of
    class c (found by its nearest memorised 4 x 4 thumbnail; the choice carries no gradient), so the
    exact map of class c lies in c's quadrant and nowhere else."""

    def __init__(self, tiles: torch.Tensor, labels: torch.Tensor, n_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("thumbs", F.adaptive_avg_pool2d(tiles, 4).flatten(1))
        self.register_buffer("classes", labels)
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        logits = x.new_zeros(x.shape[0], self.n_classes)
        for q in (x[..., :h, :h], x[..., :h, h:], x[..., h:, :h], x[..., h:, h:]):
            with torch.no_grad():
                nearest = torch.cdist(F.adaptive_avg_pool2d(q, 4).flatten(1), self.thumbs).argmin(1)
                onehot = F.one_hot(self.classes[nearest], self.n_classes).to(x.dtype)
            logits = logits + onehot * (q.mean((1, 2, 3)) + 5.0)[:, None]
        return logits


class TopLeftOnly(nn.Module):
    """Looks at the top-left quadrant alone, whatever the class: every map lies there."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.head = nn.Linear(3, n_classes)
        torch.nn.init.normal_(self.head.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return self.head(x[..., :h, :h].mean((2, 3)))


def player(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, name: str) -> Player:
    preprocess = Preprocess(SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    spec = ModelDescription(name=name, family="other", input_size=SIZE)
    return Player(model.eval(), spec, preprocess, images, labels, torch.device("cpu"), name, name)


def oracle_for(images: torch.Tensor, labels: torch.Tensor) -> QuadrantOracle:
    """The oracle memorises the test images as the half layout shows them (16 px tiles)."""
    preprocess = Preprocess(SIZE // 2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return QuadrantOracle(preprocess(images), labels)


def test_mosaics_are_four_classes_the_same_for_a_seed(cifar_test):
    images, labels = cifar_test
    eligible = torch.ones(len(labels), dtype=torch.bool)
    eligible[labels == 3] = False  # a class without a confident image is never drawn
    first, again, other = (draw_mosaics(labels, eligible, 20, seed) for seed in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert all(len(set(labels[row].tolist())) == 4 for row in first)
    assert 3 not in labels[first].unique().tolist()
    # 20 mosaics x 4 tiles from 54 candidates: no image is used twice while its class has unused ones
    counts = torch.bincount(first.flatten(), minlength=len(labels))
    for c in set(range(10)) - {3}:
        used = counts[labels == c]
        assert used.max() - used.min() <= 1
    with pytest.raises(XtlError, match="needs confidently correct test images of 4 classes; only 3 classes have one"):
        draw_mosaics(labels, labels < 3, 5, 0)


def test_candidates_are_correct_and_confident_for_every_model():
    labels = torch.tensor([0, 1, 2])
    sure = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.0, 0.6, 0.4]])  # the last is wrong
    unsure = torch.tensor([[0.45, 0.3, 0.25], [0.1, 0.9, 0.0], [0.0, 0.0, 1.0]])
    assert candidates(labels, [sure], 0.5).tolist() == [True, True, False]
    assert candidates(labels, [sure, unsure], 0.5).tolist() == [False, True, False]


def test_the_layouts_place_each_tile_in_its_quadrant(cifar_test):
    images, labels = cifar_test
    positions = torch.tensor([[0, 6, 12, 18]])
    preprocess = Preprocess(SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    half = mosaic_inputs(images, preprocess, positions, "half", "cpu")
    full = mosaic_inputs(images, preprocess, positions, "full", "cpu")
    assert half.shape == (1, 3, SIZE, SIZE) and full.shape == (1, 3, 2 * SIZE, 2 * SIZE)
    # full: each quadrant is exactly the tile as the model sees it alone
    assert torch.allclose(full[0, :, SIZE:, :SIZE], preprocess(images[12:13])[0])
    # half: each quadrant is the tile at half the side
    small = Preprocess(SIZE // 2, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(images[positions[0]])
    assert (half[0, :, :16, 16:] - small[1]).abs().mean() < 0.05
    masks = quadrant_masks(8)
    assert masks.sum((1, 2)).tolist() == [16] * 4 and masks.sum(0).eq(1).all()
    tiles = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(1, 4, 1, 2, 2)
    assert compose(tiles)[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_scores_of_maps_with_known_answers():
    quadrants = torch.tensor([0, 1, 2, 3, 0])
    maps = torch.zeros(5, 8, 8)
    maps[0, :4, :4] = 1  # all in its quadrant
    maps[1, :4, :4] = 1  # all in another
    maps[2, 4:, :4] = 1
    maps[2, 0, 7] = 3  # 16 of 19 in its quadrant, the maximum elsewhere
    maps[3] = 1  # flat: even share, a miss
    share = score(maps, quadrants)
    assert torch.allclose(share["share"][:4], torch.tensor([1.0, 0.0, 16 / 19, 0.25]))
    assert share["pointing"][:4].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert share["flat"].tolist() == [False, False, False, True, True]
    # a coarse map is repeated cell by cell: a 2 x 2 CAM's cell is its quadrant's, exactly
    coarse = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    assert torch.allclose(score(to_pixels(coarse, 8, signed=False), torch.tensor([1]))["share"], torch.tensor([0.5]))
    # a signed map keeps its positive part
    signed = torch.tensor([[[-5.0, 1.0], [0.0, 0.0]]])
    assert score(to_pixels(signed, 8, signed=True), torch.tensor([1]))["share"].item() == 1.0


def test_the_references_ignore_the_class(cifar_test):
    images, _ = cifar_test
    preprocess = Preprocess(SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = mosaic_inputs(images, preprocess, torch.tensor([[0, 6, 12, 18], [1, 7, 13, 19]]), "half", "cpu")
    quadrants = torch.arange(4).repeat(2)
    centre = score(reference_maps("centre", x, 0), quadrants)["share"]
    assert torch.allclose(centre, torch.full((8,), 0.25))
    edge = reference_maps("edge", x, 0)
    assert torch.equal(edge[0], edge[3]) and not torch.equal(edge[0], edge[4])  # one map per mosaic
    shares = score(edge, quadrants)["share"].reshape(2, 4)
    assert torch.allclose(shares.sum(1), torch.ones(2))  # its four shares split the mosaic: mean 0.25
    assert torch.equal(reference_maps("random", x, 3), reference_maps("random", x, 3))


def test_a_model_that_knows_where_each_class_is_scores_1_and_beats_the_edge_map(cifar_test):
    """Known answers: the oracle's maps are in the explained class's quadrant (share 1, pointing 1); a model
    looking at one quadrant whatever the class gets 0.25 on average, like a map that ignores the class;
    the paired tests say the oracle beats every reference and the edge map beats nothing."""
    images, labels = cifar_test
    positions = draw_mosaics(labels, torch.ones(len(labels), dtype=torch.bool), 12, seed=0)
    settings = GridSettings(mosaics=12, batch_size=5)
    oracle = play_model(player(oracle_for(images, labels), images, labels, "oracle"), positions,
                        ["saliency", "input_x_gradient"], settings)
    blind = play_model(player(TopLeftOnly(), images, labels, "top_left"), positions, ["saliency"], settings)
    assert oracle.scores["saliency"]["share"].min() == 1.0
    assert oracle.scores["saliency"]["pointing"].min() == 1.0
    # input x gradient: the positive part of gradient x input lies in the quadrant too, where there is one
    # (a dark tile has none: normalised below 0, its map is flat and scores the even 0.25)
    ixg = oracle.scores["input_x_gradient"]
    assert ixg["share"][~ixg["flat"]].min() == 1.0 and ixg["share"][ixg["flat"]].eq(0.25).all()
    blind_share = blind.scores["saliency"]["share"].reshape(-1, 4)
    assert torch.allclose(blind_share, torch.tensor([1.0, 0.0, 0.0, 0.0]).expand_as(blind_share))
    rows = summary_rows([oracle, blind], 12, settings)
    by = {(r["run"], r["method"]): r for r in rows}
    assert by[("oracle", "saliency")]["share"] == 1.0 and by[("top_left", "saliency")]["share"] == 0.25
    assert by[("oracle", "edge")]["share"] == pytest.approx(by[("top_left", "edge")]["share"])  # uses no model
    assert by[("oracle", "edge")]["share"] == pytest.approx(0.25)
    tests = {(t["measure"], t["first_run"], t["first_method"], t["second_run"], t["second_method"]): t
             for t in paired_tests([oracle, blind], settings)}
    for ref in ("random", "centre", "edge"):
        assert tests[("share", "oracle", "saliency", "oracle", ref)]["verdict"] == "first"
        assert tests[("share", "top_left", "saliency", "top_left", ref)]["verdict"] == "cannot decide"
    assert tests[("share", "oracle", "saliency", "top_left", "saliency")]["verdict"] == "first"  # model against model
    family = {t["family"] for t in tests.values()}
    assert family == {len(tests)}  # one Holm family over every comparison


def test_the_full_layout_is_refused_for_a_model_of_one_input_size(cifar_test):
    import timm

    images, labels = cifar_test
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, num_classes=10)
    with pytest.raises(XtlError, match="option --layout full: vit does not take 64 px inputs .*use --layout half"):
        play_model(player(vit, images, labels, "vit"), torch.tensor([[0, 6, 12, 18]]), ["saliency"],
                   GridSettings(mosaics=1, layout="full"))
    with pytest.raises(XtlError, match="option --layout must be one of half, full, not 'quarter'"):
        GridSettings(layout="quarter").check()
    with pytest.raises(XtlError, match="option --min-confidence must be"):
        GridSettings(min_confidence=1.5).check()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, cifar):
    """A CNN and a ViT run of one split; their predictions say every test image is classified
    correctly and surely, so that the mosaics can be drawn from random-init models (the maps are
    the models' own)."""
    from xtl.evaluate import read_predictions

    root = tmp_path_factory.mktemp("grid")
    runs = [tiny_run(root / "cnn", cifar, "timm:resnet10t", 32), tiny_run(root / "vit", cifar, "timm:vit_tiny_patch16_224", 32)]
    for run in runs:
        ids, labels, probabilities = read_predictions(run)
        path = run.file("predictions.csv")
        rows = list(csv.DictReader(path.open()))
        for row, label in zip(rows, labels.tolist()):
            row["predicted"] = str(label)
            for k, name in enumerate(run.class_names):
                row[f"p_{name}"] = "1.0" if k == label else "0.0"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return runs


def test_the_command_plays_every_model_on_the_same_mosaics(two_runs, tmp_path):
    from typer.testing import CliRunner

    from xtl.cli import app

    out = tmp_path / "grid_pointing"
    result = CliRunner().invoke(app, ["benchmark", "grid-pointing", *(str(r.path) for r in two_runs), "--out", str(out),
                                      "--mosaics", "6", "--methods", "saliency,gradcam,attention_rollout", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Grid pointing game: 6 mosaics" in result.output
    rows = list(csv.DictReader((out / "grid_pointing.csv").open()))
    assert [(r["run"], r["method"]) for r in rows] == [
        ("cnn", "saliency"), ("cnn", "gradcam"), ("cnn", "random"), ("cnn", "centre"), ("cnn", "edge"),
        ("vit", "saliency"), ("vit", "gradcam"), ("vit", "attention_rollout"), ("vit", "random"), ("vit", "centre"),
        ("vit", "edge")]
    assert all(r["maps"] == "24" and r["mosaics"] == "6" for r in rows)
    assert {r["reading"] for r in rows if r["method"] == "saliency"} == {"as computed"}
    info = json.loads((out / "grid_pointing.json").read_text())
    assert len(info["mosaics"]) == 6 and info["candidates"] == 24
    maps = list(csv.DictReader((out / "grid_pointing_maps.csv").open()))
    assert len(maps) == 11 * 24
    # the same mosaics for both models: the positions of each map agree
    positions = {r["run"]: [r["position"] for r in maps if r["method"] == "saliency"] for r in maps}
    assert positions["cnn"] == positions["vit"]
    tests = list(csv.DictReader((out / "grid_pointing_tests.csv").open()))
    assert {t["kind"] for t in tests} == {"reference", "method", "model"}
    assert {(t["first_method"], t["second_method"]) for t in tests if t["kind"] == "model"} == {
        ("saliency", "saliency"), ("gradcam", "gradcam")}
    for name in ("grid_pointing.png", "grid_pointing_gallery_cnn.png", "grid_pointing_gallery_vit.png"):
        assert (out / name).stat().st_size > 10_000
    # the report's section: the table, the figures, and sentences that say only what the tests support
    from xtl.report import Figures, _localisation_context

    shown = _localisation_context(tmp_path, Figures(tmp_path / "report"))["game"]
    assert [(r["run"], r["method"]) for r in shown["rows"]] == [(r["run"], r["method"]) for r in rows]
    assert len(shown["figures"]) == 3 and shown["family"] == len(tests)
    for run, methods in (("cnn", ("saliency", "gradcam")), ("vit", ("saliency", "gradcam", "attention_rollout"))):
        above = next((x for x in shown["sentences"] if x.startswith(f"{run}: ") and "more than every reference" in x), "")
        below = next((x for x in shown["sentences"] if x.startswith(f"{run}: not above every reference")), "")
        for m in methods:
            beats = all(t["verdict"] == "first" for t in tests if (t["first_run"], t["first_method"], t["measure"],
                                                                   t["kind"]) == (run, m, "share", "reference"))
            assert (f"{m} " in above) == beats and (f"{m} " in below) == (not beats), (run, m, shown["sentences"])
    said = " ".join(shown["sentences"])
    assert "cannot decide between cnn and vit" in said or "localise the class better" in said


def test_a_model_that_cannot_play_the_layout_is_one_line_and_exit_2(two_runs, tmp_path, monkeypatch, capsys):
    import sys

    from xtl import cli

    monkeypatch.setattr(sys, "argv", ["xtl", "benchmark", "grid-pointing", str(two_runs[0].path), str(two_runs[1].path), "--out",
                                      str(tmp_path / "x"), "--layout", "full", "--mosaics", "2", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert "option --layout full: timm:vit_tiny_patch16_224 does not take 64 px inputs" in err[0]


def test_runs_of_other_test_images_are_refused(two_runs, tmp_path, cifar):
    other = tiny_run(tmp_path / "other", cifar, "timm:resnet10t", 32, seed=5)
    with pytest.raises(XtlError, match="has other test images than"):
        grid_pointing([two_runs[0], other], tmp_path / "out", ["saliency"], GridSettings(mosaics=2), device="cpu")
