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


# ----------------------------------------------------------------------------- a failed first start


def cli_code(monkeypatch, capsys, *args: str) -> tuple[int, list[str]]:
    """Exit status and stderr lines of `xtl ARGS` (0 when it returns without exiting)."""
    from xtl import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["xtl", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    return code, capsys.readouterr().err.strip().splitlines()


TINY = ("--model", "timm:resnet10t", "--random-init", "--split", "random", "--train-size", "6", "--val-size", "3",
        "--test-size", "3", "--input-size", "32", "--batch-size", "3", "--epochs", "1", "--no-progress")


def fail_after_the_config_is_written(monkeypatch):
    import xtl.train.loop as loop

    def make_optimizer(*args, **kwargs):
        raise XtlError("the start failed (simulated, after config.yaml and split.csv were written)")

    monkeypatch.setattr(loop, "make_optimizer", make_optimizer)


@pytest.mark.parametrize("resume", [False, True])
def test_a_failed_first_start_leaves_nothing_and_the_fixed_command_starts(resume, tiny_folder, tmp_path, monkeypatch,
                                                                          capsys):
    """Before, the failed start's config.yaml blocked the fixed command ("already exists") and
    `--resume` reused its settings."""
    monkeypatch.chdir(tmp_path)
    command = ("finetune", *TINY, "--source", "data", "--runs-dir", "runs", "--name", "first", "--no-evaluate",
               *(["--resume"] if resume else []))
    with monkeypatch.context() as patched:
        fail_after_the_config_is_written(patched)
        code, err = cli_code(monkeypatch, capsys, *command)
    assert (code, err) == (2, ["error: the start failed (simulated, after config.yaml and split.csv were written)"])
    assert not (tmp_path / "runs").exists()  # the run folder and the runs directory it made are gone
    code, err = cli_code(monkeypatch, capsys, *command)  # the same command, now that the start succeeds
    assert code == 0, err
    from xtl.runs import RunDir

    run = RunDir(tmp_path / "runs" / "first")
    assert run.last_checkpoint.is_file() and run.config().epochs == 1


def test_a_failed_start_in_an_existing_folder_removes_only_what_it_wrote(tiny_folder, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "runs" / "mine"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("the user's own")
    fail_after_the_config_is_written(monkeypatch)
    code, err = cli_code(monkeypatch, capsys, "finetune", *TINY, "--source", str(tiny_folder),
                         "--runs-dir", str(tmp_path / "runs"), "--name", "mine")
    assert code == 2
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "the user's own"


def test_a_failure_after_an_epoch_is_kept_keeps_the_run_for_resume(tiny_folder, tmp_path, monkeypatch, capsys):
    import xtl.evaluate

    def evaluate(*args, **kwargs):
        raise XtlError("evaluation failed (simulated)")

    monkeypatch.setattr(xtl.evaluate, "evaluate", evaluate)
    code, err = cli_code(monkeypatch, capsys, "finetune", *TINY, "--source", str(tiny_folder),
                         "--runs-dir", str(tmp_path / "runs"), "--name", "kept")
    assert (code, err[-1:]) == (2, ["error: evaluation failed (simulated)"])
    folder = tmp_path / "runs" / "kept"
    assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.pt").is_file()


# ----------------------------------------------------------------------------- where the data is


@pytest.fixture()
def run_made_elsewhere(tiny_folder, tmp_path, monkeypatch, capsys):
    """A run made in tmp_path with `--source data` (a relative path), then looked at from another folder."""
    monkeypatch.chdir(tmp_path)
    code, err = cli_code(monkeypatch, capsys, "finetune", *TINY, "--source", "data", "--runs-dir", "runs",
                         "--name", "here", "--no-evaluate")
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path / "runs" / "here"


def test_a_run_stores_its_data_folder_as_an_absolute_path(run_made_elsewhere, tiny_folder, monkeypatch, capsys):
    import yaml

    stored = yaml.safe_load((run_made_elsewhere / "config.yaml").read_text())["run"]["source"]
    assert stored == str(tiny_folder)
    code, err = cli_code(monkeypatch, capsys, "evaluate", str(run_made_elsewhere), "--device", "cpu")
    assert code == 0, err  # from another folder, the run finds its data
    assert (run_made_elsewhere / "metrics.json").is_file()


def test_a_run_whose_data_folder_is_missing_says_which_and_that_it_was_made_elsewhere(run_made_elsewhere, tiny_folder,
                                                                                        monkeypatch, capsys):
    config = run_made_elsewhere / "config.yaml"
    config.write_text(config.read_text().replace(f"source: {tiny_folder}", "source: data"))  # as runs stored it before
    code, err = cli_code(monkeypatch, capsys, "evaluate", str(run_made_elsewhere))
    assert (code, err) == (2, [
        f"error: run {run_made_elsewhere}: its data folder data does not exist (a path relative to the folder a "
        f"command runs in, here {Path.cwd()}); the run was made elsewhere or the data moved: run the command where "
        f"the run was made, or set source: in {config} to the data's path"])
    config.write_text(config.read_text().replace("source: data", f"source: {tiny_folder}-moved"))
    code, err = cli_code(monkeypatch, capsys, "evaluate", str(run_made_elsewhere))
    assert (code, err) == (2, [
        f"error: run {run_made_elsewhere}: its data folder {tiny_folder}-moved does not exist; the run was made "
        f"elsewhere or the data moved: run the command where the run was made, or set source: in {config} to the "
        "data's path"])


def test_sources_from_the_internet_are_stored_as_given():
    from xtl.locations import stored_source

    for spec in ("hf:uoft-cs/cifar10", "torchvision:cifar10", "cifar10", "../shared/no-such-folder"):
        assert stored_source(spec) == spec


def test_folder_and_hf_dir_sources_keep_their_prefix(tiny_folder, monkeypatch):
    from xtl.locations import stored_source

    monkeypatch.chdir(tiny_folder.parent)
    assert stored_source("folder:data") == f"folder:{tiny_folder}"
    assert stored_source("hf:./data") == f"hf:{tiny_folder}"


# ----------------------------------------------------------------------------- --name inside --runs-dir


@pytest.mark.parametrize("name", ["../../x", "../beside", "/tmp/elsewhere", "a/../../b", "."])
def test_finetune_name_must_stay_inside_the_runs_dir(name, tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = cli_code(monkeypatch, capsys, "finetune", *TINY, "--source", str(tiny_folder), "--runs-dir", "runs",
                         "--name", name)
    assert (code, err) == (2, [f"error: option --name must name a folder inside the runs directory (runs), not "
                               f"{name!r}; to keep runs elsewhere, pass --runs-dir DIR"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing made anywhere


def test_a_name_with_subfolders_inside_the_runs_dir_is_fine(tmp_path):
    from xtl.locations import run_folder

    assert run_folder(tmp_path / "runs", "ablation/lr-1e-4") == tmp_path / "runs" / "ablation" / "lr-1e-4"


@pytest.mark.parametrize("name", ["../x", "/abs/x"])
def test_xtl_run_name_must_stay_inside_the_runs_dir(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = cli_code(monkeypatch, capsys, "run", "--name", name, "--models", "timm:resnet10t")
    assert (code, err) == (2, [f"error: option --name must name a folder inside the runs directory (runs), not "
                               f"{name!r}; to keep runs elsewhere, pass --runs-dir DIR"])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- symbolic link loops


def test_a_link_loop_in_a_class_folder_is_never_walked(tiny_folder, monkeypatch, capsys):
    from xtl.data import open_source

    cat = tiny_folder / "train" / "cat"
    (cat / "loop").symlink_to(".")
    (cat / "loop.jpg").symlink_to(".")  # a folder, whatever its name
    source = open_source(str(tiny_folder))
    assert len(source.partition("train")) == 36 and not any("loop" in k for k in source.partition("train").keys)


def test_an_image_name_that_links_to_itself_is_one_line(tiny_folder, monkeypatch, capsys):
    self_link = tiny_folder / "train" / "cat" / "self.png"
    self_link.symlink_to("self.png")
    code, err = cli_code(monkeypatch, capsys, "data", "--source", str(tiny_folder),
                         "--figure", str(tiny_folder.parent / "f.png"))
    assert (code, err) == (2, [f"error: image file {self_link} cannot be read: Too many levels of symbolic links (a "
                               "symbolic link that leads back to itself?); remove it or point it at an image"])


def test_a_class_folder_linking_back_to_the_data_folder_is_one_line(tiny_folder, monkeypatch, capsys):
    loop = tiny_folder / "train" / "loop"
    loop.symlink_to(".")
    code, err = cli_code(monkeypatch, capsys, "data", "--source", str(tiny_folder),
                         "--figure", str(tiny_folder.parent / "f.png"))
    assert (code, err) == (2, [f"error: class folder {loop} is a symbolic link to {tiny_folder / 'train'}, a folder "
                               "that holds it (a loop); remove it"])
