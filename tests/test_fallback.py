"""A machine without ../shared: the default data source falls back to torchvision's CIFAR-10, the
DINOv2 weights to the timm hub, and offline both say in one line what to provide. Progress lines
of `xtl explain` when stderr is not a terminal.

Nothing here touches the network: downloads are replaced by fakes, or the network is cut
(name resolution and connections fail as they do offline) and the real download code runs.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from rich.console import Console

import xtl.data.fallback as fallback
import xtl.hub
import xtl.models.timm_models as timm_models
from xtl.data import SplitSpec, decode_image, load_split, open_source
from xtl.errors import XtlError

DEFAULT = "../shared/data/cifar10"


@pytest.fixture()
def no_shared(tmp_path, monkeypatch) -> Path:
    """A working folder whose ../shared does not exist, a fresh home and cache, a fresh process."""
    work = tmp_path / "machine" / "xtl"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XTL_DATA_CACHE", raising=False)
    monkeypatch.setattr(fallback, "_announced", set())
    monkeypatch.setattr(timm_models, "_said", set())
    monkeypatch.setattr(xtl.hub, "_checked", {})  # which hosts answered: asked afresh
    assert not Path(DEFAULT).exists()
    return work


@pytest.fixture()
def offline(monkeypatch):
    """The network as it is offline: name resolution fails, connections are refused."""
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def no_route(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", no_route)


def fake_cifar(per_part: dict[str, tuple[np.ndarray, list[int]]], classes: list[str], calls: list | None = None):
    """A stand-in for torchvision.datasets.CIFAR10 holding `per_part[part] = (data, targets)`."""

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False, **kwargs):
            if calls is not None:
                calls.append({"root": root, "train": train, "download": download})
            self.classes = list(classes)
            self.data, self.targets = per_part["train" if train else "test"]

    return FakeCIFAR10


def random_cifar(n_train: int = 60, n_test: int = 20, n_classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        part: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, n_classes, n).tolist())
        for part, n in (("train", n_train), ("test", n_test))
    }


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- which source


def test_the_shared_folder_is_read_when_it_exists(tmp_path, monkeypatch, tiny_folder, capsys):
    work = tmp_path / "machine" / "xtl"
    work.mkdir(parents=True)
    shutil.copytree(tiny_folder, tmp_path / "machine" / "shared" / "data" / "cifar10")
    monkeypatch.chdir(work)
    monkeypatch.setattr(fallback, "_announced", set())

    def no_download(*args, **kwargs):
        raise AssertionError("torchvision must not be asked when the folder exists")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    source = open_source(DEFAULT)
    assert source.spec == DEFAULT and source.class_names == ["cat", "dog", "ship"]
    assert source.partition("train").keys[:3] == ["train/cat/0000.jpg", "train/dog/0000.jpg", "train/ship/0000.jpg"]
    assert capsys.readouterr().err == ""


def test_without_shared_cifar10_is_downloaded_once_into_the_cache(no_shared, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar(random_cifar(), CIFAR10_CLASSES, calls))
    source = open_source(DEFAULT)
    cache = tmp_path / "home" / ".cache" / "xtl"
    assert calls == [{"root": str(cache), "train": True, "download": True},
                     {"root": str(cache), "train": False, "download": True}]
    assert source.class_names == CIFAR10_CLASSES and len(source.partition("train")) == 60
    assert source.spec == "torchvision:cifar10 in ~/.cache/xtl (../shared/data/cifar10 not found)"
    open_source(DEFAULT)  # the pipeline opens its source several times: the line is printed once
    assert capsys.readouterr().err.splitlines() == [
        "data: ../shared/data/cifar10 not found; using CIFAR-10 from torchvision (downloaded once to ~/.cache/xtl)"
    ]
    monkeypatch.setenv("XTL_DATA_CACHE", str(tmp_path / "elsewhere"))
    open_source(DEFAULT)
    assert calls[-1]["root"] == str(tmp_path / "elsewhere")


def test_a_folder_the_user_names_does_not_fall_back(no_shared, monkeypatch):
    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar(random_cifar(), CIFAR10_CLASSES, calls))
    for spec in ("../shared/data/cifar10-mine", "folder:../shared/data/cifar10", "data/cifar10"):
        with pytest.raises(XtlError, match="does not exist|no such folder"):
            open_source(spec)
    assert calls == []


def test_the_fallback_lists_images_in_the_folder_order_so_a_seeded_split_names_the_same_images(
        no_shared, tiny_folder, monkeypatch):
    """CIFAR's pickles hold the classes in no particular order; the folder interleaves them.
    The fallback reorders torchvision's images to the folder's order: same ids, same labels, same pixels."""
    folder = open_source(str(tiny_folder))
    rng = np.random.default_rng(7)
    classes = ["ship", "cat", "dog"]  # torchvision's label order need not be the sorted folder names
    per_part = {}
    for part in ("train", "test"):
        per_class = {name: sorted((tiny_folder / part / name).iterdir()) for name in classes}
        sequence = rng.permutation([c for c, name in enumerate(classes) for _ in per_class[name]])
        taken = {c: 0 for c in range(len(classes))}
        data, targets = [], []
        for c in sequence.tolist():  # the original order: classes mixed, each class in its own order
            data.append(np.asarray(decode_image(per_class[classes[c]][taken[c]])))
            targets.append(c)
            taken[c] += 1
        per_part[part] = (np.stack(data), targets)
    assert per_part["train"][1][:6] != [0, 1, 2, 0, 1, 2]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar(per_part, classes))
    stand_in = open_source(DEFAULT)
    assert stand_in.class_names == folder.class_names == ["cat", "dog", "ship"]
    for part in ("train", "test"):
        assert np.array_equal(stand_in.partition(part).labels, folder.partition(part).labels)
        assert stand_in.partition(part).keys == [k.removesuffix(".jpg") for k in folder.partition(part).keys]
    for spec in (SplitSpec("random", train_size=18, val_size=6, test_size=6, stratified=True, seed=3),
                 SplitSpec("paper", test_size=6)):
        a, b = load_split(stand_in, spec), load_split(folder, spec)
        for name in ("train", "val", "test"):
            assert a[name].ids.tolist() == b[name].ids.tolist()
            assert torch.equal(a[name].labels, b[name].labels)
            assert torch.equal(a[name].images, b[name].images)


def _one_line(error: Exception, start: str, end: str) -> None:
    """The error is one line that starts and ends as the user is told."""
    message = str(error)
    assert "\n" not in message and message.startswith(start) and message.endswith(end), message


def test_offline_without_shared_is_one_line_saying_what_to_provide(no_shared, offline, tmp_path, monkeypatch, capsys):
    """The download server is tried first (one connection, `xtl.hub`), and found cut off."""
    with pytest.raises(XtlError) as err:
        open_source(DEFAULT)
    message = str(err.value)
    _one_line(err.value, "no CIFAR-10 here: ../shared/data/cifar10 is missing and the download to "
                         "~/.cache/xtl failed (www.cs.toronto.edu: gaierror: [Errno -3] Temporary failure",
              "no network?); pass --source DIR (an image folder DIR/{train,test}/<class>/*) "
              "or connect once to download it")
    # through the command line: that line, exit status 2, no traceback, nothing else
    from xtl import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["xtl", "data", "--figure", str(tmp_path / "f.png")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines == [f"error: {message}"]


def test_the_run_records_the_source_it_read(no_shared, monkeypatch):
    from xtl.pipeline import Pipeline, PipelineConfig

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar(random_cifar(), CIFAR10_CLASSES))
    config = PipelineConfig(runs_dir="runs", train={"train_size": 20, "val_size": 10, "test_size": 10})
    pipeline = Pipeline(config, progress=False, console=Console(file=io.StringIO()))
    pipeline.data(pipeline.run_configs[config.models[0]])
    info = json.loads((config.folder / "data.json").read_text())
    assert info["source"] == "torchvision:cifar10 in ~/.cache/xtl (../shared/data/cifar10 not found)"
    assert info["configured_source"] == DEFAULT
    assert info["sizes"] == {"train": 20, "val": 10, "test": 10}


# ----------------------------------------------------------------------------- DINOv2 weights


def test_dinov2_weights_from_a_local_file_say_which(no_shared, tmp_path, monkeypatch, capsys):
    from conftest import DINOV2
    from xtl.models import build_model

    (tmp_path / "w").mkdir()
    shutil.copyfile(DINOV2, tmp_path / "w" / DINOV2.name)
    monkeypatch.setenv("XTL_WEIGHTS_DIR", str(tmp_path / "w"))
    build_model("vit_s14_dinov2", n_classes=3, input_size=56)
    build_model("vit_s14_dinov2", n_classes=3, input_size=56)
    assert capsys.readouterr().err.splitlines() == [f"weights: vit_s14_dinov2 from {tmp_path / 'w' / DINOV2.name}"]


def test_dinov2_weights_from_the_hub_when_no_local_file(no_shared, monkeypatch, capsys):
    """No local file: timm is asked for the hub weights (the download itself is faked)."""
    import timm

    from xtl.models import build_model

    monkeypatch.setattr(timm_models, "find_local_weights", lambda name: None)
    asked = []
    real_create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        asked.append((name, pretrained))
        return real_create(name, pretrained=False, **kwargs)  # stands in for the downloaded weights

    monkeypatch.setattr(timm, "create_model", create_model)
    build_model("vit_s14_dinov2", n_classes=3, input_size=56)
    assert asked == [("vit_small_patch14_dinov2.lvd142m", True)]
    assert capsys.readouterr().err.splitlines() == [
        "weights: vit_s14_dinov2: vit_small_patch14_dinov2.imgfocus.safetensors not in $XTL_WEIGHTS_DIR or "
        "../shared/weights; using the timm hub's vit_small_patch14_dinov2.lvd142m (original DINOv2; downloaded "
        "once to the Hugging Face cache)"
    ]


def test_offline_without_dinov2_weights_is_one_line_naming_the_file(no_shared, offline, tmp_path, monkeypatch, capsys):
    """The real hub download (huggingface_hub, empty cache) runs into the cut network."""
    import huggingface_hub.constants

    from xtl.models import build_model

    monkeypatch.setattr(timm_models, "find_local_weights", lambda name: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(XtlError) as err:
        build_model("vit_s14_dinov2", n_classes=3, input_size=56)
    _one_line(err.value, "the weights of vit_s14_dinov2 could not be downloaded from the timm hub "
                         "(vit_small_patch14_dinov2.lvd142m: ",
              "no network?); put vit_small_patch14_dinov2.imgfocus.safetensors in $XTL_WEIGHTS_DIR "
              "or ../shared/weights, or connect once to download it")
    assert capsys.readouterr().err == ""  # no "using the hub" line for a download that failed


# ----------------------------------------------------------------------------- explain progress, no terminal


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory, cifar):
    from helpers import tiny_run

    return tiny_run(tmp_path_factory.mktemp("runs") / "cnn", cifar, "timm:resnet10t", 32)


def test_explain_prints_plain_progress_lines_when_stderr_is_not_a_terminal(cnn_run, monkeypatch, capfd):
    from xtl.explain import runner

    ticks = iter(range(0, 1000, 3))  # a clock that moves 3 s per look
    monkeypatch.setattr(runner.PlainProgress, "clock", staticmethod(lambda: float(next(ticks))))
    runner.explain_run(cnn_run, ["gradcam", "saliency"], n_images=20, batch_size=4, progress=False)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("explain ")]
    # batches end at 4, 8, 12, 16, 20 images at 3, 6, 9, 12, 15 s: a line once 5 s have passed, and the last
    assert lines == [
        "explain cnn: 8/20 images, gradcam+saliency (6.0 s elapsed)",
        "explain cnn: 16/20 images, gradcam+saliency (12.0 s elapsed)",
        "explain cnn: 20/20 images, gradcam+saliency (15.0 s elapsed)",
    ]


def test_explain_prints_no_plain_lines_on_a_terminal(cnn_run, monkeypatch, capsys):
    from xtl.explain import runner

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(runner.PlainProgress, "every", 0.0)
    runner.explain_run(cnn_run, ["gradcam"], n_images=8, batch_size=4, progress=False)
    assert "images," not in capsys.readouterr().err
