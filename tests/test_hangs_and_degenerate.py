"""Issue 15: settings that used to hang (devices or nodes beyond the machine) or end in a traceback
(an unknown precision), and degenerate inputs found only after training; each is one line, exit 2,
before any work."""

from __future__ import annotations

import os
import subprocess
import typing
from pathlib import Path

import pytest
import torch

from helpers import XTL, one_line_error
from xtl.config import PRECISIONS, RunConfig
from xtl.device import check_training_hardware
from xtl.errors import XtlError

ENV = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MASTER_ADDR", "SLURM_NTASKS")}
ENV["OMP_NUM_THREADS"] = "1"
TINY_CLI = ["--model", "timm:resnet10t", "--random-init", "--input-size", "32", "--split", "random",
            "--train-size", "24", "--val-size", "6", "--test-size", "6", "--epochs", "1", "--no-progress"]


def _xtl(*args, timeout=60) -> subprocess.CompletedProcess:
    # a timeout, so that a regression to waiting forever fails instead of hanging the suite
    return subprocess.run([XTL, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)


_one_line = one_line_error


# ----------------------------------------------------------------------------- hangs


@pytest.mark.parametrize("extra, fragments", [
    (["--num-nodes", "2"], ["option --num-nodes 2", "torchrun", "--num-nodes 1"]),
    (["--devices", str((os.cpu_count() or 1) + 1), "--accelerator", "cpu"], ["option --devices", "CPU core(s)"]),
    (["--precision", "bogus"], ["option --precision must be one of auto, 32-true, bf16-mixed", "not 'bogus'"]),
], ids=["num_nodes_without_launcher", "cpu_devices_beyond_cores", "unknown_precision"])
def test_devices_nodes_and_precision_beyond_the_machine_are_one_line(extra, fragments, tiny_folder, tmp_path):
    result = _xtl("finetune", "--source", tiny_folder, *TINY_CLI, *extra, "--runs-dir", tmp_path / "runs", "--name", "r")
    _one_line(result, *fragments)
    assert not (tmp_path / "runs" / "r" / "config.yaml").exists()


def test_gpu_devices_are_counted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(XtlError, match=r"^option --devices 4: this machine has 1 CUDA GPU\(s\) that PyTorch can use; "
                                       r"give --devices 1 or fewer$"):
        check_training_hardware("cuda", 4, 1)
    check_training_hardware("cuda", 1, 1)
    with pytest.raises(XtlError, match="an Apple GPU"):
        check_training_hardware("mps", 2, 1)


def test_several_nodes_need_a_launcher_that_agrees(monkeypatch):
    for key in ("WORLD_SIZE", "MASTER_ADDR", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(XtlError, match="^option --num-nodes 2: several nodes need a launcher"):
        check_training_hardware("cpu", 1, 2)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(XtlError, match=r"^options --devices 1 x --num-nodes 2 make 2 processes, but the launcher "
                                       r"started WORLD_SIZE=4"):
        check_training_hardware("cpu", 1, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_training_hardware("cpu", 1, 2)  # torchrun --nnodes 2 --nproc-per-node 1


def test_the_precisions_are_lightnings_own():
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    lightning = {p for p in typing.get_args(_PRECISION_INPUT_STR) if not p.startswith("transformer-engine")}
    assert set(PRECISIONS) == {"auto"} | lightning | set(typing.get_args(_PRECISION_INPUT_STR_ALIAS))
    with pytest.raises(XtlError, match="^run.yaml: key 'precision' must be one of auto, "):
        RunConfig.from_dict({"precision": "fp8"}, "run.yaml")


# ----------------------------------------------------------------------------- degenerate inputs


def _one_class_folder(tmp_path: Path, cifar: Path) -> Path:
    import shutil

    for part, n in (("train", 12), ("test", 4)):
        dest = tmp_path / "one" / part / "cat"
        dest.mkdir(parents=True)
        for f in sorted((cifar / part / "cat").iterdir())[:n]:
            shutil.copy(f, dest / f.name)
    return tmp_path / "one"


def _tiny_config(source: Path, **overrides) -> RunConfig:
    options = dict(source=str(source), model="timm:resnet10t", pretrained=False, input_size=32, split="random",
                   train_size=9, val_size=3, test_size=3, batch_size=4, epochs=1, patience=0, warmup_epochs=0.0,
                   accelerator="cpu")
    options.update(overrides)
    return RunConfig(**options)


def _finetune(config: RunConfig, path: Path, spec=None):
    from xtl.data import load_split
    from xtl.runs import RunDir, split_spec
    from xtl.train import finetune

    data = load_split(config.source, spec or split_spec(config))
    return finetune(config, data, RunDir(path), progress=False), RunDir(path)


def test_a_data_set_of_one_class_is_refused_before_training(cifar, tmp_path):
    folder = _one_class_folder(tmp_path, cifar)
    with pytest.raises(XtlError) as caught:
        _finetune(_tiny_config(folder), tmp_path / "run")
    assert str(caught.value) == (f"option --source: data source {folder} has 1 class (cat); a classifier needs "
                                 "at least 2")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_data_set_of_one_class_is_one_line_from_the_cli(cifar, tmp_path):
    folder = _one_class_folder(tmp_path, cifar)
    result = _xtl("finetune", "--source", folder, *TINY_CLI, "--train-size", 8, "--val-size", 2, "--test-size", 2,
                  "--runs-dir", tmp_path / "runs", "--name", "r")
    _one_line(result, "option --source", "has 1 class (cat); a classifier needs at least 2")


@pytest.mark.parametrize("option, field", [("--train-size", "train_size"), ("--test-size", "test_size")])
def test_an_empty_training_or_test_split_is_refused(option, field, tiny_folder, tmp_path):
    with pytest.raises(XtlError) as caught:
        _tiny_config(tiny_folder, **{field: 0})
    reason = "an empty training split trains nothing" if field == "train_size" else "the best model is evaluated on it"
    assert str(caught.value) == f"option {option} must be >= 1 ({reason}), not 0"
    # a split that is empty anyway (here cut by hand) is refused before any epoch, naming the option
    from xtl.data import SplitSpec

    spec = SplitSpec("random", **{"train_size": 9, "val_size": 3, "test_size": 3, field: 0})
    with pytest.raises(XtlError) as caught:
        _finetune(_tiny_config(tiny_folder), tmp_path / "run", spec)
    part = "training" if field == "train_size" else "test"
    assert str(caught.value).startswith(f"option {option}: the {part} split of {tiny_folder} is empty")
    assert not (tmp_path / "run" / "history_epochs.csv").exists()


def test_an_empty_split_from_the_cli_exits_2_not_0(tiny_folder, tmp_path):
    result = _xtl("finetune", "--source", tiny_folder, *TINY_CLI, "--train-size", 0, "--runs-dir", tmp_path / "runs")
    _one_line(result, "option --train-size must be >= 1")


@pytest.mark.parametrize("overrides", [
    {},
    {"model": "efficientnet_lite0", "freeze_blocks": 2, "cache_frozen": True},
    {"model": "efficientnet_lite0", "freeze_blocks": 2, "cache_frozen": False},
], ids=["plain", "frozen_cached", "frozen_uncached"])
def test_a_last_training_batch_of_one_image_is_dropped(overrides, tiny_folder, tmp_path):
    # 9 images in batches of 4: 4, 4 and 1; the one image's BatchNorm (1 x 1 at the end of a 32 px
    # network) cannot train on a single value per channel
    config = _tiny_config(tiny_folder, epochs=2, **overrides)
    state, run = _finetune(config, tmp_path / "run")
    assert state.epoch == 2
    assert [b["epoch"] for b in state.batches] == [1, 1, 2, 2]
    assert all(torch.isfinite(torch.tensor(b["loss"])) for b in state.batches)
    assert run.weights_path.is_file()


def test_a_batch_of_one_image_that_batchnorm_cannot_train_on_is_one_line(tiny_folder, tmp_path):
    with pytest.raises(XtlError) as caught:
        _finetune(_tiny_config(tiny_folder, batch_size=1), tmp_path / "run")
    assert str(caught.value).startswith("option --batch-size 1: a BatchNorm layer of timm:resnet10t sees one value "
                                        "per channel")


# ----------------------------------------------------------------------------- numbers that mean nothing


NUMBER_CASES = [
    # (command and the arguments it needs, option, bad value, what the one line says)
    (["data"], "--train-size", "-1", "must be >= 0, not -1"),
    (["data"], "--val-size", "-3", "must be >= 0, not -3"),
    (["data"], "--test-size", "-1", "must be >= 0, not -1"),
    (["data"], "--seed", "-1", "must be >= 0, not -1"),
    (["explain", "nope"], "--images", "0", "must be >= 1, not 0"),
    (["explain", "nope"], "--images", "-1", "must be >= 1, not -1"),
    (["explain", "nope"], "--batch-size", "0", "must be >= 1, not 0"),
    (["explain", "photo.jpg", "--model", "timm:resnet10t"], "--batch-size", "-4", "must be >= 1, not -4"),
    (["faithfulness", "nope"], "--images", "0", "must be at least 1, not 0"),
    (["faithfulness", "nope"], "--steps", "0", "must be at least 1, not 0"),
    (["faithfulness", "nope"], "--steps", "-2", "must be at least 1, not -2"),
    (["faithfulness", "nope"], "--steps", "5000", "must be at most 1,000 (each step is a forward pass per image and metric), not 5,000"),
    (["run", "--show-config"], "--faithfulness-steps", "2000", "must be in [1, 1000], not 2000"),
    (["finetune"], "--input-size", "100000", "must be in [16, 1024], not 100000"),
    (["benchmark", "grid-pointing", "nope"], "--mosaics", "1000000", "must be in [1, 100000], not 1000000"),
    (["benchmark", "shortcut"], "--input-size", "5000", "must be in [16, 1024], not 5000"),
    (["benchmark", "shortcut"], "--marker-size", "1000", "must be in [1, 64], not 1000"),
    (["faithfulness", "nope"], "--batch-size", "0", "must be at least 1, not 0"),
    (["faithfulness", "nope"], "--explain-batch-size", "-1", "must be at least 1, not -1"),
    (["faithfulness", "nope"], "--seed", "-1", "must be >= 0, not -1"),
    (["serve", "nope"], "--port", "0", "must be in [1, 65535], not 0"),
    (["serve", "nope"], "--port", "-1", "must be in [1, 65535], not -1"),
    (["serve", "nope"], "--port", "70000", "must be in [1, 65535], not 70000"),
    (["serve", "nope"], "--max-upload-mb", "0", "must be > 0, not 0.0"),
    (["serve", "nope"], "--max-upload-mb", "-1", "must be > 0, not -1.0"),
    (["serve", "nope"], "--max-upload-mb", "nan", "must be a finite number, not nan"),
    (["serve", "nope"], "--max-upload-mb", "inf", "must be a finite number, not inf"),
    (["compare", "nope"], "--gallery-size", "0", "must be >= 1, not 0"),
    (["compare", "nope"], "--gallery-size", "-1", "must be >= 1, not -1"),
    (["run", "--show-config"], "--explain-batch-size", "0", "must be >= 1, not 0"),
    (["run", "--show-config"], "--explain-images", "-5", "must be >= 1 or null (all), not -5"),
    (["run", "--show-config"], "--gallery-size", "-1", "must be >= 1, not -1"),
    (["run", "--show-config"], "--faithfulness-images", "0", "must be >= 1, not 0"),
    (["run", "--show-config"], "--faithfulness-steps", "-1", "must be in [1, 1000], not -1"),
    (["run", "--show-config"], "--faithfulness-batch-size", "0", "must be >= 1, not 0"),
    (["finetune"], "--warmup-epochs", "-1", "must be >= 0, not -1.0"),
    (["finetune"], "--weight-decay", "-0.1", "must be >= 0, not -0.1"),
    (["finetune"], "--label-smoothing", "nan", "must be a finite number, not nan"),
    (["finetune"], "--head-lr", "0", "must be > 0, not 0.0"),
    (["finetune"], "--lr", "inf", "must be a finite number, not inf"),
    (["finetune"], "--lr", "-1e-3", "must be > 0, not -0.001"),
    (["finetune"], "--bn-momentum", "-0.5", "must be in [0, 1], not -0.5"),
    (["finetune"], "--patience", "-1", "must be >= 0, not -1"),
    (["finetune"], "--grad-clip", "nan", "must be a finite number, not nan"),
    (["finetune"], "--seed", "-1", "must be >= 0, not -1"),
    (["finetune"], "--test-size", "-1", "must be >= 0, not -1"),
    (["finetune"], "--devices", "0", "must be > 0, not 0"),
    (["finetune"], "--num-nodes", "-1", "must be > 0, not -1"),
    (["finetune"], "--epochs", "0", "must be > 0, not 0"),
    (["finetune"], "--head-epochs", "-1", "must be >= 0, not -1"),
]


@pytest.mark.parametrize("command, option, value, says", NUMBER_CASES,
                         ids=[f"{c[0]}{o}={v}" for c, o, v, _ in NUMBER_CASES])
def test_a_meaningless_number_is_one_line_naming_the_option(command, option, value, says, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from xtl.cli import app

    monkeypatch.chdir(tmp_path)  # nothing a command might start is left in the repository
    result = CliRunner().invoke(app, [*command, option, value])
    assert isinstance(result.exception, XtlError), (result.exception, result.output)
    assert str(result.exception) == f"option {option} {says}"
    assert list(tmp_path.iterdir()) == []  # refused before any work


@pytest.mark.parametrize("setting, says", [
    ("seed=-1", "key 'seed' must be >= 0, not -1"),
    ("weight_decay=-0.1", "key 'weight_decay' must be >= 0, not -0.1"),
    ("warmup_epochs=-1", "key 'warmup_epochs' must be >= 0, not -1"),
    ("lr=.inf", "key 'lr' must be a finite number, not inf"),
    ("bn_momentum=2", "key 'bn_momentum' must be in [0, 1], not 2"),
])
def test_xtl_run_train_settings_are_range_checked(setting, says, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from xtl.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--show-config", "--train", setting])
    assert isinstance(result.exception, XtlError), (result.exception, result.output)
    assert says in str(result.exception) and "\n" not in str(result.exception)


def test_a_bad_number_exits_2_with_one_line(tmp_path):
    result = subprocess.run([XTL, "serve", "nope", "--port", "-1"], capture_output=True, text=True, timeout=60,
                            env=ENV, cwd=tmp_path)
    _one_line(result, "option --port must be in [1, 65535], not -1")


@pytest.mark.parametrize("method, option", [("rise", "n_masks"), ("smoothgrad", "n_samples"),
                                            ("integrated_gradients", "n_steps")])
def test_a_count_option_that_would_cost_unbounded_time_is_one_line(method, option):
    """Issue 28: one number (10^9 RISE masks, SmoothGrad samples, path points) is 10^9 passes through
    the model per image; above `MAX_COUNT` it is refused in one line before any pass."""
    from xtl.errors import XtlError
    from xtl.explain import explain
    from xtl.models import build_model

    model, _ = build_model("timm:resnet10t", 3, pretrained=False, input_size=32)
    with pytest.raises(XtlError, match=rf"^option {option} of method {method} must be at most 100,000 .*not 1,000,000,000$"):
        explain(model.eval(), torch.zeros(1, 3, 32, 32), 0, method, **{option: 10**9})
