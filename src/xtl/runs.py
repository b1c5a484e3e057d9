"""One run directory: everything a fine-tuning run made, read back by later commands.

    runs/<name>/
      config.yaml             RunConfig + what was derived (classes, normalisation, versions)
      split.csv               split, id, label, class, source key of every image
      model.safetensors       the best model (lowest validation loss, by `improves`; its epoch in the metadata)
      checkpoints/last.pt     model, optimiser and history after the last finished epoch (resume)
      history_batches.csv     per-batch training loss, accuracy, lr, images/s
      history_epochs.csv      per-epoch training and validation loss and accuracy
      metrics.json            test metrics of the best model
      predictions.csv         per test image: id, label, predicted, probabilities
      figures/*.png
"""

from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
import yaml

import xtl
from xtl.config import RunConfig
from xtl.data import PAPER_MEAN, PAPER_STD, Preprocess, Split, SplitSpec, load_split
from xtl.errors import XtlError
from xtl.io import read_csv, read_yaml, write_yaml
from xtl.models import ModelSpec, build_model, get_spec

FORMAT_VERSION = 1

# The one rule that picks the best epoch: a validation loss counts as better than the best so far
# only when lower by more than this. Training saves model.safetensors (and counts early-stopping
# patience) by it and records the epoch in the file; everything that reports a best epoch reads it.
MIN_IMPROVEMENT = 1e-4


def improves(val_loss: float, best_val_loss: float) -> bool:
    return val_loss < best_val_loss - MIN_IMPROVEMENT


def best_epoch_of(epochs: list[dict]) -> int | None:
    """The epoch training kept, replayed from a history (rows with `epoch` and `val_loss`) by `improves`."""
    best, best_loss = None, float("inf")
    for row in epochs:
        if improves(row["val_loss"], best_loss):
            best, best_loss = int(row["epoch"]), row["val_loss"]
    return best


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def weights_path(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    def file(self, name: str) -> Path:
        return self.path / name

    # config
    def write_config(self, config: RunConfig, split: Split, spec: ModelSpec, precision: str | None = None,
                     accelerator: str | None = None) -> None:
        """`precision`, `accelerator`: what the run's `auto` settings resolved to on this machine (e.g.
        bf16-mixed on cpu), recorded because the same configuration trains differently elsewhere."""
        mean, std = normalisation(config, spec)
        write_yaml(self.config_path, {
            "format_version": FORMAT_VERSION,
            "run": config.to_dict(),
            "derived": {
                "precision": precision or config.precision,
                "accelerator": accelerator or config.accelerator,
                "class_names": split.class_names,
                "n_classes": split.n_classes,
                "input_size": spec.input_size,
                "mean": list(mean),
                "std": list(std),
                "model": spec.describe(),
                "split_sizes": {name: len(part) for name, part in split.parts.items()},
                "data_path": split.data_path,  # what the run's data_path (auto: by the memory) took
            },
            "versions": versions(),
        })

    def read(self) -> dict[str, Any]:
        """config.yaml, checked to hold what the commands read from it (one line naming it if not)."""
        if not self.config_path.exists():
            raise XtlError(f"run directory {self.path} has no config.yaml (not an xtl run)")
        try:
            data = read_yaml(self.config_path)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise self.damaged(self.config_path, _reason(err), CONFIG_TODO) from None
        if not isinstance(data, dict):
            why = "empty" if data is None else f"{_kind(data)}, not a mapping"
            raise self.damaged(self.config_path, why, CONFIG_TODO)
        if "format_version" not in data:
            raise self.damaged(self.config_path, "no format_version", CONFIG_TODO)
        if data["format_version"] != FORMAT_VERSION:
            raise XtlError(f"run directory {self.path} has format version {data['format_version']}; "
                           f"this xtl {xtl.__version__} reads {FORMAT_VERSION}")
        problem = _check_shape(data, CONFIG_SHAPE)
        if problem:
            raise self.damaged(self.config_path, problem, CONFIG_TODO)
        return data

    def damaged(self, path: Path, why: str, todo: str) -> XtlError:
        """The one-line error of a run-folder file that cannot be read back: the file, why, what to do
        (`todo` may name the run as {run})."""
        return XtlError(f"run folder file {path} is damaged ({why}); {todo.format(run=self.path)}")

    def metrics(self) -> dict[str, Any]:
        """metrics.json, as `xtl evaluate` wrote it (checked to hold the numbers the commands show)."""
        path = self.file("metrics.json")
        if not path.is_file():
            raise XtlError(f"run directory {self.path} has no metrics.json; run `xtl evaluate {self.path}`")
        try:
            text = path.read_bytes()
            if not text.strip():
                raise self.damaged(path, "empty", EVALUATE_TODO)
            data = json.loads(text.decode())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise self.damaged(path, _reason(err, "JSON"), EVALUATE_TODO) from None
        problem = _check_shape(data, METRICS_SHAPE)
        if problem:
            raise self.damaged(path, problem, EVALUATE_TODO)
        return data

    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.read()["run"], where=str(self.config_path))

    @property
    def class_names(self) -> list[str]:
        return list(self.read()["derived"]["class_names"])

    # rebuilding what the run used
    def load_split(self) -> Split:
        from xtl.locations import check_run_source

        config = self.config()
        check_run_source(self.path, self.config_path, config.source)  # a run made elsewhere: say so
        return load_split(config.source, split_spec(config), config.data_path, config.num_workers)

    def preprocess(self) -> Preprocess:
        derived = self.read()["derived"]
        return Preprocess(int(derived["input_size"]), tuple(derived["mean"]), tuple(derived["std"]))

    def best_epoch(self) -> int | None:
        """The epoch whose weights model.safetensors holds, as training recorded it in the file's
        metadata; for a file without it (older runs), the history replayed by the same rule."""
        if self.weights_path.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(self.weights_path), "pt") as f:
                    recorded = (f.metadata() or {}).get("epoch")
            except Exception:  # a corrupt file is named by load_model
                recorded = None
            if recorded is not None:
                return int(recorded)
        return best_epoch_of(self.history("epochs"))

    def history(self, kind: str = "epochs") -> list[dict[str, float]]:
        """`history_<kind>.csv` ("epochs" or "batches") as rows of floats; none before training wrote it."""
        path = self.file(f"history_{kind}.csv")
        todo = "delete it (the run's training history is then left out) or fine-tune the run again"
        try:
            rows = read_csv(path, floats=True, missing_ok=True)
        except TypeError:  # csv gives None for a missing value, a list for extra ones
            raise self.damaged(path, "rows of the wrong length", todo) from None
        except (OSError, UnicodeDecodeError, ValueError, csv.Error) as err:
            raise self.damaged(path, _reason(err, "CSV of numbers"), todo) from None
        if path.is_file() and not rows and path.stat().st_size == 0:
            raise self.damaged(path, "empty", todo)
        missing = [c for c in HISTORY_COLUMNS.get(kind, ()) if rows and c not in rows[0]]
        if missing:
            raise self.damaged(path, f"no column {missing[0]}", todo)
        return rows

    def load_model(self, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
        """The best model of the run, in eval mode."""
        from xtl.models import load_run_weights

        config = self.config()
        if not self.weights_path.is_file():
            raise XtlError(f"run directory {self.path} has no model.safetensors (fine-tuning not finished)")
        model, spec = build_model(
            config.model, len(self.class_names), pretrained=False, input_size=config.input_size
        )
        try:
            load_run_weights(model, self.weights_path, config.model)
        except XtlError as err:
            raise XtlError(f"{err}; {WEIGHTS_TODO.format(run=self.path)}") from None
        return model.to(device).eval(), spec


CONFIG_TODO = ("it cannot be rebuilt from the run's other files: restore it from a copy, or fine-tune again "
               "into a new folder (`xtl run`: pass --force)")
EVALUATE_TODO = "run `xtl evaluate {run}` again"
WEIGHTS_TODO = "the run's model cannot be used: restore it from a copy, or fine-tune again (`xtl run`: pass --force)"
# What the commands read from config.yaml and metrics.json: key -> type, or a nested shape.
CONFIG_SHAPE: dict[str, Any] = {
    "run": {"model": str, "source": str},
    "derived": {"class_names": list, "n_classes": int, "input_size": int, "mean": list, "std": list,
                "split_sizes": {"train": int, "val": int, "test": int}},
}
METRICS_SHAPE: dict[str, Any] = {
    "n_images": int, "accuracy": float, "accuracy_ci95": list, "roc_auc_macro_ovr": float,
    "per_class_accuracy": dict, "confusion_matrix": list, "class_names": list, "model": str,
}
HISTORY_COLUMNS = {
    "epochs": ("epoch", "val_loss"),  # what picks the best epoch
    "batches": ("epoch", "images_per_s"),
}


def _check_shape(data: Any, shape: dict[str, Any], where: str = "") -> str | None:
    """What is wrong with `data` against `shape` (a missing key, a value of the wrong type), or None."""
    if not isinstance(data, dict):
        return f"{_kind(data)}{f' at {where}' if where else ''}, not a mapping"
    for key, kind in shape.items():
        name = f"{where}.{key}" if where else key
        if key not in data:
            return f"no key {name}"
        if isinstance(kind, dict):
            problem = _check_shape(data[key], kind, name)
            if problem:
                return problem
            continue
        value = data[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
        if not ok:
            return f"key {name} is {_kind(value)}, not {'a number' if kind is float else _kind(kind())}"
    return None


def _kind(value: Any) -> str:
    """`a list`, `an empty file`: what a value read from a file is, for messages."""
    if value is None:
        return "empty"
    names = {dict: "a mapping", list: "a list", str: "text", bool: "true/false", int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _reason(err: BaseException, expected: str = "YAML") -> str:
    """Why a file could not be read, in a few words."""
    if isinstance(err, UnicodeDecodeError):
        return "binary, not text"
    if isinstance(err, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(err, OSError):
        return f"cannot be read: {err.strerror or err}"
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"not {expected}: {first}"


def check_same_data(runs: list["RunDir"], what: str) -> None:
    """Runs compared image by image must be of one data set: image ids index a source's images, so
    runs of two sources (or of one source read with other classes) would pair different images under
    one id. One line naming the first run that differs, before any work."""
    def identity(run: "RunDir") -> tuple[str, tuple[str, ...]]:
        source = run.config().source
        where = Path(source)
        return (os.path.realpath(where) if where.is_dir() else source), tuple(run.class_names)

    if len(runs) < 2:
        return
    first = identity(runs[0])
    for run in runs[1:]:
        other = identity(run)
        if other != first:
            differs = (f"data {other[0]} vs {first[0]}" if other[0] != first[0]
                       else f"classes {', '.join(other[1])} vs {', '.join(first[1])}")
            raise XtlError(f"{what}: run {run.path} is of other data than {runs[0].path} ({differs}); its image "
                           "ids name other images, so give runs of one data set")


def run_title(run_name: str, model: str) -> str:
    """`folder (model)`, or just the model where the run's folder is named after it."""
    return model if run_name == model else f"{run_name} ({model})"


def split_spec(config: RunConfig) -> SplitSpec:
    return SplitSpec(
        kind=config.split, train_size=config.train_size, val_size=config.val_size,
        test_size=config.test_size, seed=config.seed if config.split_seed is None else config.split_seed,
        stratified=config.stratified,
    )


def normalisation(config: RunConfig, spec: ModelSpec) -> tuple[tuple, tuple]:
    return (PAPER_MEAN, PAPER_STD) if config.normalization == "paper" else (spec.mean, spec.std)


def model_preprocess(config: RunConfig) -> Preprocess:
    spec = get_spec(config.model).with_input_size(config.input_size)
    mean, std = normalisation(config, spec)
    return Preprocess(spec.input_size, tuple(mean), tuple(std))


def versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "xtl": xtl.__version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "timm": str(timm.__version__),
    }
