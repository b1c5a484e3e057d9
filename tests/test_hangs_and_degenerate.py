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

from helpers import XTL
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


def _one_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


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
