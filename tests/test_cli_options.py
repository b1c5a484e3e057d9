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
