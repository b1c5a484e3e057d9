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

import platform
from pathlib import Path
from typing import Any

import torch

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
            },
            "versions": versions(),
        })

    def read(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise XtlError(f"run directory {self.path} has no config.yaml (not an xtl run)")
        data = read_yaml(self.config_path)
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            found = data.get("format_version") if isinstance(data, dict) else None
            raise XtlError(
                f"run directory {self.path} has format version {found}; this xtl {xtl.__version__} reads {FORMAT_VERSION}"
            )
        return data

    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.read()["run"], where=str(self.config_path))

    @property
    def class_names(self) -> list[str]:
        return list(self.read()["derived"]["class_names"])

    # rebuilding what the run used
    def load_split(self) -> Split:
        return load_split(self.config().source, split_spec(self.config()))

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
        return read_csv(self.file(f"history_{kind}.csv"), floats=True, missing_ok=True)

    def load_model(self, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelSpec]:
        """The best model of the run, in eval mode."""
        from xtl.models import load_run_weights

        config = self.config()
        if not self.weights_path.is_file():
            raise XtlError(f"run directory {self.path} has no model.safetensors (fine-tuning not finished)")
        model, spec = build_model(
            config.model, len(self.class_names), pretrained=False, input_size=config.input_size
        )
        load_run_weights(model, self.weights_path, config.model)
        return model.to(device).eval(), spec


def run_title(run_name: str, model: str) -> str:
    """`folder (model)`, or just the model where the run's folder is named after it."""
    return model if run_name == model else f"{run_name} ({model})"


def split_spec(config: RunConfig) -> SplitSpec:
    return SplitSpec(
        kind=config.split, train_size=config.train_size, val_size=config.val_size,
        test_size=config.test_size, seed=config.seed, stratified=config.stratified,
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
