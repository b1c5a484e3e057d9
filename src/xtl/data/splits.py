"""Seeded train/val/test splits, kept in memory as uint8 tensors or streamed from their files
(`xtl.data.stream`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from xtl.data.sources import Source, images_to_uint8, open_source
from xtl.errors import XtlError
from xtl.io import write_csv

SPLIT_NAMES = ("train", "val", "test")
PAPER_POOL, PAPER_VAL_FRACTION, PAPER_TEST = 5000, 0.1, 2000


@dataclass
class SplitSpec:
    """How to cut a source into train/val/test; everything needed to cut it again."""

    kind: Literal["paper", "random"] = "paper"
    train_size: int | None = None  # random: None = everything left after val
    val_size: int | None = None  # random: None = 10 % of the train pool
    test_size: int | None = None  # None = the whole test partition (paper: 2,000)
    seed: int = 0
    stratified: bool = False
    store_size: int | None = None  # decode size for mixed-size folders

    def __post_init__(self) -> None:
        if self.kind not in ("paper", "random"):
            raise XtlError(f"option --split must be 'paper' or 'random', not '{self.kind}'")
        for name in ("train_size", "val_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise XtlError(f"option --{name.replace('_', '-')} must be >= 0, not {value}")


@dataclass
class SplitPart:
    ids: np.ndarray  # int64 positions in the source partition's canonical order
    labels: torch.Tensor  # int64 [N]
    images: torch.Tensor  # uint8 [N, 3, H, W], or a StreamedImages indexed like one (data_path="stream")
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Split:
    spec: SplitSpec
    source: str
    class_names: list[str]
    parts: dict[str, SplitPart]
    data_path: str = "memory"  # where the images are: "memory" (decoded tensors) or "stream" (decoded per batch)

    def __getitem__(self, name: str) -> SplitPart:
        return self.parts[name]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict[str, list[int]]:
        """Images per class for each split part."""
        return {
            name: torch.bincount(part.labels, minlength=self.n_classes).tolist() for name, part in self.parts.items()
        }

    def save_ids(self, path: str | Path) -> None:
        """Write split, id, label and source key of every image as CSV."""
        rows = [{"split": name, "id": i, "label": label, "class": self.class_names[label], "key": key}
                for name, part in self.parts.items()
                for i, label, key in zip(part.ids.tolist(), part.labels.tolist(), part.keys)]
        write_csv(path, rows, ["split", "id", "label", "class", "key"])


def choose_ids(labels_train: np.ndarray, labels_test: np.ndarray, spec: SplitSpec) -> dict[str, np.ndarray]:
    """Pick the image ids of each split part; depends only on the labels and the spec."""
    rng = np.random.default_rng(spec.seed)
    n_test = len(labels_test)
    n_train_pool = len(labels_train)
    if spec.kind == "paper":
        pool = np.arange(min(PAPER_POOL, n_train_pool))
        pool = pool[rng.permutation(len(pool))]
        n_val = int(round(len(pool) * PAPER_VAL_FRACTION))
        ids = {"train": np.sort(pool[n_val:]), "val": np.sort(pool[:n_val])}
        ids["test"] = np.arange(min(spec.test_size or PAPER_TEST, n_test))
        return ids
    n_val = spec.val_size if spec.val_size is not None else int(round(0.1 * n_train_pool))
    n_train = spec.train_size if spec.train_size is not None else n_train_pool - n_val
    if n_train + n_val > n_train_pool:
        raise XtlError(
            f"options --train-size {n_train} + --val-size {n_val} exceed the {n_train_pool} training images"
        )
    n_test_wanted = spec.test_size if spec.test_size is not None else n_test
    if n_test_wanted > n_test:
        raise XtlError(f"option --test-size {n_test_wanted} exceeds the {n_test} test images")
    if spec.stratified:
        chosen = _stratified_sample(labels_train, n_train + n_val, rng)
    else:
        chosen = rng.permutation(n_train_pool)[: n_train + n_val]
    order = rng.permutation(len(chosen))
    chosen = chosen[order]
    if spec.stratified:
        val = _stratified_sample(labels_train[chosen], n_val, rng)
        val_mask = np.zeros(len(chosen), dtype=bool)
        val_mask[val] = True
        ids = {"train": np.sort(chosen[~val_mask]), "val": np.sort(chosen[val_mask])}
    else:
        ids = {"train": np.sort(chosen[n_val:]), "val": np.sort(chosen[:n_val])}
    test_rng = np.random.default_rng([spec.seed, 1])
    if spec.stratified:
        ids["test"] = _stratified_sample(labels_test, n_test_wanted, test_rng)
    else:
        ids["test"] = np.sort(test_rng.permutation(n_test)[:n_test_wanted])
    return ids


def _stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of `n` items whose class proportions match `labels` (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * n
    quota = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:
        quota[k] += 1
    picks = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picks)) if picks else np.empty(0, dtype=np.int64)


def load_split(source: str | Source, spec: SplitSpec | None = None, data_path: str = "memory",
               num_workers: int = 2) -> Split:
    """Cut `source` by `spec` and decode the chosen images into memory (`data_path="memory"`), or
    keep only their ids and decode them per batch in `num_workers` worker processes ("stream"); "auto":
    memory where the decoded images take under a quarter of the available memory (`xtl.data.stream`).
    The split's `data_path` says which was taken."""
    from xtl.data.stream import StreamedImages, choose_data_path, first_size, stored_side

    if num_workers < 0:
        raise XtlError(f"option --num-workers must be >= 0, not {num_workers}")
    spec = spec or SplitSpec()
    src = source if isinstance(source, Source) else open_source(source)
    train = src.partition("train")
    test = src.partitions.get("test")
    test_labels = test.labels if test is not None else np.empty(0, dtype=np.int64)
    ids = choose_ids(train.labels, test_labels, spec)
    if test is None and len(ids["test"]) == 0:
        raise XtlError(f"data source {src.spec} has no test/ partition")
    if data_path != "memory":
        n_images = sum(len(ids[name]) for name in SPLIT_NAMES)
        data_path = choose_data_path(data_path, n_images, first_size(train, ids["train"], spec.store_size))
    parts = {}
    for name in SPLIT_NAMES:
        partition = test if name == "test" else train
        part_ids = ids[name]
        if data_path == "stream":
            side, size = stored_side(partition, part_ids, spec.store_size)
            images = StreamedImages(partition, part_ids, side, size, num_workers)
        else:
            images = decode_into_memory(partition, part_ids, spec.store_size, f"split part '{name}' of {src.spec}")
        parts[name] = SplitPart(
            ids=part_ids.astype(np.int64),
            labels=torch.as_tensor(partition.labels[part_ids], dtype=torch.int64),
            images=images,
            keys=[partition.keys[i] for i in part_ids],
        )
    return Split(spec=spec, source=src.spec, class_names=src.class_names, parts=parts, data_path=data_path)


def decode_into_memory(partition, ids: np.ndarray, store_size: int | None, what: str, chunk: int = 512) -> torch.Tensor:
    """uint8 [N, 3, H, W] of the images `ids` of `partition`, as `images_to_uint8` stacks them all (the
    same values), decoded `chunk` at a time into one tensor: the peak is the decoded images and one
    chunk, not every image twice. Running out of memory is one line that names the way out."""
    from xtl.data.stream import decoded_bytes, stored_side

    if len(ids) == 0:
        return images_to_uint8([], store_size)
    side, (width, height) = stored_side(partition, ids, store_size)
    try:
        images = torch.empty((len(ids), 3, height, width), dtype=torch.uint8)
        for start in range(0, len(ids), chunk):
            decoded = images_to_uint8(partition.fetch(ids[start : start + chunk].tolist()), side)
            if decoded.shape[1:] != images.shape[1:]:  # a header that misled (e.g. EXIF stored after a PNG's pixels)
                del images, decoded
                return images_to_uint8(partition.fetch(ids.tolist()), store_size)  # all at once, as before
            images[start : start + chunk] = decoded
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "allocate memory" not in str(err):
            raise
        raise XtlError(f"out of memory decoding the {len(ids):,} images of {what} into memory "
                       f"({decoded_bytes(len(ids), (width, height)) / 2**20:,.0f} MiB); use --data-path stream "
                       "(decoded per batch) or auto") from None
    return images
