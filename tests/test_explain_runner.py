"""`xtl explain` on a real (tiny) run: streamed maps with resume, galleries, side by side."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from xtl.explain.gallery import pick_correct_per_class, pick_misclassified
from xtl.explain.runner import compare_runs, explain_run
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
    shards = sorted((paths["maps"] / "gradcam").iterdir())
    assert len(shards) == 3  # 20 images in batches of 8
    last = load_file(str(shards[-1]))
    assert last["raw"].shape[0] == 4 and last["ids"].tolist() == RunDir(cnn_run.path).load_split()["test"].ids[16:20].tolist()
    mtimes = {s: s.stat().st_mtime_ns for s in shards}
    shards[1].unlink()
    explain_run(cnn_run, ["gradcam"], n_images=20, batch_size=8, progress=False)
    assert shards[1].is_file()
    assert all(shards[k].stat().st_mtime_ns == mtimes[shards[k]] for k in (0, 2))
    for name in ("gallery_correct.png", "gallery_misclassified.png"):
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
