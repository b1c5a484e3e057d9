"""Stored maps of `xtl explain` are never stale (docs/reliability.md, issue 15): a set of shards is
keyed by everything its maps depend on (target, weights, images, batch size, options), readers take
one set whole, and the same settings reuse what is stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import class_folder, tiny_run
from xtl.explain import runner as explain_runner
from xtl.explain.runner import RunExplainer, read_stored_maps, stored_maps_for
from xtl.faithfulness import runner as faithfulness_runner
from xtl.runs import RunDir

METHOD = "saliency"


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar) -> RunDir:
    """A real tiny fine-tuned and evaluated CNN run, 24 test images of 3 classes."""
    folder = class_folder(tmp_path_factory.mktemp("data"), cifar)
    return tiny_run(tmp_path_factory.mktemp("runs") / "cnn", folder, "timm:resnet10t", 32)


def _copy(run: RunDir, dest: Path) -> RunDir:
    return RunDir(shutil.copytree(run.path, dest, ignore=shutil.ignore_patterns("explanations", "figures")))


def _count_explain(monkeypatch) -> list:
    calls, real = [], explain_runner.explain

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(explain_runner, "explain", counted)
    return calls


def _stream(run: RunDir, n: int = 24, batch_size: int = 8, target: str = "predicted") -> RunExplainer:
    explainer = RunExplainer(run, device="cpu")
    explainer.stream([METHOD], n, batch_size, target, progress=False)
    return explainer


def _shards(run: RunDir) -> list[Path]:
    return sorted((run.path / "explanations").rglob("batch_*.safetensors"))


def test_the_same_settings_reuse_the_stored_maps(run, tmp_path, monkeypatch):
    copy = _copy(run, tmp_path / "run")
    _stream(copy)
    before = {s: s.stat().st_mtime_ns for s in _shards(copy)}
    calls = _count_explain(monkeypatch)
    _stream(copy)
    assert calls == [] and {s: s.stat().st_mtime_ns for s in _shards(copy)} == before
    # key.json says what the set's key holds
    info = json.loads(next((copy.path / "explanations").rglob("key.json")).read_text())
    assert {k: info[k] for k in ("method", "split", "target", "batch_size", "options")} == \
        {"method": METHOD, "split": "test", "target": "predicted", "batch_size": 8, "options": {}}
    assert {"weights", "images", "input_size", "mean", "std"} <= set(info)


def test_explaining_the_true_class_after_the_predicted_one_recomputes(run, tmp_path, monkeypatch):
    copy = _copy(run, tmp_path / "run")
    explainer = _stream(copy, target="predicted")
    labels, predicted = explainer.part.labels, explainer.probabilities.argmax(1)
    wrong = [p for p in range(24) if int(labels[p]) != int(predicted[p])]
    assert wrong  # the tiny run misclassifies some: the two targets differ there
    calls = _count_explain(monkeypatch)
    _stream(copy, target="true")
    assert len(calls) == 3  # every batch explained again, for the true class
    raw, targets, ids = read_stored_maps(copy, METHOD, "test")  # the newest set: the true class
    assert targets.tolist() == labels.tolist() and ids.tolist() == explainer.part.ids.tolist()
    # the predicted class's maps stay readable as such, and galleries of either read their own set
    assert read_stored_maps(copy, METHOD, "test", target="predicted")[1].tolist() == predicted.tolist()
    calls.clear()
    maps, shown = RunExplainer(copy, device="cpu").gallery_maps(wrong, METHOD, "true")
    assert calls == [] and shown == labels[wrong].tolist()
    for k, p in enumerate(wrong):
        torch.testing.assert_close(maps[k], raw[p].float())


def test_changed_weights_recompute_and_stale_maps_are_never_read(run, tmp_path, monkeypatch):
    copy = _copy(run, tmp_path / "run")
    explainer = _stream(copy)
    old = read_stored_maps(copy, METHOD, "test")[0]
    # retraining writes other weights: here every weight is scaled
    with safe_open(str(copy.weights_path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: t * 1.5 if t.is_floating_point() else t for k, t in tensors.items()}, str(copy.weights_path), metadata)
    assert read_stored_maps(copy, METHOD, "test") is None  # the old maps are of other weights
    assert stored_maps_for(copy, METHOD, "test", explainer.part.ids.tolist()) == {}
    assert faithfulness_runner._stored_maps(copy, "test", [METHOD], explainer.part.ids[:24]) == {}
    calls = _count_explain(monkeypatch)
    fresh = _stream(copy)
    assert len(calls) == 3
    raw = read_stored_maps(copy, METHOD, "test")[0]
    assert not torch.allclose(raw, old)
    torch.testing.assert_close(raw[:8], fresh.explain_positions(list(range(8)), METHOD).raw.cpu())
    assert len(_shards(copy)) == 3  # the set of the old weights is gone


def test_a_changed_batch_size_never_mixes_two_sets(run, tmp_path, monkeypatch):
    copy = _copy(run, tmp_path / "run")
    explainer = _stream(copy, n=20, batch_size=8)
    ids = explainer.part.ids[:20].tolist()
    calls = _count_explain(monkeypatch)
    _stream(copy, n=20, batch_size=6)
    assert len(calls) == 4  # 20 images in batches of 6: a set of its own
    raw, targets, stored_ids = read_stored_maps(copy, METHOD, "test")
    assert stored_ids.tolist() == ids and raw.shape[0] == 20
    assert faithfulness_runner._stored_maps(copy, "test", [METHOD], explainer.part.ids[:20])[METHOD][0].shape[0] == 20
    # more images with the same batch size: the last, shorter shard is replaced, never kept beside
    calls.clear()
    _stream(copy, n=24, batch_size=6)
    assert len(calls) == 1  # images 18-23 (the shard of 18-19 is dropped)
    assert read_stored_maps(copy, METHOD, "test")[2].tolist() == explainer.part.ids[:24].tolist()
    assert len(stored_maps_for(copy, METHOD, "test", explainer.part.ids[:24].tolist())) == 24


def test_shards_of_the_unkeyed_layout_are_not_read(run, tmp_path):
    copy = _copy(run, tmp_path / "run")
    old = copy.path / "explanations" / "test" / METHOD / "batch_00000_0-1.safetensors"
    old.parent.mkdir(parents=True)
    save_file({"raw": torch.zeros(2, 4, 4), "targets": torch.zeros(2, dtype=torch.long),
               "ids": torch.arange(2)}, str(old))
    assert read_stored_maps(copy, METHOD, "test") is None
    _stream(copy, n=8)
    assert not old.exists() and read_stored_maps(copy, METHOD, "test")[0].shape[0] == 8
