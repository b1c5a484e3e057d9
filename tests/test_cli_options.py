"""The command line as people expect it: --version, python -m xtl, help on every option, flags
shown as flags and spelt --no-..., finetune's options pinned to the run settings."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import typer.main
from typer.testing import CliRunner

from helpers import XTL
from xtl.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"xtl {version('xtl')}\n", result.output


def test_python_m_xtl_is_the_command_line():
    result = subprocess.run([sys.executable, "-m", "xtl", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == f"xtl {version('xtl')}\n", result.stderr
    same = subprocess.run([XTL, "--version"], capture_output=True, text=True, timeout=120)
    assert same.stdout == result.stdout
    # and its errors are the same one line, exit 2
    bad = subprocess.run([sys.executable, "-m", "xtl", "evaluate", "/nonexistent-run"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: run directory /nonexistent-run"), bad.stderr


def _commands():
    group = typer.main.get_command(app)
    return {"": group, **group.commands}


def test_every_option_of_every_command_has_help():
    missing = [f"xtl {name} {p.opts[0]}".replace("  ", " ") for name, command in _commands().items()
               for p in command.params if p.param_type_name == "option" and not (p.help or "").strip()]
    assert not missing, missing
    arguments = [f"xtl {name} {p.name}" for name, command in _commands().items()
                 for p in command.params if p.param_type_name == "argument" and not (getattr(p, "help", "") or "").strip()]
    assert not arguments, arguments


def test_negative_flags_are_spelt_no():
    flags = [(name, p.opts, p.secondary_opts) for name, command in _commands().items() for p in command.params
             if p.param_type_name == "option" and p.secondary_opts]
    assert flags  # --augment/--no-augment and kin
    for name, opts, negative in flags:
        if opts == ["--pretrained"]:
            assert negative == ["--random-init"]  # a name of its own, not a negation
            continue
        assert negative == [f"--no-{opt[2:]}" for opt in opts], (name, opts, negative)
    assert not [o for _, opts, neg in flags for o in opts + neg if o.startswith("--not-")]


def test_flags_are_shown_as_flags():
    """typer's rich help gave every flag a value type (`--help <bool>`); flags take none."""
    for name, command in _commands().items():
        result = runner.invoke(app, [*name.split(), "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output, (name, result.output)
    help_text = runner.invoke(app, ["finetune", "--help"], terminal_width=200).output
    assert "--stratified" in help_text and "--no-stratified" in help_text and "<int>" in help_text


# RunConfig fields that no option sets: filled in by the run itself
NOT_OPTIONS = {"extra"}
# finetune options that are no run setting: where the run goes and what the command does
NOT_SETTINGS = {"name", "runs_dir", "resume", "evaluate", "progress", "device"}


def test_every_run_setting_is_a_finetune_option_and_back():
    from xtl.cli import _CONFIG_OPTIONS
    from xtl.config import RunConfig

    command = typer.main.get_command(app).commands["finetune"]
    options = {p.name for p in command.params}
    fields = set(RunConfig.__dataclass_fields__)
    assert fields - NOT_OPTIONS <= options, (fields - NOT_OPTIONS) - options
    assert options - fields == NOT_SETTINGS, options - fields
    # and every one of them reaches the configuration (model, preset and weights are passed by name)
    assert _CONFIG_OPTIONS | {"model", "preset", "weights"} == fields - NOT_OPTIONS


def test_grad_clip_and_eval_batch_size_reach_the_run(tiny_folder, tmp_path):
    from xtl.runs import RunDir

    result = runner.invoke(app, ["finetune", "--model", "timm:resnet10t", "--random-init", "--input-size", "32",
                                 "--source", str(tiny_folder), "--split", "random", "--train-size", "24", "--val-size", "6",
                                 "--batch-size", "12", "--epochs", "1", "--no-progress", "--no-evaluate",
                                 "--runs-dir", str(tmp_path), "--name", "r", "--grad-clip", "0.5", "--eval-batch-size", "5"])
    assert result.exit_code == 0, result.output
    config = RunDir(tmp_path / "r").config()
    assert (config.grad_clip, config.eval_batch_size) == (0.5, 5)
    bad = runner.invoke(app, ["finetune", "--grad-clip", "-1", "--runs-dir", str(tmp_path)])
    assert str(bad.exception) == "option --grad-clip must be >= 0 (0: no clipping), not -1.0"
    bad = runner.invoke(app, ["finetune", "--eval-batch-size", "0", "--runs-dir", str(tmp_path)])
    assert str(bad.exception) == "option --eval-batch-size must be > 0, not 0"
