"""Issue 15, no network and traps: hub weights and downloadable data sets offline are one line in
seconds (no minute of retries, no traceback, no run folder left); a failed first start leaves
nothing behind; run folders name their data absolutely; --name stays under --runs-dir; symlink
loops in image folders.

Nothing here touches the network: name resolution and connections fail as they do offline
(`offline`), and the real torchvision / huggingface_hub / datasets code runs into that.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import torch

import xtl.hub
from xtl.errors import XtlError

HF_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Empty caches (torch.hub, Hugging Face, xtl's data), hosts asked afresh, no offline copies."""
    import huggingface_hub.constants

    import xtl.models.timm_models as timm_models
    import xtl.models.torchvision_models as torchvision_models

    monkeypatch.setattr(xtl.hub, "_checked", {})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XTL_DATA_CACHE", str(tmp_path / "xtl-cache"))
    monkeypatch.setenv("XTL_WEIGHTS_DIR", str(tmp_path / "no-weights-here"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(timm_models, "_said", set())
    monkeypatch.setattr(torchvision_models, "_said", set(), raising=False)



@pytest.fixture()
def offline(monkeypatch) -> dict:
    """The network as it is offline: name resolution fails, connections are refused. Counts the
    look-ups and the sleeps (a retrying library sleeps between tries; here the sleeps are free)."""
    seen = {"lookups": 0, "sleeps": 0}

    def no_dns(*args, **kwargs):
        seen["lookups"] += 1
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def no_route(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    def sleep(seconds):
        seen["sleeps"] += 1

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", no_route)
    monkeypatch.setattr(time, "sleep", sleep)
    return seen


@pytest.fixture()
def really_offline(offline, monkeypatch) -> dict:
    """Offline without HF_HUB_OFFLINE: nobody told the Hugging Face libraries (conftest does)."""
    import huggingface_hub.constants

    for name in HF_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", False)
    return offline


def one_line(err: BaseException, *parts: str) -> str:
    message = str(err)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    from xtl import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["xtl", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


# ----------------------------------------------------------------------------- the check itself


def test_a_host_that_does_not_answer_is_given_up_after_a_short_timeout(monkeypatch):
    asked = []

    def create_connection(address, timeout=None, **kwargs):
        asked.append((address, timeout))
        raise socket.timeout("timed out")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    assert xtl.hub.unreachable("https://download.pytorch.org/models/x.pth") == \
        "download.pytorch.org: no answer within 3 s"
    assert xtl.hub.unreachable("https://download.pytorch.org/models/y.pth") is not None
    assert asked == [(("download.pytorch.org", 443), 3.0)]  # once per host and process
    monkeypatch.setenv("XTL_NETWORK_TIMEOUT", "0.5")
    assert xtl.hub.unreachable("http://example.org:8080/a") == "example.org: no answer within 0.5 s"
    assert asked[-1] == (("example.org", 8080), 0.5)


def test_a_reachable_host_is_not_reported(monkeypatch):
    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Connection())
    assert xtl.hub.unreachable("https://huggingface.co") is None


# ----------------------------------------------------------------------------- hub weights


def test_torchvision_weights_offline_are_one_line_naming_the_file_and_the_alternatives(offline):
    """The paper's CNNs (the `paper` preset) and any `torchvision:` model."""
    from xtl.models import build_model

    for name, file in (("resnet34", "resnet34-b627a593.pth"),
                       ("torchvision:mobilenet_v3_small", "mobilenet_v3_small-047dcff4.pth")):
        with pytest.raises(XtlError) as err:
            build_model(name, n_classes=3)
        one_line(err.value, f"the weights of {name} could not be downloaded from torchvision (",
                 "download.pytorch.org: gaierror: [Errno -3] Temporary failure in name resolution; no network?)",
                 f"pass a local weights file (--weights FILE; in xtl run --per-model {name}.weights=FILE), "
                 f"put {file} in $XTL_WEIGHTS_DIR, or connect once to download them")


def test_torchvision_weights_in_xtl_weights_dir_are_read_offline(offline, tmp_path, monkeypatch, capsys):
    import torchvision

    from xtl.models import build_model

    source = torchvision.models.mobilenet_v3_small(weights=None)
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(source.state_dict(), folder / "mobilenet_v3_small-047dcff4.pth")
    monkeypatch.setenv("XTL_WEIGHTS_DIR", str(folder))
    model, _ = build_model("torchvision:mobilenet_v3_small", n_classes=3)
    for key, value in source.state_dict().items():
        if not key.startswith("classifier.3"):  # the new head
            assert torch.equal(model.state_dict()[key], value), key
    assert model.classifier[3].out_features == 3
    assert capsys.readouterr().err.splitlines() == [
        f"weights: torchvision:mobilenet_v3_small from {folder / 'mobilenet_v3_small-047dcff4.pth'}"]


def test_torchvision_weights_already_downloaded_need_no_network(offline, tmp_path):
    import torchvision

    from xtl.models import build_model

    source = torchvision.models.mobilenet_v3_small(weights=None)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / "mobilenet_v3_small-047dcff4.pth")
    model, _ = build_model("torchvision:mobilenet_v3_small", n_classes=3)
    assert torch.equal(model.features[0][0].weight, source.features[0][0].weight)
    assert offline["lookups"] == 0


def test_timm_weights_offline_fail_at_once_without_retries(really_offline):
    import huggingface_hub.constants

    from xtl.models import build_model

    with pytest.raises(XtlError) as err:
        build_model("timm:resnet10t", n_classes=3)
    one_line(err.value, "the weights of timm:resnet10t could not be downloaded from the timm hub (resnet10t: "
                        "not in the local cache, and huggingface.co: gaierror: [Errno -3] Temporary failure in name "
                        "resolution; no network?); pass a local weights file (--weights FILE")
    assert really_offline["sleeps"] == 0 and really_offline["lookups"] == 1  # one check, no retries
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # the hub libraries went offline for the process


def test_timm_weights_in_the_hub_cache_load_offline_without_retries(really_offline, tmp_path):
    import timm
    from safetensors.torch import save_file

    from xtl.models import build_model

    source = timm.create_model("resnet10t", pretrained=False)
    snapshot = tmp_path / "hf" / "models--timm--resnet10t.c3_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    model, _ = build_model("timm:resnet10t", n_classes=3)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert really_offline["sleeps"] == 0


@pytest.mark.parametrize("env", ["really_offline", "hf_hub_offline"])
def test_hf_models_offline_are_one_line_saying_what_to_provide(env, request):
    from xtl.models import build_model

    expected = ("huggingface.co: gaierror: [Errno -3] Temporary failure in name resolution"
                if env == "really_offline" else "HF_HUB_OFFLINE is set")
    if env == "really_offline":
        seen = request.getfixturevalue("really_offline")
    with pytest.raises(XtlError) as err:
        build_model("hf:google/vit-base-patch16-224", n_classes=3)
    one_line(err.value, "model hf:google/vit-base-patch16-224: its configuration could not be downloaded from the "
                        f"Hugging Face hub (not in the local cache, and {expected}; no network?); pass a local model "
                        "folder (hf:DIR, saved with save_pretrained; or --weights DIR) or connect once to download it")
    if env == "really_offline":
        assert seen["sleeps"] == 0


# ----------------------------------------------------------------------------- downloadable data sets


@pytest.mark.parametrize("spec", ["torchvision:cifar10", "torchvision:cifar100"])
def test_torchvision_data_sets_offline_are_one_line(offline, spec):
    from xtl.data import open_source

    with pytest.raises(XtlError) as err:
        open_source(spec)
    one_line(err.value, f"data source {spec} is not in ", "and could not be downloaded (www.cs.toronto.edu: "
             "gaierror: [Errno -3] Temporary failure in name resolution; no network?); pass --source DIR "
             "(an image folder DIR/{train,test}/<class>/*) or connect once to download it")


@pytest.mark.parametrize("spec", ["hf:uoft-cs/cifar10", "cifar100"])
def test_hf_data_sets_offline_are_one_line_without_retries(really_offline, spec):
    from xtl.data import open_source

    with pytest.raises(XtlError) as err:
        open_source(spec)
    one_line(err.value, f"data source {spec} could not be downloaded from the Hugging Face hub (not in the local "
             "cache, and huggingface.co: gaierror: [Errno -3] Temporary failure in name resolution; no network?); "
             "pass --source DIR (an image folder DIR/{train,test}/<class>/*, or hf:DIR for a data set saved with "
             "save_to_disk) or connect once to download it")
    assert really_offline["sleeps"] == 0


@pytest.mark.parametrize("case", ["torchvision_weights", "timm_weights", "torchvision_data", "hf_data"])
def test_finetune_offline_is_one_line_exit_2_and_no_run_folder(case, really_offline, tiny_folder, tmp_path,
                                                               monkeypatch, capsys):
    model, source = {
        "torchvision_weights": ("resnet34", str(tiny_folder)),
        "timm_weights": ("timm:resnet10t", str(tiny_folder)),
        "torchvision_data": ("timm:resnet10t", "torchvision:cifar10"),
        "hf_data": ("timm:resnet10t", "hf:uoft-cs/cifar10"),
    }[case]
    runs = tmp_path / "runs"
    extra = ["--random-init"] if case.endswith("data") else []
    code, err = run_cli(monkeypatch, capsys, "finetune", "--model", model, "--preset", "paper", "--source", source,
                        "--runs-dir", str(runs), "--epochs", "1", "--no-progress", *extra)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "no network?" in err[0], err
    assert not runs.exists()
    assert really_offline["sleeps"] == 0
