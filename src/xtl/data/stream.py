"""Streamed split parts: images decoded when a batch is asked for, in DataLoader worker processes.

`load_split(..., data_path="stream")` gives split parts whose `images` is a `StreamedImages`
instead of a uint8 tensor: it is indexed the same way (an int, a slice, a list or tensor of
positions) and gives the same uint8 values, bit for bit, as the tensor the in-memory path holds
(the same decode, the same `images_to_uint8` resize), but it holds only the partition's file ids,
so its memory does not grow with the data set. Normalisation and augmentation stay on the device
(`xtl.data.transforms.Preprocess`), as on the in-memory path.

`data_path="auto"` keeps a split in memory when its decoded size (images x side² x 3 bytes) is
below `MEMORY_FRACTION` of the memory available (`/proc/meminfo`), and streams it otherwise.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from xtl.data.sources import Partition, images_to_uint8
from xtl.errors import XtlError

DATA_PATHS = ("auto", "memory", "stream")
MEMORY_FRACTION = 0.25  # auto: in memory below this share of the available memory
MIXED_SIZE_SIDE = 256  # images_to_uint8's side for folders of mixed sizes


class StreamedImages:
    """The images of one split part, decoded on demand; indexed like a uint8 tensor [N, 3, H, W].

    `side`: the square side every image is fitted to (`images_to_uint8`), or None where all images
    of the part have one size (they then stay as they are, as CIFAR's 32x32 do in memory).
    `num_workers`: DataLoader worker processes that decode the batches of `batches()`.
    """

    dtype = torch.uint8

    def __init__(self, partition: Partition, ids: np.ndarray, side: int | None, size: tuple[int, int],
                 num_workers: int = 2) -> None:
        self.partition, self.ids, self.side, self.num_workers = partition, np.asarray(ids, dtype=np.int64), side, num_workers
        width, height = (side, side) if side is not None else size
        self.shape = torch.Size((len(self.ids), 3, height, width))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.ndim == 0):
            return self.decode([int(key)])[0]
        if isinstance(key, slice):
            return self.decode(range(*key.indices(len(self))))
        return self.decode(torch.as_tensor(key).tolist())

    def decode(self, positions: Iterable[int]) -> torch.Tensor:
        """uint8 [n, 3, H, W] of the images at these positions of the part."""
        positions = list(positions)
        if not positions:
            return torch.empty(0, *self.shape[1:], dtype=torch.uint8)
        return images_to_uint8(self.partition.fetch(self.ids[positions].tolist()), self.side)

    def batches(self, batches: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """The decoded batches of positions `batches`, in order, decoded ahead in worker processes."""
        if self.num_workers == 0 or len(batches) <= 1:
            for positions in batches:
                yield self.decode(torch.as_tensor(positions).tolist())
            return
        methods = multiprocessing.get_all_start_methods()
        loader = torch.utils.data.DataLoader(
            _BatchDecoder(self), sampler=[torch.as_tensor(b).tolist() for b in batches], batch_size=None,
            num_workers=min(self.num_workers, len(batches)), prefetch_factor=2,
            # fork: the worker inherits the source's file list (its fetch is a closure, not picklable)
            multiprocessing_context="fork" if "fork" in methods else None,
            # its own generator: the loader's worker seed is not drawn from the global one (dropout's)
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=_freeze_inherited_objects,
        )
        try:
            for batch in loader:
                if isinstance(batch, XtlError):
                    raise batch
                yield batch
        except RuntimeError as err:
            if "DataLoader worker" not in str(err):
                raise
            # killed from outside (SIGKILL, the out-of-memory killer): DataLoader notices and raises; said in one line
            raise XtlError(f"a decode worker process died while decoding streamed images "
                           f"({str(err).splitlines()[0].rstrip('. ')}); what was finished is kept, and the same command "
                           "continues (xtl finetune: --resume); if memory is short, use fewer --num-workers") from None

    def chunks(self, size: int = 256) -> Iterator[torch.Tensor]:
        """All images in order, `size` at a time (e.g. to hash them) without holding them all."""
        yield from self.batches(consecutive_batches(len(self), size))


def _freeze_inherited_objects(worker_id: int) -> None:
    """A forked worker shares the parent's pages until it writes them; its garbage collector would
    write to every inherited object's header (copying those pages), so the inherited ones are set aside."""
    gc.freeze()


class _BatchDecoder(torch.utils.data.Dataset):
    """A DataLoader item is a whole batch of positions: one message per batch between processes."""

    def __init__(self, images: StreamedImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, positions: list[int]) -> torch.Tensor | XtlError:
        try:
            images = self.images.decode(positions)
        except XtlError as err:  # handed back whole: raised in the worker, DataLoader would wrap it in a traceback
            return err
        try:
            # moved to shared memory here, not in the queue's feeder thread: a failure there is lost and the
            # main process waits for the batch forever; here it is handed back as one line
            return images.share_memory_()
        except RuntimeError as err:
            return XtlError(
                f"a decode worker could not hand over a batch of {len(positions)} images "
                f"({images.numel() / 2**20:.0f} MiB) through shared memory ({str(err).splitlines()[0]}); "
                "free memory (or /dev/shm), or use fewer --num-workers or smaller batches")


def consecutive_batches(n: int, size: int) -> list[range]:
    """Positions 0..n-1 in consecutive batches of `size` (the last one shorter)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def take(images, rows: slice):
    """The images at `rows` as the same kind of thing: a slice of the tensor in memory, or a
    `StreamedImages` of those files alone (nothing decoded), e.g. one process's shard."""
    if isinstance(images, StreamedImages):
        return StreamedImages(images.partition, images.ids[rows], images.side, tuple(images.shape[-1:-3:-1]),
                              images.num_workers)
    return images[rows]


def image_batches(images, batches: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
    """uint8 images of each batch of positions: slices of an in-memory tensor, or decoded ahead in
    worker processes for `StreamedImages`."""
    if isinstance(images, StreamedImages):
        yield from images.batches(batches)
    else:
        for positions in batches:
            if isinstance(positions, range) and positions.step == 1:
                positions = slice(positions.start, positions.stop)  # a view, as before streaming existed
            yield images[positions]


def stored_side(partition: Partition, ids: np.ndarray, store_size: int | None) -> tuple[int | None, tuple[int, int]]:
    """(side, size): the side `images_to_uint8` fits the part's images to (None: all of one size, kept
    as they are) and the (width, height) each image then has. Only image headers are read where the
    partition can (`Partition.sizes`); otherwise images are decoded a few at a time."""
    if store_size is not None:
        return store_size, (store_size, store_size)
    sizes: set[tuple[int, int]] = set()
    for start in range(0, len(ids), 512):
        chunk = ids[start : start + 512].tolist()
        sizes.update(_sizes(partition, chunk))
        if len(sizes) > 1:
            return MIXED_SIZE_SIDE, (MIXED_SIZE_SIDE, MIXED_SIZE_SIDE)
    size = sizes.pop() if sizes else (0, 0)
    return None, size


def available_memory() -> int | None:
    """Bytes of memory available for new allocations (MemAvailable in /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def decoded_bytes(n_images: int, size: tuple[int, int]) -> int:
    """Memory of `n_images` decoded RGB uint8 images of (width, height) `size`."""
    return int(n_images) * int(size[0]) * int(size[1]) * 3


def choose_data_path(data_path: str, n_images: int, size: tuple[int, int]) -> str:
    """`memory` or `stream` for `data_path` (auto: memory below `MEMORY_FRACTION` of the available memory)."""
    if data_path not in DATA_PATHS:
        raise XtlError(f"option --data-path must be one of {', '.join(DATA_PATHS)}, not {data_path!r}")
    if data_path != "auto":
        return data_path
    available = available_memory()
    if available is None:
        return "memory"
    return "memory" if decoded_bytes(n_images, size) < MEMORY_FRACTION * available else "stream"


def first_size(partition: Partition, ids: np.ndarray, store_size: int | None) -> tuple[int, int]:
    """A quick guess of the stored (width, height) of a part's images from its first image (for `auto`)."""
    if store_size is not None:
        return store_size, store_size
    if len(ids) == 0:
        return 0, 0
    return _sizes(partition, ids[:1].tolist())[0]


def _sizes(partition: Partition, ids: list[int]) -> list[tuple[int, int]]:
    """(width, height) of each image `ids`, from headers where the partition reads them. An image whose
    header cannot be read (an empty file, text, a truncated header) is decoded instead, which names the
    file in one line (`XtlError`) or, where only the header misled, gives its size."""
    if partition.sizes is None:
        return [img.size for img in partition.fetch(ids)]
    sizes = list(partition.sizes(ids))
    unknown = [k for k, (width, height) in enumerate(sizes) if width <= 0 or height <= 0]
    if unknown:
        for k, img in zip(unknown, partition.fetch([ids[k] for k in unknown])):
            sizes[k] = img.size
    return sizes
