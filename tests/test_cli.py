"""The `xtl` command line: help everywhere, one-line errors for bad input, the data summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xtl.cli import app

XTL = str(Path(sys.executable).with_name("xtl"))
runner = CliRunner()


@pytest.mark.parametrize("command", ["", "models", "data", "finetune", "evaluate", "explain", "compare", "faithfulness", "run", "serve"])
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def _xtl(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([XTL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_data_folder(tmp_path):
    _one_line_error(_xtl("data", "--source", str(tmp_path / "missing")), str(tmp_path / "missing"))


def test_class_folder_with_no_images(tiny_folder, tmp_path):
    (tiny_folder / "train" / "empty_class").mkdir()
    _one_line_error(_xtl("data", "--source", str(tiny_folder)), "empty_class has no images")


def test_unreadable_image(tiny_folder, tmp_path):
    (tiny_folder / "test" / "dog" / "0001.jpg").write_bytes(b"")
    _one_line_error(_xtl("data", "--source", str(tiny_folder), "--split", "random", "--train-size", "30",
                         "--val-size", "6"), "0001.jpg is empty")


def test_unknown_model(tiny_folder, tmp_path):
    _one_line_error(_xtl("finetune", "--model", "resnet_nope", "--source", str(tiny_folder),
                         "--runs-dir", str(tmp_path)), "unknown model 'resnet_nope'")


def test_weights_that_do_not_fit(tiny_folder, tmp_path):
    from safetensors.torch import save_file
    import torch

    save_file({"conv.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    _one_line_error(
        _xtl("finetune", "--model", "timm:resnet10t", "--weights", str(tmp_path / "other.safetensors"),
             "--source", str(tiny_folder), "--split", "random", "--runs-dir", str(tmp_path / "runs")),
        "other.safetensors does not fit model timm:resnet10t",
    )


def test_bad_option_value_is_named(tiny_folder, tmp_path):
    _one_line_error(_xtl("finetune", "--optimizer", "sgd", "--source", str(tiny_folder), "--runs-dir", str(tmp_path)),
                    "--optimizer")


def test_evaluate_on_a_folder_that_is_not_a_run(tmp_path):
    _one_line_error(_xtl("evaluate", str(tmp_path)), "not an xtl run")


def test_data_prints_counts_and_writes_the_figure(tiny_folder, tmp_path):
    result = _xtl("data", "--source", str(tiny_folder), "--split", "random", "--train-size", "24", "--val-size", "6",
                  "--stratified", "--figure", str(tmp_path / "dist.png"))
    assert result.returncode == 0, result.stderr
    assert "cat" in result.stdout and "ship" in result.stdout and "total" in result.stdout
    assert (tmp_path / "dist.png").stat().st_size > 5000
