"""`xtl compare` of existing runs: a run without faithfulness scores does not drop the others'."""

from __future__ import annotations

import re
import shutil

from typer.testing import CliRunner

from helpers import tiny_run
from xtl.cli import app
from xtl.faithfulness import faithfulness_run
from xtl.faithfulness.results import read_rows
from xtl.runs import RunDir

runner = CliRunner()


def test_compare_keeps_the_scores_of_the_scored_run(tmp_path, cifar):
    scored = tiny_run(tmp_path / "scored", cifar, "timm:resnet10t", 32, accelerator="cpu")
    shutil.copytree(scored.path, tmp_path / "unscored")
    unscored = RunDir(tmp_path / "unscored")
    faithfulness_run([scored], ["saliency"], n_images=4, steps=2, batch_size=16, explain_batch_size=4, progress=False,
                     baseline="zero")
    assert scored.file("faithfulness.csv").is_file() and not unscored.file("faithfulness.csv").exists()

    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(scored.path), str(unscored.path), "--out", str(out),
                                 "--methods", "saliency", "--gallery-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    html = (out / "report" / "report.html").read_text()
    section = re.search(r'<section id="faithfulness">(.*?)</section>', html, re.S).group(1)
    table = re.search(r"<table>(.*?)</table>", section, re.S).group(1)
    for row in read_rows(scored.file("faithfulness.csv")):  # every scored row, with its number
        assert (f"<td>{row['model']}</td><td class=\"text\">{row['baseline']}</td>"
                f"<td class=\"text\">{row['label']}</td>") in table
    assert "saliency" in table and "unscored" not in table
    assert "Not scored: unscored (run <code>xtl faithfulness</code> on it)." in section


def test_compare_without_any_scores_says_so(tmp_path, cifar):
    run = tiny_run(tmp_path / "a", cifar, "timm:resnet10t", 32, accelerator="cpu")
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(run.path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    section = re.search(r'<section id="faithfulness">(.*?)</section>', (out / "report" / "report.html").read_text(), re.S).group(1)
    assert "<table>" not in section and "Not scored: run <code>xtl faithfulness</code> on these runs." in section
