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


def _craft(shard: Path, kind: str, other: Path) -> str:
    """Spoil one stored shard as `kind`; return the expected reason in the one line."""
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    metadata = {"set": shard.parent.name}
    if kind == "copied":  # a shard of another run's set, dropped into this one
        shutil.copy(other, shard)
        return "it was written for set"
    if kind == "no_metadata":
        metadata = None
        reason = "it was written for set None"
    elif kind == "nan":
        tensors["raw"][0, 0, 0] = float("nan")
        reason = "its maps hold NaN or infinite values"
    elif kind == "inf":
        tensors["raw"][-1, -1, -1] = float("inf")
        reason = "its maps hold NaN or infinite values"
    elif kind == "shape":
        tensors["raw"] = tensors["raw"][:-1].contiguous()
        reason = "shapes"
    elif kind == "dtype":
        tensors["raw"] = tensors["raw"].double()
        reason = "raw is torch.float64, not torch.float32"
    elif kind == "extra_tensor":
        tensors["more"] = torch.zeros(1)
        reason = "tensors ids, more, raw, targets"
    elif kind == "huge_header":  # a header declaring a tensor far larger than the file
        header = json.dumps({"raw": {"dtype": "F32", "shape": [8, 100000, 100000], "data_offsets": [0, 320000000000]},
                             "__metadata__": metadata}).encode()
        shard.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
        return "SafetensorError"
    else:
        raise ValueError(kind)
    save_file(tensors, str(shard), metadata=metadata)
    return reason


@pytest.mark.parametrize("kind", ["copied", "no_metadata", "nan", "inf", "shape", "dtype", "extra_tensor", "huge_header"])
def test_a_crafted_or_foreign_shard_is_one_line_and_never_mixed(kind, run, tmp_path, cifar):
    """Issue 28: stored shards are checked before they are read (`load_shard`): a shard copied from
    another run's set, one without this set's mark, NaN or infinite maps, wrong shapes or dtypes, an
    extra tensor, a header declaring a huge tensor. Readers say so in one line naming the file (they
    never mix it in); `xtl explain` with the same settings writes it anew."""
    from xtl.errors import XtlError

    from safetensors.torch import load_file

    copy = _copy(run, tmp_path / "run")
    _stream(copy)
    shard = _shards(copy)[1]
    # the same positions' shard of another set (another run, or other settings): its own key in its mark
    stranger = tmp_path / "another_set" / "0123456789abcdef" / shard.name
    stranger.parent.mkdir(parents=True)
    save_file(load_file(str(shard)), str(stranger), metadata={"set": stranger.parent.name})
    reason = _craft(shard, kind, stranger)
    ids = RunExplainer(copy, device="cpu").part.ids[:24].tolist()
    for read in (lambda: read_stored_maps(copy, METHOD, "test"), lambda: stored_maps_for(copy, METHOD, "test", ids)):
        with pytest.raises(XtlError, match=r"^stored map shard .*batch_00001_8-15\.safetensors is damaged or not this set's") as err:
            read()
        assert reason in str(err.value) and "\n" not in str(err.value)
    _stream(copy)  # the same settings: the spoiled shard is written anew, the others kept
    raw, targets, got = read_stored_maps(copy, METHOD, "test")
    assert got.tolist() == ids and torch.isfinite(raw).all() and raw.dtype == torch.float32



def test_a_tampered_key_file_makes_its_set_unread_and_the_next_explain_replaces_it(run, tmp_path):
    """A `key.json` edited by hand (here: another batch size, so it no longer hashes to its folder's
    name, or made not JSON) cannot vouch for its shards: the set is never read, and `xtl explain`
    with the same settings writes a sound set in its place."""
    copy = _copy(run, tmp_path / "run")
    _stream(copy)
    key = next((copy.path / "explanations").rglob("key.json"))
    for tamper in (lambda: key.write_text(json.dumps({**json.loads(key.read_text()), "batch_size": 4})),
                   lambda: key.write_text("{not json")):
        tamper()
        assert read_stored_maps(copy, METHOD, "test") is None
        _stream(copy)
        assert read_stored_maps(copy, METHOD, "test")[2].shape == (24,)
