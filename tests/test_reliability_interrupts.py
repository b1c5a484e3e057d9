"""Interruptions say truthfully what is kept (docs/reliability.md, issue 15): a signal while an
epoch's checkpoint is written waits for the write; SIGTERM during `xtl evaluate` leaves nothing
half-written or temporary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import tiny_run
from xtl.config import RunConfig
from xtl.data import load_split
from xtl.runs import RunDir, split_spec
from xtl.train import finetune
from xtl.train import loop as train_loop

TINY = dict(model="timm:resnet10t", pretrained=False, input_size=32, split="random", train_size=64, val_size=16,
            test_size=32, stratified=True, batch_size=16, epochs=2, warmup_epochs=0.5, patience=0, lr=1e-3)


def _config(cifar: Path) -> RunConfig:
    return RunConfig(source=str(cifar), **TINY)


@pytest.fixture(scope="module")
def tiny_split(cifar):
    config = _config(cifar)
    return load_split(config.source, split_spec(config))


def _temporary_files(folder: Path) -> list[Path]:
    return list(Path(folder).rglob("*.tmp"))


def _signal_while_checkpointing(monkeypatch, signals: list[int]) -> None:
    """The first checkpoint's write receives `signals` (sent to this process) half-way through."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if signals:
            f.write(b"PK\x03\x04 the first half")
            for signum in signals:
                os.kill(os.getpid(), signum)
            signals.clear()
            f.seek(0)
            f.truncate()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _epochs_trained(monkeypatch) -> list[int]:
    real, epochs = train_loop.train_one_epoch, []

    def counted(fabric, model, optimizer, scheduler, train, config, epoch, *args, **kwargs):
        epochs.append(epoch)
        return real(fabric, model, optimizer, scheduler, train, config, epoch, *args, **kwargs)

    monkeypatch.setattr(train_loop, "train_one_epoch", counted)
    return epochs


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_while_the_checkpoint_is_written_keeps_the_epoch_it_names(signum, cifar, tiny_split, tmp_path,
                                                                             monkeypatch, capsys):
    config, run = _config(cifar), RunDir(tmp_path / "run")
    _signal_while_checkpointing(monkeypatch, [signum])
    with pytest.raises(KeyboardInterrupt):
        finetune(config, tiny_split, run, progress=False)
    assert capsys.readouterr().err.endswith(f"interrupted: 1 finished epoch(s) kept in {run.path}; "
                                            "`xtl finetune --resume` (or the same `xtl run`) continues\n")
    assert run.last_checkpoint.is_file() and run.weights_path.is_file() and not _temporary_files(run.path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()
    epochs = _epochs_trained(monkeypatch)
    state = finetune(config, tiny_split, run, resume=True, progress=False)
    assert epochs == [1] and state.epoch == 2  # --resume continues from the epoch the message named


def test_a_second_interrupt_while_the_checkpoint_is_written_stops_at_once_and_says_so(cifar, tiny_split, tmp_path,
                                                                                     monkeypatch, capsys):
    config, run = _config(cifar), RunDir(tmp_path / "run")
    _signal_while_checkpointing(monkeypatch, [signal.SIGTERM, signal.SIGTERM])
    with pytest.raises(KeyboardInterrupt):
        finetune(config, tiny_split, run, progress=False)
    assert capsys.readouterr().err.endswith(f"interrupted: 0 finished epoch(s) kept in {run.path}; "
                                            "`xtl finetune --resume` (or the same `xtl run`) continues\n")
    assert not run.last_checkpoint.exists() and not _temporary_files(run.path)
    monkeypatch.undo()
    epochs = _epochs_trained(monkeypatch)
    finetune(config, tiny_split, run, resume=True, progress=False)
    assert epochs == [0, 1]


# ----------------------------------------------------------------------------- xtl evaluate

# `xtl evaluate` in a real process whose figure writes are slowed (inside the atomic write, after its
# temporary file exists), so that the test's SIGTERM lands during one
SLOW_FIGURES = """
import sys, time
from contextlib import contextmanager
from pathlib import Path
import xtl.io
real = xtl.io.atomic_path

@contextmanager
def slow(path):
    with real(path) as tmp:
        yield tmp
        if Path(path).suffix == ".png":
            time.sleep(60)

xtl.io.atomic_path = slow
from xtl.cli import main
sys.argv = ["xtl", "evaluate", sys.argv[1], "--device", "cpu"]
main()
"""


def test_sigterm_during_evaluate_leaves_no_temporary_file_and_says_what_was_written(cifar, tmp_path):
    run = tiny_run(tmp_path / "run", cifar, "timm:resnet10t", 32)
    before = run.file("predictions.csv").read_text()
    process = subprocess.Popen([sys.executable, "-c", SLOW_FIGURES, str(run.path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not list(run.path.rglob(".*.png.*.tmp")):  # a figure's temporary file
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # while a figure is being written
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip() == (f"interrupted: metrics.json, predictions.csv written in {run.path} (the other files as "
                              "they were, none half-written); the same command evaluates again")
    assert not _temporary_files(run.path)
    assert run.file("predictions.csv").read_text() == before  # the same weights: the same predictions
