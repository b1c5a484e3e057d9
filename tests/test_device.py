"""One device policy (xtl.device): `--device` on every command that runs a model, the run's
accelerator otherwise, one line for a device that is unknown or not on this machine."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import XTL, tiny_run
from xtl.cli import app
from xtl.device import resolve_device
from xtl.errors import XtlError

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src" / "xtl"
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar):
    return tiny_run(tmp_path_factory.mktemp("runs") / "cnn", cifar, "timm:resnet10t", 32, accelerator="cpu")


def test_the_run_accelerator_decides_when_no_device_is_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None, "cpu") == torch.device("cpu")  # a CPU run stays on the CPU, GPU or not
    assert resolve_device(None, "auto") == torch.device("cuda")
    assert resolve_device("auto", "cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None, "cuda") == torch.device("cpu")  # a GPU run opens on a machine without one
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["nonsense", "tpu", "cuda:x", "meta"])
def test_an_unknown_device_is_named(device):
    with pytest.raises(XtlError, match=re.escape(f"option --device must be auto, cpu, cuda, cuda:N or mps, not '{device}'")):
        resolve_device(device)


@NO_GPU
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:1"])
def test_a_gpu_that_is_not_there_is_named(device):
    with pytest.raises(XtlError, match=f"option --device {device}: this machine has no CUDA GPU"):
        resolve_device(device)


def test_one_place_decides_cuda_or_cpu():
    """`cuda.is_available` is asked in xtl.device only (and where it is about the GPU itself: bf16
    support, freeing its cache after running out of memory)."""
    asking = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "cuda.is_available" in p.read_text())
    assert asking == ["device.py", "errors.py", "models/registry.py"]


COMMANDS = {
    "evaluate": ["evaluate", "{run}"],
    "explain": ["explain", "{run}", "--images", "2"],
    "faithfulness": ["faithfulness", "{run}", "--images", "2"],
    "compare": ["compare", "{run}", "--out", "{tmp}/cmp"],
    "serve": ["serve", "{run}"],
    "finetune": ["finetune", "--runs-dir", "{tmp}/runs"],
    "run": ["run", "--show-config"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("device", ["nonsense", pytest.param("cuda", marks=NO_GPU)])
def test_every_command_that_runs_a_model_names_a_bad_device(command, device, run, tmp_path):
    args = [a.format(run=run.path, tmp=tmp_path) for a in COMMANDS[command]]
    result = runner.invoke(app, [*args, "--device", device])
    assert isinstance(result.exception, XtlError), (result.exception, result.output)
    assert str(result.exception).startswith(f"option --device"), str(result.exception)
    assert device in str(result.exception)


@NO_GPU
@pytest.mark.parametrize("device", ["cuda", "nonsense"])
def test_a_bad_device_is_one_line_and_exit_2(device, run):
    result = subprocess.run([XTL, "evaluate", str(run.path), "--device", device], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr and "--device" in lines[0], result.stderr


def test_device_cpu_evaluates_and_explains(run):
    result = runner.invoke(app, ["evaluate", str(run.path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(run.file("metrics.json").read_text())["accuracy"] >= 0
    result = runner.invoke(app, ["explain", str(run.path), "--images", "2", "--methods", "saliency", "--no-progress",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert list(run.figures.glob("gallery_correct*.png"))  # named after the methods where it is


def test_finetune_device_is_the_accelerator(tmp_path, tiny_folder):
    result = runner.invoke(app, ["finetune", "--model", "timm:resnet10t", "--random-init", "--input-size", "32",
                                 "--source", str(tiny_folder), "--split", "random", "--train-size", "24", "--val-size", "6",
                                 "--batch-size", "12", "--epochs", "1", "--no-progress", "--runs-dir", str(tmp_path),
                                 "--name", "r", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "accelerator: cpu" in (tmp_path / "r" / "config.yaml").read_text()
    both = runner.invoke(app, ["finetune", "--device", "cpu", "--accelerator", "cpu", "--runs-dir", str(tmp_path)])
    assert "option --device is another name of --accelerator" in str(both.exception)


def test_run_device_setting(tmp_path):
    result = runner.invoke(app, ["run", "--device", "cpu", "--show-config"])
    assert result.exit_code == 0 and "device: cpu" in result.output, result.output
    config = tmp_path / "c.yaml"
    config.write_text("device: tpu\n")
    result = runner.invoke(app, ["run", "-c", str(config), "--show-config"])
    assert str(result.exception) == f"{config}: key 'device' must be auto, cpu, cuda, cuda:N or mps, not 'tpu'"


def test_finetune_accelerator_is_checked(tmp_path):
    result = runner.invoke(app, ["finetune", "--accelerator", "tpu", "--runs-dir", str(tmp_path)])
    assert str(result.exception) == "option --accelerator must be one of auto, cpu, cuda, gpu, mps, not 'tpu'"
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["finetune", "--accelerator", "cuda", "--runs-dir", str(tmp_path)])
        assert str(result.exception).startswith("option --accelerator cuda: this machine has no CUDA GPU")


def test_the_pipeline_steps_run_on_its_device_else_each_models_accelerator(tmp_path, monkeypatch):
    from rich.console import Console

    from xtl.pipeline import Pipeline, load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    options = {"runs_dir": str(tmp_path), "models": ["timm:resnet10t", "timm:vit_tiny_patch16_224"],
               "per_model": {"timm:resnet10t": {"accelerator": "cpu"}}}
    pipeline = Pipeline(load_config(None, options), False, Console())
    assert [pipeline.device(pipeline.run_configs[m]).type for m in options["models"]] == ["cpu", "cuda"]
    pipeline = Pipeline(load_config(None, {**options, "device": "cpu"}), False, Console())
    assert [pipeline.device(pipeline.run_configs[m]).type for m in options["models"]] == ["cpu", "cpu"]
