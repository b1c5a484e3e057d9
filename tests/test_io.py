"""xtl.io: the one place CSVs are written (atomically) and read; the one matplotlib backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xtl.io import read_csv, write_csv


def test_a_csv_round_trips_in_column_order_with_quoting(tmp_path):
    path = tmp_path / "sub" / "rows.csv"
    rows = [{"name": 'a, "quoted" name', "x": 1, "y": 0.25}, {"name": "b", "x": 2, "y": float("nan")}]
    write_csv(path, rows)
    assert path.read_bytes().count(b"\r") == 0 and path.read_text().splitlines()[0] == "name,x,y"
    back = read_csv(path)
    assert back[0] == {"name": 'a, "quoted" name', "x": "1", "y": "0.25"} and list(back[1]) == ["name", "x", "y"]
    numbers = read_csv(path, floats=True, text={"name"})
    assert numbers[0] == {"name": 'a, "quoted" name', "x": 1.0, "y": 0.25} and np.isnan(numbers[1]["y"])
    write_csv(path, rows, columns=["y", "name", "x"])  # an explicit order
    assert path.read_text().splitlines()[0] == "y,name,x"


def test_no_rows_and_a_missing_file(tmp_path):
    write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text() == "" and read_csv(tmp_path / "empty.csv") == []
    write_csv(tmp_path / "header.csv", [], columns=["a", "b"])
    assert (tmp_path / "header.csv").read_text() == "a,b\n"
    assert read_csv(tmp_path / "absent.csv", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "absent.csv")


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "rows.csv"
    write_csv(path, [{"a": 1}])

    class Broken(dict):
        def get(self, *args):  # csv.DictWriter reads each row's values with get
            raise RuntimeError("broken row")

    with pytest.raises(RuntimeError):
        write_csv(path, [{"a": 2}, Broken(a=3)])
    assert read_csv(path) == [{"a": "1"}] and [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def test_predictions_and_a_runs_history_go_through_the_same_csv(tmp_path):
    from xtl.evaluate import read_predicted, read_predictions, write_predictions
    from xtl.evaluate.metrics import Predictions
    from xtl.runs import RunDir

    run = RunDir(tmp_path)
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    write_predictions(run, Predictions(np.array([5, 9]), torch.tensor([0, 1]), probabilities), ["cat", "dog", "a,b"])
    assert run.file("predictions.csv").read_text().splitlines()[0] == 'id,label,predicted,p_cat,p_dog,"p_a,b"'
    ids, labels, back = read_predictions(run)
    assert ids.tolist() == [5, 9] and labels.tolist() == [0, 1] and torch.allclose(back, probabilities)
    assert read_predicted(run) == ([5, 9], [0, 1], [0, 2])
    assert run.history("epochs") == []  # before training wrote it
    write_csv(run.file("history_epochs.csv"), [{"epoch": 1, "val_loss": 0.5}])
    assert run.history("epochs") == [{"epoch": 1.0, "val_loss": 0.5}]


def _backend_after(code: str) -> str:
    import subprocess
    import sys

    script = code + "\nfrom xtl.io import pyplot\nimport matplotlib\npyplot()\nprint(matplotlib.get_backend().lower())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "MPLBACKEND": "svg"})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_figures_select_agg_once_and_keep_a_backend_chosen_before():
    """Every figure module takes pyplot from `xtl.io.pyplot` (none selects a backend itself): Agg
    unless pyplot was already imported with another backend, e.g. by a notebook."""
    from pathlib import Path

    import xtl

    src = Path(xtl.__file__).parent
    assert [p.relative_to(src).as_posix() for p in src.rglob("*.py") if "matplotlib.use(" in p.read_text()] == ["io.py"]
    assert _backend_after("") == "agg"  # whatever MPLBACKEND says
    assert _backend_after("import matplotlib; matplotlib.use('pdf'); import matplotlib.pyplot") == "pdf"
