"""Fine-tuning on real CIFAR-10 images: accuracy, resume, DDP, early stopping, NaN guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xtl.config import RunConfig, preset
from xtl.data import load_split
from xtl.errors import XtlError
from xtl.evaluate import evaluate
from xtl.runs import RunDir, split_spec
from xtl.train import finetune
from xtl.train import loop as train_loop

TINY = dict(
    model="timm:resnet10t", pretrained=False, input_size=32, split="random", train_size=64, val_size=16,
    test_size=32, stratified=True, batch_size=16, epochs=2, warmup_epochs=0.5, patience=0, lr=1e-3,
)


def _tiny_config(cifar: Path, **changes) -> RunConfig:
    return RunConfig(source=str(cifar), **{**TINY, **changes})


@pytest.mark.slow
def test_efficientnet_lite0_fine_tunes_far_above_chance_on_the_cpu(cifar, tmp_path):
    """Real ImageNet weights, 1,000 real CIFAR-10 images, 3 epochs at 128 px: >= 60 % test accuracy."""
    config = preset("quick", "efficientnet_lite0", source=str(cifar), train_size=1000, val_size=100,
                    test_size=300, epochs=3)
    run = RunDir(tmp_path / "run")
    data = load_split(config.source, split_spec(config))
    state = finetune(config, data, run, progress=False)
    metrics = evaluate(run, data, device="cpu")
    assert state.epoch == 3 and metrics["n_images"] == 300
    assert metrics["accuracy"] >= 0.60, metrics["accuracy"]
    low, high = metrics["accuracy_ci95"]
    assert low < metrics["accuracy"] < high
    assert metrics["roc_auc_macro_ovr"] > 0.9


def test_run_directory_holds_everything_and_reloads_the_best_model(cifar, tmp_path):
    config = _tiny_config(cifar, epochs=3)
    run = RunDir(tmp_path / "run")
    data = load_split(config.source, split_spec(config))
    state = finetune(config, data, run, progress=False)
    for name in ("config.yaml", "split.csv", "model.safetensors", "history_batches.csv", "history_epochs.csv"):
        assert run.file(name).is_file(), name
    assert len(run.file("history_batches.csv").read_text().splitlines()) == 1 + 3 * 4
    assert run.config() == config
    # the saved weights are those of the epoch with the lowest validation loss
    losses = [e["val_loss"] for e in state.epochs]
    assert state.best_epoch == 1 + losses.index(min(losses))
    model, _ = run.load_model()
    saved = load_file(str(run.weights_path))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    metrics = evaluate(run, data, device="cpu")
    assert json.loads(run.file("metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert len(run.file("predictions.csv").read_text().splitlines()) == 1 + 32
    for figure in ("training_curves", "confusion_matrix", "per_class_accuracy"):
        assert (run.figures / f"{figure}.png").stat().st_size > 5000


def test_resume_after_an_interruption_gives_the_uninterrupted_result(cifar, tmp_path, monkeypatch):
    config = _tiny_config(cifar, augment=True)
    data = load_split(config.source, split_spec(config))
    whole = RunDir(tmp_path / "whole")
    finetune(config, data, whole, progress=False)

    interrupted = RunDir(tmp_path / "interrupted")
    real_validate = train_loop.validate
    calls = []

    def validate_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second epoch
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train_loop, "validate", validate_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(config, data, interrupted, progress=False)
    monkeypatch.setattr(train_loop, "validate", real_validate)
    state = finetune(config, data, interrupted, resume=True, progress=False)
    assert state.epoch == 2
    whole_ckpt = torch.load(whole.last_checkpoint, weights_only=False)
    resumed_ckpt = torch.load(interrupted.last_checkpoint, weights_only=False)
    for key, value in whole_ckpt["model"].items():
        assert torch.allclose(value.float(), resumed_ckpt["model"][key].float(), atol=1e-6), key
    for x, y in zip(whole_ckpt["state"]["epochs"], resumed_ckpt["state"]["epochs"], strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=1e-5)
        assert x["val_accuracy"] == y["val_accuracy"]


def test_compiled_fine_tune_saves_plain_weights_and_learns_like_eager(cifar, tmp_path, monkeypatch):
    """`compile: true` trains through torch.compile (dynamo's eager backend here: inductor's C++ build
    takes minutes on 2 cores) and still writes the plain model's keys, so the run reloads as usual."""
    real_compile = torch.compile
    compiled = []

    def compile_eagerly(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    config = _tiny_config(cifar, epochs=1, augment=False)
    data = load_split(config.source, split_spec(config))
    eager = RunDir(tmp_path / "eager")
    eager_state = finetune(config, data, eager, progress=False)
    assert compiled == []
    run = RunDir(tmp_path / "compiled")
    state = finetune(RunConfig.from_dict({**config.to_dict(), "compile": True}), data, run, progress=False)
    assert compiled  # Fabric unwraps the compiled model for its wrapper and compiles again around it
    saved = load_file(str(run.weights_path))
    assert set(saved) == set(load_file(str(eager.weights_path)))
    assert not any("_orig_mod" in key for key in saved)
    model, _ = run.load_model()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert state.epochs[0]["val_loss"] == pytest.approx(eager_state.epochs[0]["val_loss"], abs=1e-3)


def test_early_stopping_stops_when_val_loss_stalls_and_keeps_the_best(cifar, tmp_path, monkeypatch):
    val_losses = iter([1.0, 0.8, 0.9, 0.85, 0.7, 0.6])
    monkeypatch.setattr(train_loop, "validate", lambda *a, **k: (next(val_losses), 0.5))
    config = _tiny_config(cifar, epochs=6, patience=2)
    state = finetune(config, load_split(config.source, split_spec(config)), RunDir(tmp_path / "run"), progress=False)
    assert state.stopped_early and state.epoch == 4
    assert state.best_epoch == 2 and state.best_val_loss == 0.8


def test_the_reported_best_epoch_is_the_one_whose_weights_were_saved(cifar, tmp_path, monkeypatch):
    """Epoch 2's validation loss is lower by less than the 1e-4 that counts as an improvement: the
    weights stay epoch 1's, and metrics.json, the report's table and its note say epoch 1 too."""
    from xtl.report.findings import ModelResult, last_epoch_note

    val_losses = iter([1.0, 1.0 - 5e-5])
    monkeypatch.setattr(train_loop, "validate", lambda *a, **k: (next(val_losses), 0.5))
    saved = []
    real_save = train_loop.save_weights
    monkeypatch.setattr(train_loop, "save_weights", lambda model, path, **kw: (saved.append(1), real_save(model, path, **kw)))
    config = _tiny_config(cifar, epochs=2)
    data = load_split(config.source, split_spec(config))
    run = RunDir(tmp_path / "run")
    state = finetune(config, data, run, progress=False)
    assert len(saved) == 1 and state.best_epoch == 1  # the checkpoint rule: only epoch 1 was saved
    metrics = evaluate(run, data, device="cpu")
    assert metrics["best_epoch"] == 1 and json.loads(run.file("metrics.json").read_text())["best_epoch"] == 1
    result = ModelResult.read(run)
    assert result.best_epoch["epoch"] == 1 and result.row()["epochs (best)"] == "2 (1)"
    assert last_epoch_note("cnn", result.epochs, None) is None  # the history replays the same rule


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(cifar, tmp_path, monkeypatch):
    """A real divergence in epoch 2 (the learning rate jumps to 1e30 after epoch 1): epoch 1's
    checkpoint and weights are kept, finite, and the kept model evaluates."""
    monkeypatch.setattr(train_loop, "make_scheduler", lambda optimizer, config, steps_per_epoch: (
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < steps_per_epoch else 1e33)))
    config = _tiny_config(cifar, epochs=2, lr=1e-3, warmup_epochs=0.0, optimizer="adam", grad_clip=None, schedule="constant")
    data, run = load_split(config.source, split_spec(config)), RunDir(tmp_path / "run")
    with pytest.raises(XtlError, match=r"^training loss became (nan|inf) at epoch 2, batch \d; the last good checkpoint "
                                       r"is kept in "):
        finetune(config, data, run, progress=False)
    checkpoint = torch.load(run.last_checkpoint, weights_only=True)
    assert checkpoint["state"]["epoch"] == 1 and len(checkpoint["state"]["epochs"]) == 1
    assert all(torch.isfinite(v.float()).all() for v in checkpoint["model"].values())
    saved = load_file(str(run.weights_path))  # epoch 1's weights: the best so far, and the checkpoint's
    assert all(torch.equal(saved[k], checkpoint["model"][k]) for k in saved)
    assert evaluate(run, data, device="cpu")["best_epoch"] == 1  # and the kept model evaluates


def test_nan_loss_in_the_first_epoch_says_that_nothing_is_kept(cifar, tmp_path):
    config = _tiny_config(cifar, epochs=2, lr=1e30, warmup_epochs=0.0, optimizer="adam", grad_clip=None, schedule="constant")
    run = RunDir(tmp_path / "run")
    with pytest.raises(XtlError, match=r"^training loss became (nan|inf) at epoch 1, batch \d; no epoch had finished, "
                                       r"so no checkpoint is kept; try a lower --lr$"):
        finetune(config, load_split(config.source, split_spec(config)), run, progress=False)
    assert not run.last_checkpoint.exists() and not run.weights_path.exists()


def test_two_process_ddp_fine_tune_on_the_cpu(cifar, tmp_path):
    """`--devices 2` runs DDP over gloo with the same code; each process sees half the batches."""
    xtl = Path(sys.executable).with_name("xtl")
    cmd = [str(xtl), "finetune", "--model", "timm:resnet10t", "--random-init", "--input-size", "32",
           "--source", str(cifar), "--split", "random", "--train-size", "64", "--val-size", "16", "--test-size", "32",
           "--batch-size", "16", "--epochs", "2", "--patience", "0", "--accelerator", "cpu", "--devices", "2",
           "--runs-dir", str(tmp_path), "--name", "ddp", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = RunDir(tmp_path / "ddp")
    batches = run.file("history_batches.csv").read_text().splitlines()
    assert len(batches) == 1 + 2 * 2  # 64 images / (16 per device x 2 devices) = 2 steps per epoch
    assert json.loads(run.file("metrics.json").read_text())["n_images"] == 32
