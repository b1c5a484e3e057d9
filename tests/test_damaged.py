"""Damaged run folders and output locations (issue 15): every file a command reads back from a run
folder, damaged in each way (deleted, empty, binary, of the wrong shape, missing keys), is one line
naming it and what to do (or, where the file is optional, the command does without it); a finished
`xtl run` step whose output was deleted redoes itself; an output path that cannot be one is one line."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from helpers import class_folder, tiny_run
from xtl.runs import RunDir

pytestmark = pytest.mark.xdist_group("damaged")

BINARY = bytes(range(256)) * 8  # not UTF-8, not YAML, not JSON, not CSV, not safetensors


@pytest.fixture(scope="module")
def data(tmp_path_factory, cifar) -> Path:
    """A 3-class folder of real CIFAR-10 images: 20 train and 8 test per class."""
    return class_folder(tmp_path_factory.mktemp("data"), cifar)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> RunDir:
    """A real tiny fine-tuned and evaluated CNN run (random init, one epoch, 24 test images)."""
    return tiny_run(tmp_path_factory.mktemp("runs") / "cnn", data, "timm:resnet10t", 32)


def xtl(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`xtl ARGS` in this process, as the console script runs it: (exit status, stdout, stderr).
    An exception other than the CLI's own exit (a traceback) fails the test."""
    from xtl.cli import main

    monkeypatch.setattr(sys, "argv", ["xtl", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, *fragments: str) -> str:
    """Exit status 2 and one line `error: ...` on stderr holding every fragment."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def last_line(code: int, err: str, *fragments: str) -> str:
    """`one_line` for a command that printed progress before: its last line is the only error."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("error: ")]) == 1 and "Traceback" not in err, err
    return one_line(code, lines[-1], *fragments)


# ============================================================================= damaged run-folder files

# The ways a file is damaged. `shape`: of the wrong shape for what it holds; `keys`: the right
# shape with what the commands read missing or mistyped.
def _damage(path: Path, damage: str) -> None:
    if damage == "deleted":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "binary":
        path.write_bytes(BINARY)
    elif damage == "folder":
        path.unlink()
        path.mkdir()
    elif path.suffix == ".yaml":
        data = yaml.safe_load(path.read_text())
        if damage == "shape":
            path.write_text(yaml.safe_dump([data["run"], data["derived"]]))
        else:
            del data["derived"]["class_names"]
            path.write_text(yaml.safe_dump(data))
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        path.write_text(json.dumps(list(data.items())) if damage == "shape" else json.dumps({**data, "accuracy": "high"}))
    elif path.suffix == ".csv":
        lines = path.read_text().splitlines()
        if damage == "shape":  # rows cut short, as a copy stopped midway leaves them
            path.write_text("\n".join([lines[0]] + [line[: len(line) // 2] for line in lines[1:]]) + "\n")
        else:  # another table's header
            path.write_text("name,value\n" + "\n".join(f"x{k},{k}" for k in range(3)) + "\n")
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file
        import torch

        if damage == "shape":
            path.write_bytes(path.read_bytes()[:200])  # cut short
        else:
            save_file({"weight": torch.zeros(3)}, str(path))
    else:
        raise AssertionError((path, damage))


# What each command reads back: (file, [damages]) -> the commands and what each says. "ok": the file is
# optional for that command (it does without); otherwise fragments of the one line.
DAMAGED = "is damaged"
CASES = [
    # config.yaml: every command reads it first
    *[("config.yaml", damage, command, (DAMAGED, "fine-tune again"))
      for damage in ("empty", "binary", "shape", "keys", "folder")
      for command in ("evaluate", "explain", "compare", "faithfulness", "serve")],
    *[("config.yaml", "deleted", command, ("has no config.yaml",)) for command in ("evaluate", "compare", "serve")],
    # metrics.json: compare's table, the app's page (evaluate writes it anew: its damage does not matter there)
    *[("metrics.json", damage, command, (DAMAGED, "run `xtl evaluate"))
      for damage in ("empty", "binary", "shape", "keys") for command in ("compare", "serve")],
    ("metrics.json", "deleted", "compare", ("has no metrics.json", "run `xtl evaluate")),
    ("metrics.json", "deleted", "serve", "ok"),
    ("metrics.json", "binary", "evaluate", "ok"),
    # predictions.csv: the test split's probabilities of explain, faithfulness and the app; compare's McNemar
    *[("predictions.csv", damage, command, (DAMAGED, "run `xtl evaluate"))
      for damage in ("empty", "binary", "shape", "keys") for command in ("explain", "faithfulness", "serve")],
    ("predictions.csv", "deleted", "explain", "ok"),  # predicted anew
    # model.safetensors: every command that runs the model
    *[("model.safetensors", damage, command, ("model.safetensors", "fine-tune again"))
      for damage in ("empty", "binary", "shape", "keys") for command in ("evaluate", "explain", "faithfulness", "serve")],
    *[("model.safetensors", "deleted", command, ("has no model.safetensors",)) for command in ("evaluate", "serve")],
    # the training history: evaluate's figures and table, compare's table
    *[(name, damage, command, (DAMAGED, "fine-tune the run again"))
      for name in ("history_epochs.csv", "history_batches.csv") for damage in ("empty", "binary", "shape", "keys")
      for command in (("evaluate", "compare") if name == "history_epochs.csv" else ("evaluate",))],
    ("history_epochs.csv", "deleted", "compare", "ok"),
]


def _command(command: str, run: Path, tmp_path: Path, monkeypatch) -> list:
    if command == "serve":  # the app is built (every model loaded, the page made); nothing is served
        import socket

        import uvicorn

        monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
        monkeypatch.setattr(uvicorn.Server, "run", lambda *args, **kwargs: None)
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        return ["serve", run, "--port", port]
    return {
        "evaluate": ["evaluate", run],
        "explain": ["explain", run, "--methods", "saliency", "--images", 4, "--batch-size", 4, "--no-progress"],
        "compare": ["compare", run, "--out", tmp_path / "compare"],
        "faithfulness": ["faithfulness", run, "--methods", "saliency", "--images", 2, "--steps", 2,
                         "--explain-batch-size", 2, "--baseline", "zero", "--no-progress"],
    }[command]


@pytest.mark.parametrize("name, damage, command, expected", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_a_damaged_run_folder_file_is_one_line_naming_it(name, damage, command, expected, run, tmp_path,
                                                         monkeypatch, capsys):
    copy = Path(shutil.copytree(run.path, tmp_path / "cnn"))
    _damage(copy / name, damage)
    code, out, err = xtl(monkeypatch, capsys, *_command(command, copy, tmp_path, monkeypatch))
    if expected == "ok":
        assert code == 0, err
        return
    line = one_line(code, err, *expected)
    assert str(copy / name) in line or f"run directory {copy}" in line, line
    assert not list(copy.rglob("*.tmp"))


# ============================================================================= `xtl run`: damaged or deleted outputs

PIPELINE = {
    "name": "p", "runs_dir": "runs", "models": ["timm:resnet10t"],
    "train": {"pretrained": False, "input_size": 32, "split": "random", "train_size": 40, "val_size": 10,
              "test_size": 24, "stratified": True, "batch_size": 20, "epochs": 1},
    "explain_methods": ["saliency"], "explain_images": 4, "explain_batch_size": 4, "gallery_size": 2,
    "faithfulness_images": 2, "faithfulness_steps": 2, "faithfulness_batch_size": 8,
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data) -> Path:
    """A finished one-model `xtl run` in `<folder>/runs/p`, run from `<folder>` (runs_dir is relative,
    so a copy of the folder is the same configuration)."""
    from xtl.pipeline import load_config, run_pipeline

    base = tmp_path_factory.mktemp("pipeline")
    config_file = base / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump({**PIPELINE, "source": str(data)}))
    cwd = Path.cwd()
    try:
        import os

        os.chdir(base)
        run_pipeline(load_config(config_file), progress=False)
    finally:
        os.chdir(cwd)
    return base


def _copy_pipeline(pipeline: Path, tmp_path: Path, monkeypatch) -> Path:
    shutil.copytree(pipeline, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs" / "p"


def test_a_finished_pipeline_reruns_nothing(pipeline, tmp_path, monkeypatch, capsys):
    _copy_pipeline(pipeline, tmp_path, monkeypatch)
    code, _, err = xtl(monkeypatch, capsys, "run", "--config", "pipeline.yaml", "--no-progress")
    assert code == 0 and "nothing to do" in err, err


# a deleted output -> the step that wrote it, and the steps redone after it
DELETED = [
    ("timm_resnet10t/model.safetensors", "timm:resnet10t: fine-tune", {"finetune:timm:resnet10t", "evaluate:timm:resnet10t",
                                                                       "explain:timm:resnet10t", "faithfulness", "analysis",
                                                                       "grid_pointing", "report"}),
    ("timm_resnet10t/metrics.json", "timm:resnet10t: evaluate", {"evaluate:timm:resnet10t", "explain:timm:resnet10t",
                                                                 "faithfulness", "analysis", "grid_pointing", "report"}),
    ("timm_resnet10t/figures/gallery_misclassified_saliency.png", "timm:resnet10t: explain",
     {"explain:timm:resnet10t", "analysis", "report"}),
    ("timm_resnet10t/explanations/test", "timm:resnet10t: explain", {"explain:timm:resnet10t", "analysis", "report"}),
    ("timm_resnet10t/faithfulness.csv", "faithfulness", {"faithfulness", "report"}),
    ("faithfulness_combined.csv", "faithfulness", {"faithfulness", "report"}),
    ("data.json", "data: split and class distribution", {"data", "report"}),
    ("figures/class_distribution.png", "data: split and class distribution", {"data", "report"}),
    ("grid_pointing/grid_pointing.json", "grid pointing game: mosaics of four classes, each explained",
     {"grid_pointing", "report"}),
    ("report/report.html", "report", {"report"}),
]


@pytest.mark.parametrize("deleted, step, redone", DELETED, ids=[d[0] for d in DELETED])
def test_a_finished_step_whose_output_was_deleted_is_done_again(deleted, step, redone, pipeline, tmp_path,
                                                                 monkeypatch, capsys):
    folder = _copy_pipeline(pipeline, tmp_path, monkeypatch)
    before = json.loads((folder / "steps.json").read_text())
    target = folder / deleted
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    code, _, err = xtl(monkeypatch, capsys, "run", "--config", "pipeline.yaml", "--no-progress")
    assert code == 0, err
    assert "nothing to do" not in err
    assert re.search(rf"(^|\n){re.escape(step)}( \([^\n]*\))?: {re.escape(deleted)} is missing; doing it again\n", err), err
    assert target.exists()
    after = json.loads((folder / "steps.json").read_text())
    assert {k for k in after if after[k]["finished"] != before[k]["finished"] or after[k] != before[k]} == redone
    assert json.loads((folder / "timm_resnet10t" / "metrics.json").read_text())["n_images"] == 24
    code, _, err = xtl(monkeypatch, capsys, "run", "--config", "pipeline.yaml", "--no-progress")
    assert code == 0 and "nothing to do" in err, err


@pytest.mark.parametrize("damage", ["empty", "binary", "list", "entry"])
def test_a_damaged_step_log_is_one_line(damage, pipeline, tmp_path, monkeypatch, capsys):
    folder = _copy_pipeline(pipeline, tmp_path, monkeypatch)
    log = Path("runs/p/steps.json")
    log.write_bytes({"empty": b"", "binary": BINARY, "list": b"[1, 2]", "entry": b'{"data": [1]}'}[damage])
    code, _, err = xtl(monkeypatch, capsys, "run", "--config", "pipeline.yaml", "--no-progress")
    why = {"empty": "empty", "binary": "binary, not text", "list": "not a mapping of steps", "entry": "not a mapping of steps"}
    one_line(code, err, f"step log {log} is damaged ({why[damage]}); delete it", "--force")


@pytest.mark.parametrize("damage", ["empty", "binary", "list", "folder_mapping"])
def test_a_damaged_pipeline_yaml_is_written_anew(damage, pipeline, tmp_path, monkeypatch, capsys):
    """pipeline.yaml only tells which settings changed since the last run (steps.json says what is
    done): a damaged one is named, written anew, and no finished step is redone."""
    folder = _copy_pipeline(pipeline, tmp_path, monkeypatch)
    saved = Path("runs/p/pipeline.yaml")
    saved.write_bytes({"empty": b"", "binary": BINARY, "list": b"- 1\n- 2\n", "folder_mapping": b"a: [\n"}[damage])
    code, _, err = xtl(monkeypatch, capsys, "run", "--config", "pipeline.yaml", "--no-progress")
    assert code == 0, err
    assert f"{saved} is damaged; it is written anew" in " ".join(err.split()), err
    assert "nothing to do" in err
    assert yaml.safe_load(saved.read_text())["name"] == "p"


def test_a_damaged_data_json_is_one_line(pipeline, tmp_path, monkeypatch, capsys):
    folder = _copy_pipeline(pipeline, tmp_path, monkeypatch)
    (folder / "data.json").write_bytes(BINARY)
    (folder / "report" / "report.html").unlink()  # the report reads data.json again
    code, _, err = xtl(monkeypatch, capsys, "run", "--config", "pipeline.yaml", "--no-progress")
    last_line(code, err, "run folder file runs/p/data.json is damaged (not a JSON mapping); delete it")


# ============================================================================= output locations

def _image(data: Path) -> Path:
    return sorted((data / "test" / "cat").iterdir())[0]


OUTPUTS = {
    # name: (arguments, given the run, data folder and a file; the one line's fragments)
    "finetune_runs_dir_is_a_file": (lambda run, data, f: ["finetune", "--model", "timm:resnet10t", "--source", data,
                                                          "--runs-dir", f, "--random-init", "--epochs", 1],
                                    lambda f: [f"option --runs-dir: {f} is a file, not a folder"]),
    "finetune_runs_dir_inside_a_file": (lambda run, data, f: ["finetune", "--model", "timm:resnet10t", "--source", data,
                                                              "--runs-dir", f / "runs", "--random-init"],
                                        lambda f: [f"option --runs-dir: {f / 'runs'} is a file (inside {f}, a file)"]),
    "run_runs_dir_is_a_file": (lambda run, data, f: ["run", "--runs-dir", f, "--models", "timm:resnet10t", "--source", data],
                               lambda f: [f"option --runs-dir: {f} is a file, not a folder"]),
    "data_figure_is_a_folder": (lambda run, data, f: ["data", "--source", data, "--split", "random", "--train-size", 30,
                                                      "--val-size", 6, "--figure", f.parent],
                                lambda f: [f"cannot write {f.parent}: it is a folder; give a file name"]),
    "data_figure_txt": (lambda run, data, f: ["data", "--source", data, "--figure", f.parent / "counts.txt"],
                        lambda f: [f"cannot write {f.parent / 'counts.txt'}: a figure is saved as", ".png", "not .txt"]),
    "data_figure_inside_a_file": (lambda run, data, f: ["data", "--source", data, "--figure", f / "counts.png"],
                                  lambda f: [f"cannot write {f / 'counts.png'}: its folder {f} is a file"]),
    "compare_out_is_a_file": (lambda run, data, f: ["compare", run, "--out", f],
                              lambda f: [f"option --out: {f} is a file, not a folder"]),
    "explain_out_is_a_file": (lambda run, data, f: ["explain", _image(data), "--model", run, "--method", "saliency",
                                                    "--out", f], lambda f: [f"option --out: {f} is a file, not a folder"]),
    "faithfulness_out_is_a_file": (lambda run, data, f: ["faithfulness", run, "--out", f, "--images", 2],
                                   lambda f: [f"option --out: {f} is a file, not a folder"]),
}


@pytest.mark.parametrize("case", list(OUTPUTS))
def test_an_output_location_that_cannot_be_one_is_one_line(case, run, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    copy = Path(shutil.copytree(run.path, tmp_path / "cnn"))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    arguments, fragments = OUTPUTS[case]
    code, _, err = xtl(monkeypatch, capsys, *arguments(copy, data, a_file))
    one_line(code, err, *fragments(a_file))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing left behind
    assert a_file.read_text() == "not a folder\n"


def test_a_read_only_output_folder_is_one_line(data, tmp_path, monkeypatch, capsys):
    """As root (tests may run so) chmod does not stop writes: the refusal is simulated where the
    file system gives it, creating the temporary file; as another user a real read-only folder."""
    import errno
    import os
    import tempfile

    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() == 0:
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        out.chmod(0o555)
    try:
        code, _, err = xtl(monkeypatch, capsys, "data", "--source", data, "--figure", out / "counts.png")
    finally:
        out.chmod(0o755)
    last_line(code, err, f"cannot write {out / 'counts.png'}: permission denied (nothing was written)")
    assert list(out.iterdir()) == []


def test_an_epoch_history_with_only_the_required_columns_still_prints(tmp_path, capsys):
    """A history needs only epoch and val_loss to be read back; the epoch table shows '-' for the rest."""
    from xtl.cli import _print_epochs
    from xtl.runs import RunDir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history_epochs.csv").write_text("epoch,val_loss\n1,0.75\n2,0.5\n")
    _print_epochs(RunDir(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "0.7500" in out and "0.5000" in out and "-" in out
