"""A run loaded for inference: its best model on a device, the preprocessing it was trained with,
one split of its data and the model's class probabilities on it.

    loaded = LoadedRun(RunDir("runs/resnet34"), split="test")
    x = loaded.inputs([0, 1, 2])              # preprocessed images of split positions, on the device
    loaded.model(x), loaded.probabilities     # [N, classes]: the evaluation's own, or predicted once

`xtl explain` (`xtl.explain.runner.RunExplainer` adds explaining to it), `xtl faithfulness` and the
app all start from this. It sits on the run folder (`xtl.runs`) and the evaluation
(`xtl.evaluate`, whose predictions it reuses), below explain and everything above it.
"""

from __future__ import annotations

from functools import cached_property
from typing import Sequence

import torch

from xtl.device import resolve_device
from xtl.evaluate import read_predictions
from xtl.evaluate.metrics import predict
from xtl.runs import RunDir


class LoadedRun:
    """A run's best model (eval mode, on `device`), preprocessing, class names and one split."""

    def __init__(self, run: RunDir, split: str = "test", device: str | None = None) -> None:
        self.run = run
        self.device = resolve_device(device, run.config().accelerator)
        self.model, self.spec = run.load_model(self.device)
        self.preprocess = run.preprocess()
        self.class_names = run.class_names
        self.split_name = split
        self.part = run.load_split()[split]
        # read now, so that a damaged predictions.csv is named before any work
        self._saved = self._saved_probabilities() if split == "test" else None

    @cached_property
    def probabilities(self) -> torch.Tensor:
        """[N, classes] of the split: the evaluation's own test probabilities (`predictions.csv`) where
        they are of these images, else predicted now (once)."""
        if self._saved is not None:
            return self._saved
        return predict(self.model, self.part, self.preprocess, self.device).probabilities

    def inputs(self, positions: Sequence[int] | slice) -> torch.Tensor:
        """The images at these positions of the split, preprocessed for the model, on its device."""
        return self.preprocess(self.part.images[positions].to(self.device))

    def lazy_inputs(self, n: int) -> "SplitInputs":
        """The first `n` images of the split as `inputs(slice(0, n))` gives them, a batch at a time."""
        return SplitInputs(self, n)

    def _saved_probabilities(self) -> torch.Tensor | None:
        if not self.run.file("predictions.csv").is_file():
            return None
        ids, _, probabilities = read_predictions(self.run)
        return probabilities if ids.tolist() == self.part.ids.tolist() else None


class SplitInputs:
    """The first `n` images of a loaded run's split, preprocessed for its model on its device, made a
    batch at a time: indexed by a slice (or iterated by `batches`) like the tensor
    `LoadedRun.inputs(slice(0, n))`, the same values, without holding all of them. A streamed split's
    batches (`xtl.data.stream`) are decoded ahead in its worker processes; memory stays that of a batch
    whatever `n` is (`xtl faithfulness` on a data set larger than memory)."""

    dtype = torch.float32

    def __init__(self, loaded: LoadedRun, n: int) -> None:
        self.loaded, self.n = loaded, n
        first = loaded.inputs(slice(0, 1))
        self.shape = torch.Size((n, *first.shape[1:]))
        self.device = first.device

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice):
            raise TypeError("SplitInputs is indexed by a slice of rows")
        return self.loaded.inputs(slice(*rows.indices(self.n)))

    def batches(self, parts: Sequence[slice]):
        """The preprocessed images of each slice of rows, in order (decoded ahead where streamed)."""
        from xtl.data.stream import image_batches

        ranges = [range(*part.indices(self.n)) for part in parts]
        for images in image_batches(self.loaded.part.images, ranges):
            yield self.loaded.preprocess(images.to(self.device))

    def chunks(self, size: int = 256):
        """All rows in order, `size` at a time (e.g. to hash them)."""
        yield from self.batches([slice(s, min(s + size, self.n)) for s in range(0, self.n, size)])
