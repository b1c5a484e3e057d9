"""`xtl explain` on a real (tiny) run: streamed maps with resume, galleries, side by side."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xtl.explain import METHODS, drawing
from xtl.explain.gallery import gallery_figure, gallery_files, pick_correct_per_class, pick_misclassified
from xtl.explain.runner import RunExplainer, compare_runs, explain_run
from xtl.runs import RunDir

from helpers import XTL, tiny_run



@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, cifar):
    return tiny_run(tmp_path_factory.mktemp("runs") / "cnn", cifar, "timm:resnet10t", 32)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, cifar):
    return tiny_run(tmp_path_factory.mktemp("runs") / "vit", cifar, "timm:vit_tiny_patch16_224", 32)


def test_maps_stream_in_shards_and_resume_without_recomputing(cnn_run):
    paths = explain_run(cnn_run, ["gradcam", "saliency", "transformer_attribution"], n_images=20, batch_size=8,
                        progress=False)
    # transformer_attribution does not apply to a CNN and is skipped
    assert sorted(p.name for p in paths["maps"].iterdir()) == ["gradcam", "saliency"]
    shards = sorted((paths["maps"] / "gradcam").glob("*/batch_*.safetensors"))  # one set: <key>/
    assert len(shards) == 3  # 20 images in batches of 8
    last = load_file(str(shards[-1]))
    assert last["raw"].shape[0] == 4 and last["ids"].tolist() == RunDir(cnn_run.path).load_split()["test"].ids[16:20].tolist()
    mtimes = {s: s.stat().st_mtime_ns for s in shards}
    shards[1].unlink()
    explain_run(cnn_run, ["gradcam"], n_images=20, batch_size=8, progress=False)
    assert shards[1].is_file()
    assert all(shards[k].stat().st_mtime_ns == mtimes[shards[k]] for k in (0, 2))
    for name in ("gallery_correct_gradcam.png", "gallery_misclassified_gradcam.png"):
        assert (cnn_run.figures / name).stat().st_size > 10_000


def test_same_images_side_by_side_for_a_cnn_and_a_vit(cnn_run, vit_run, tmp_path):
    out = compare_runs([cnn_run, vit_run], ["gradcam", "attention_rollout"], tmp_path / "side_by_side.png")
    assert out.stat().st_size > 10_000


def test_gallery_picks():
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    probs = torch.tensor([[.1, .8, .1], [.1, .8, .1], [.9, .05, .05], [.2, .2, .6], [.6, .3, .1], [.1, .1, .8]])
    assert pick_correct_per_class(labels, probs.argmax(1), 3) == [2, 1, 3]
    assert pick_misclassified(labels, probs) == [0, 4]  # wrong with p=.8, then p=.6


def test_unknown_method_is_named(cnn_run):
    result = subprocess.run([XTL, "explain", str(cnn_run.path), "--methods", "gradcam,nope"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "unknown method(s) nope" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- galleries


def test_explaining_again_with_other_methods_keeps_the_earlier_galleries(cnn_run, tmp_path):
    first = explain_run(cnn_run, ["gradcam"], n_images=8, batch_size=8, progress=False, gallery_size=3)
    before = {k: first[k].read_bytes() for k in ("correct", "misclassified")}
    second = explain_run(cnn_run, ["saliency"], n_images=8, batch_size=8, progress=False, gallery_size=3)
    for kind in ("correct", "misclassified"):
        assert first[kind].name == f"gallery_{kind}_gradcam.png" and second[kind].name == f"gallery_{kind}_saliency.png"
        assert first[kind].read_bytes() == before[kind]  # not overwritten
        assert second[kind].stat().st_size > 10_000
        assert gallery_files(cnn_run.figures, kind)[0] == second[kind]  # newest first
        assert first[kind] in gallery_files(cnn_run.figures, kind)
    # the report shows both, each captioned with its methods
    from xtl.report import build_report

    html = build_report([cnn_run], tmp_path / "report").read_text()
    beside = {p.name for p in (tmp_path / "report" / "figures").glob("*gallery_*.png")}
    for kind, caption in (("correct", "one per class"), ("misclassified", "misclassified test images")):
        for method in ("gradcam", "saliency"):
            assert f"{cnn_run.path.name}_gallery_{kind}_{method}.png" in beside
            assert f"{caption} ({method})</figcaption>" in html


def test_galleries_read_the_stored_maps_instead_of_explaining_again(cnn_run, monkeypatch):
    explain_run(cnn_run, ["saliency"], n_images=24, batch_size=8, progress=False, gallery_size=3)
    explainer = RunExplainer(cnn_run, device="cpu")
    predicted = explainer.probabilities.argmax(1)
    positions = [0, 5, 17]
    computed = explainer.explain_positions(positions, "saliency")
    assert computed.targets.tolist() == predicted[positions].tolist()

    def no_explaining(*args, **kwargs):
        raise AssertionError("the gallery explained again instead of reading the stored maps")

    monkeypatch.setattr(RunExplainer, "explain_positions", no_explaining)
    maps, targets = explainer.gallery_maps(positions, "saliency", "predicted")
    assert targets == predicted[positions].tolist()
    for k in range(len(positions)):
        torch.testing.assert_close(maps[k], computed.raw[k].cpu(), rtol=1e-4, atol=1e-6)
    # the stored maps explain the predicted class: a gallery of the true class explains again
    # where the two differ (and only there)
    labels = explainer.part.labels
    wrong = [p for p in range(24) if int(labels[p]) != int(predicted[p])][:2]
    right = [p for p in range(24) if int(labels[p]) == int(predicted[p])][:1]
    assert wrong
    calls = []
    monkeypatch.setattr(RunExplainer, "explain_positions",
                        lambda self, pos, method, target="predicted", **o: calls.append(list(pos)) or computed_for(pos))

    def computed_for(pos):
        monkeypatch.undo()
        try:
            return explainer.explain_positions(pos, "saliency", "true")
        finally:
            monkeypatch.setattr(RunExplainer, "explain_positions", no_explaining)

    maps, targets = explainer.gallery_maps(wrong + right, "saliency", "true")
    assert calls == [wrong] and targets == labels[wrong + right].tolist()


def test_gallery_tiles_are_drawn_signed_or_not_and_name_the_class_explained(cnn_run):
    explainer = RunExplainer(cnn_run, device="cpu")
    methods = ["saliency", "integrated_gradients", "gradcam"]
    assert [METHODS[m].signed for m in methods] == [False, True, False]
    positions = [0, 1]
    rows = explainer.gallery_rows(positions, methods, target="true")  # true class: may differ from the predicted
    names = explainer.class_names
    fig = gallery_figure(rows, names, "a gallery")
    n_cols = 1 + len(methods) + 1
    for r, row in enumerate(rows):
        for c, method in enumerate(methods):
            ax = fig.axes[r * n_cols + 1 + c]
            assert ax.get_xlabel() == f"map: {names[int(explainer.part.labels[positions[r]])]}"
            shown = np.asarray(ax.images[0].get_array())
            if drawing.is_flat(row.maps[method]):  # gradcam on a 32 px resnet10t: a 1 x 1 grid
                assert any(t.get_text() == "flat map" for t in ax.texts)
                continue
            expected = drawing.overlay(row.image, row.maps[method], signed=METHODS[method].signed, size=shown.shape[:2])
            assert np.array_equal(shown, expected), method
    # integrated gradients keeps its sign in the maps the tiles are drawn from (zero-centred, above)
    assert all((row.maps["integrated_gradients"] < 0).any() and (row.maps["integrated_gradients"] > 0).any() for row in rows)
    bars = {a._colorbar.cmap.name: a._colorbar.norm for a in fig.axes if a.get_label() == "<colorbar>"}
    assert set(bars) == {"RdBu_r", "inferno"}
    assert (bars["RdBu_r"].vmin, bars["RdBu_r"].vmax) == (-1, 1) and (bars["inferno"].vmin, bars["inferno"].vmax) == (0, 1)
    _legible(fig)


def _legible(fig, smallest: float = 9.0) -> None:
    """Every piece of text in the figure is at least `smallest` points at the saved size."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    fig.canvas.draw()
    small = [(t.get_text(), t.get_fontsize()) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and t.get_fontsize() < smallest]
    plt.close(fig)
    assert not small, small


def test_side_by_side_shows_every_models_probabilities(cnn_run, vit_run, tmp_path, monkeypatch):
    import xtl.explain.runner as runner

    captured = {}
    real = runner.render_gallery
    monkeypatch.setattr(runner, "render_gallery", lambda rows, names, path, title: captured.update(rows=rows, names=names)
                        or real(rows, names, path, title))
    out = compare_runs([cnn_run, vit_run], ["integrated_gradients", "attention_rollout"], tmp_path / "side.png", per_class=1)
    assert out.stat().st_size > 10_000
    rows, names = captured["rows"], captured["names"]
    cnn, vit = RunExplainer(cnn_run, device="cpu"), RunExplainer(vit_run, device="cpu")
    for row in rows:
        assert [name for name, _ in row.bars] == [cnn.spec.name, vit.spec.name]
        image_id = next(int(i) for k, i in enumerate(cnn.part.ids.tolist()) if torch.equal(cnn.part.images[k], row.image))
        for (_, probs), e in zip(row.bars, (cnn, vit)):
            torch.testing.assert_close(probs, e.probabilities[e.part.ids.tolist().index(image_id)])
        assert row.signed == {f"{cnn.spec.name}\nintegrated_gradients": True,
                              f"{vit.spec.name}\nintegrated_gradients": True, f"{vit.spec.name}\nattention_rollout": False}
    fig = gallery_figure(rows, names, "side by side")
    charts = [a for a in fig.axes if a.patches and a.get_xlabel().startswith("probability")]
    assert len(charts) == 2 * len(rows)
    titles = {a.get_title().replace("\n", "") for a in charts}
    assert titles == {cnn.spec.name, vit.spec.name}
    _legible(fig)


def test_side_by_side_figures_are_named_after_their_methods_and_kept(cnn_run, vit_run, tmp_path):
    """`xtl explain RUN RUN` again with other methods writes a second side-by-side figure."""
    import shutil

    from typer.testing import CliRunner

    from xtl.cli import app

    runs = [shutil.copytree(r.path, tmp_path / name) for r, name in ((cnn_run, "a"), (vit_run, "b"))]
    for methods in ("saliency", "saliency,gradcam"):
        result = CliRunner().invoke(app, ["explain", *map(str, runs), "--images", "4", "--methods", methods,
                                          "--no-progress", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    for run in runs:
        names = sorted(p.name for p in (run / "figures").glob("compare_*.png"))
        assert names == ["compare_a_vs_b_saliency-gradcam.png", "compare_a_vs_b_saliency.png"]


def test_a_predicted_target_is_the_evaluations_prediction_everywhere_it_is_shown(cnn_run):
    """Issue 28: the evaluation predicts under bf16 autocast where the CPU has it, a map's own float32
    pass may rank two close classes the other way, and a gallery then said "pred: cat" above a map of
    deer. Maps of the predicted class explain the class `predictions.csv` (and so the galleries, the
    report and the app) shows. Pinned where the two disagree by construction: the stored predictions
    are made to name each image's second most likely class."""
    explainer = RunExplainer(cnn_run, device="cpu")
    positions = list(range(6))
    probabilities = explainer._saved.clone()
    second = probabilities.topk(2, dim=1).indices[:, 1]
    swapped = probabilities.clone()
    rows = torch.arange(len(swapped))
    swapped[rows, second], swapped[rows, probabilities.argmax(1)] = probabilities.max(1).values, probabilities[rows, second]
    explainer._saved = swapped
    explainer.__dict__.pop("probabilities", None)
    result = explainer.explain_positions(positions, "saliency", "predicted")
    assert result.targets.tolist() == second[positions].tolist()
    for row, pos in zip(explainer.gallery_rows(positions, ["saliency"]), positions):
        shown = explainer.class_names[int(row.probabilities.argmax())]
        assert row.targets["saliency"] == int(second[pos]) and f"pred: {shown}" in row.caption
        assert shown == explainer.class_names[int(second[pos])]
