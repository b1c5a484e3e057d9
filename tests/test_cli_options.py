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
