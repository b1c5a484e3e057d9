"""Image-classification sources behind one interface.

A source lists its items (an id, a label and a key to fetch the pixels) for each of its
partitions (`train`, `test`) in a canonical order, and decodes only the items asked for.
Ids are positions in that canonical order, so a seeded split names the same images always.

Specs understood by `open_source`:
- a directory (optionally `folder:DIR`) in image-folder layout `DIR/{train,test}/<class>/*`;
- `hf:NAME` for a Hugging Face dataset on the hub, or `hf:DIR` for one saved with `save_to_disk`;
- `cifar10` / `cifar100`: the Hugging Face copies the paper used (`uoft-cs/cifar10`, `uoft-cs/cifar100`);
- `torchvision:cifar10` / `torchvision:cifar100` (downloads into `~/.cache/xtl`; for online users).

The default source, `../shared/data/cifar10`, exists only on the machines that have `../shared`;
where it is absent, CIFAR-10 comes from torchvision instead (`xtl.data.fallback`).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from xtl.errors import XtlError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
PARTITIONS = ("train", "test")
HF_ALIASES = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
# Images larger than this many pixels are refused (decompression bombs).
Image.MAX_IMAGE_PIXELS = 64_000_000


@dataclass
class Partition:
    """One partition of a source: labels in canonical order and a way to fetch pixels."""

    labels: np.ndarray  # int64 [N]
    keys: list[str]  # human-readable key of each item (a relative path, a row number)
    fetch: Callable[[Sequence[int]], list[Image.Image]]
    # (width, height) of items as decoded, read without decoding them where the source can (streaming)
    sizes: Callable[[Sequence[int]], list[tuple[int, int]]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Source:
    spec: str
    class_names: list[str]
    partitions: dict[str, Partition]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def partition(self, name: str) -> Partition:
        if name not in self.partitions:
            raise XtlError(f"data source {self.spec} has no '{name}' partition")
        return self.partitions[name]


def open_source(spec: str) -> Source:
    """Open a data source from its spec string (see the module docstring)."""
    spec = str(spec)
    if spec.startswith("folder:"):
        return _folder_source(Path(spec[len("folder:"):]), spec)
    if spec.startswith("torchvision:"):
        return _torchvision_source(spec[len("torchvision:"):], spec)
    if spec.startswith("hf:"):
        return _hf_source(spec[len("hf:"):], spec)
    if spec in HF_ALIASES:
        return _hf_source(HF_ALIASES[spec], spec)
    from xtl.data.fallback import DEFAULT_SOURCE, fallback_source

    if spec == DEFAULT_SOURCE and not os.path.isdir(spec):
        return fallback_source(spec)  # only the default falls back; a folder the user names must exist
    if os.path.isdir(spec):
        return _folder_source(Path(spec), spec)
    raise XtlError(
        f"data source {spec}: no such folder, and not one of folder:DIR, hf:NAME, "
        f"{', '.join(HF_ALIASES)}, torchvision:cifar10|cifar100"
    )


# ----------------------------------------------------------------------------- decoding


def decode_image(path: str | os.PathLike) -> Image.Image:
    """Open any common image file as 8-bit RGB, honouring EXIF rotation; one-line error otherwise."""
    path = Path(path)
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):  # a pipe would block the read, a device never end
            raise XtlError(f"image file {path} is not a regular file (a pipe, socket or device)")
        if status.st_size == 0:
            raise XtlError(f"image file {path} is empty")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except XtlError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise XtlError(f"image file {path} is too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise XtlError(f"image file {path} cannot be read as an image: {err}") from None


def header_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file as `decode_image` gives it (EXIF rotation applied), from its
    header alone; a file that cannot be read is named when it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decoding it says so in one line
            with Image.open(path) as img:
                width, height = img.size
                # a PNG without an eXIf chunk before its pixels: PIL's getexif() would decode the whole image
                # to look for one after them (rare; `decode_into_memory` checks the decoded sizes)
                orientation = None if img.format == "PNG" and "exif" not in img.info else img.getexif().get(0x0112)
                if orientation in (5, 6, 7, 8):  # a quarter turn: exif_transpose swaps the sides
                    width, height = height, width
                return width, height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return (-1, -1)  # unknown: the part counts as of mixed sizes; decoding names the file


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


# ----------------------------------------------------------------------------- folders


def _folder_source(root: Path, spec: str) -> Source:
    if not root.is_dir():
        raise XtlError(f"data folder {root} does not exist")
    missing = [p for p in PARTITIONS if not (root / p).is_dir()]
    if "train" in missing:
        raise XtlError(f"data folder {root} has no train/ subfolder (expected {root}/train/<class>/*)")
    class_names = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise XtlError(f"data folder {root / 'train'} has no class subfolders")
    for part in PARTITIONS:
        _refuse_link_loops(root / part)
    partitions = {}
    for part in PARTITIONS:
        if part in missing:
            continue
        partitions[part] = _folder_partition(root, part, class_names)
    return Source(spec=spec, class_names=class_names, partitions=partitions)


def _refuse_link_loops(part_dir: Path) -> None:
    """A class folder that is a symbolic link back to the data folder or above it (`ln -s . loop`
    in train/) is one line naming it; links to folders elsewhere are class folders like others."""
    if not part_dir.is_dir():
        return
    here = part_dir.resolve()
    for entry in part_dir.iterdir():
        if entry.is_symlink() and entry.is_dir() and not entry.name.startswith("."):
            target = entry.resolve()
            if here == target or target in here.parents:
                raise XtlError(f"class folder {entry} is a symbolic link to {target}, a folder that holds it "
                               "(a loop); remove it")


def _image_files(class_dir: Path) -> list[str]:
    """Names of the image files in `class_dir`, sorted. Subfolders (symbolic links to folders
    included, so a link loop such as `loop -> .` is never walked), hidden entries and other file
    types are not data; an image name that cannot be followed (a link to itself) is one line."""
    names = []
    with os.scandir(class_dir) as entries:
        for entry in entries:
            if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                is_file = entry.is_file()
            except OSError as err:  # ELOOP: a symbolic link loop
                raise XtlError(f"image file {class_dir / entry.name} cannot be read: {err.strerror} (a symbolic link "
                               "that leads back to itself?); remove it or point it at an image") from None
            if is_file:
                names.append(entry.name)
    return sorted(names)


def _folder_partition(root: Path, part: str, class_names: list[str]) -> Partition:
    part_dir = root / part
    # hidden entries (.ipynb_checkpoints, macOS ._* resource forks) and files of other types are not data
    extra = sorted(d.name for d in part_dir.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in class_names)
    if extra:
        raise XtlError(f"data folder {part_dir} has class folders not in train/: {', '.join(extra)}")
    per_class: list[list[str]] = []
    for name in class_names:
        class_dir = part_dir / name
        files = _image_files(class_dir) if class_dir.is_dir() else []
        if not files and part == "train":
            raise XtlError(f"class folder {class_dir} has no images")
        per_class.append([f"{part}/{name}/{f}" for f in files])
    if not any(per_class):
        raise XtlError(f"data folder {part_dir} has no images (expected {part_dir}/<class>/*)")
    # Canonical order interleaves the classes (item i of every class, then item i+1, ...),
    # so "the first N images" is a class-balanced prefix, as in CIFAR's own order.
    order = sorted(
        ((i, c) for c, files in enumerate(per_class) for i in range(len(files))),
    )
    keys = [per_class[c][i] for i, c in order]
    labels = np.array([c for _, c in order], dtype=np.int64)

    def fetch(ids: Sequence[int]) -> list[Image.Image]:
        return [decode_image(root / keys[i]) for i in ids]

    def sizes(ids: Sequence[int]) -> list[tuple[int, int]]:
        return [header_size(root / keys[i]) for i in ids]

    return Partition(labels=labels, keys=keys, fetch=fetch, sizes=sizes)


# ----------------------------------------------------------------------------- Hugging Face


def _hf_source(name: str, spec: str) -> Source:
    """A `datasets.DatasetDict` with train (and test) splits, from `load_from_disk(DIR)` or `load_dataset(NAME)`.

    Rows are read on demand from the memory-mapped Arrow files, in memory and streamed alike
    (`--data-path stream` decodes them in forked worker processes), so memory does not grow with the
    data set. Pixels are decoded as an image folder's are (EXIF rotation, `_to_rgb`, the size limit),
    and `sizes` reads image headers only. `streaming=True` (iterable) data sets are not supported:
    seeded splits need random access to the rows.
    """
    import datasets

    offline = None
    if not os.path.isdir(name):
        from xtl.hub import hf_hub_check

        offline = hf_hub_check()  # offline: the cache is read, and a missing data set fails at once
    try:
        if os.path.isdir(name):
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name)
    except Exception as err:  # the hub raises many types; all mean "cannot load"
        from xtl.hub import is_offline_error

        if offline is not None and (is_offline_error(err) or isinstance(err, FileNotFoundError)):
            raise XtlError(
                f"data source {spec} could not be downloaded from the Hugging Face hub (not in the local cache, "
                f"and {offline}; no network?); pass --source DIR (an image folder DIR/{{train,test}}/<class>/*, "
                "or hf:DIR for a data set saved with save_to_disk) or connect once to download it"
            ) from None
        if isinstance(err, FileNotFoundError):
            raise XtlError(f"data source {spec}: {err}") from None
        raise XtlError(f"data source {spec} cannot be loaded: {type(err).__name__}: {err}") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise XtlError(f"data source {spec} must have train and test splits")
    train = loaded["train"]
    image_col = _first_column(train, ("img", "image"), datasets.Image, spec)
    label_col = _first_column(train, ("label", "fine_label", "labels"), datasets.ClassLabel, spec)
    class_names = list(train.features[label_col].names)
    partitions = {}
    for part in PARTITIONS:
        if part not in loaded:
            continue
        ds = loaded[part]
        labels = np.asarray(ds[label_col], dtype=np.int64)
        keys = [f"{part}/{i}" for i in range(len(labels))]
        mode = getattr(ds.features[image_col], "mode", None)
        # rows as stored ({"bytes", "path"}), nothing decoded: a feature change, the Arrow data is not copied
        undecoded = ds.cast_column(image_col, datasets.Image(decode=False))

        def fetch(ids: Sequence[int], undecoded=undecoded, keys=keys, mode=mode) -> list[Image.Image]:
            rows = undecoded.select(list(ids))[image_col]
            return [_hf_decode(row, mode, f"image {keys[i]} of data source {spec}") for i, row in zip(ids, rows)]

        def sizes(ids: Sequence[int], undecoded=undecoded, keys=keys, mode=mode) -> list[tuple[int, int]]:
            rows = undecoded.select(list(ids))[image_col]
            return [_hf_size(row, mode, f"image {keys[i]} of data source {spec}") for i, row in zip(ids, rows)]

        partitions[part] = Partition(labels=labels, keys=keys, fetch=fetch, sizes=sizes)
    return Source(spec=spec, class_names=class_names, partitions=partitions)


def _hf_file(row: dict):
    """What PIL opens for a stored image row: its bytes, or its file where only a local path is
    stored; None for a remote file (`datasets` fetches it)."""
    if row.get("bytes") is not None:
        return io.BytesIO(row["bytes"])
    path = row.get("path")
    return path if path and os.path.isfile(path) else None


def _hf_decode(row: dict, mode: str | None, name: str) -> Image.Image:
    """One stored image row as 8-bit RGB, decoded as `decode_image` decodes a file (`mode`: the
    feature's own conversion, which `datasets` applies first); one line naming the row otherwise."""
    file = _hf_file(row)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if file is None:
                import datasets

                return _to_rgb(datasets.Image(mode=mode).decode_example(row))  # EXIF rotation included
            with Image.open(file) as img:
                img = ImageOps.exif_transpose(img)
                if mode and img.mode != mode:
                    img = img.convert(mode)
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise XtlError(f"{name} is too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise XtlError(f"{name} cannot be read as an image: {err}") from None


def _hf_size(row: dict, mode: str | None, name: str) -> tuple[int, int]:
    """(width, height) of a stored image row as `_hf_decode` gives it, from its header where it is here."""
    file = _hf_file(row)
    return header_size(file) if file is not None else _hf_decode(row, mode, name).size


def _first_column(ds, candidates, feature_type, spec) -> str:
    for col in candidates:
        if col in ds.features and isinstance(ds.features[col], feature_type):
            return col
    for col, feature in ds.features.items():
        if isinstance(feature, feature_type):
            return col
    raise XtlError(f"data source {spec} has no {feature_type.__name__} column")


# ----------------------------------------------------------------------------- torchvision


class DownloadFailed(XtlError):
    """A data set that could not be downloaded, in one line; `reason` says why."""

    def __init__(self, spec: str, root: Path, reason: str) -> None:
        from xtl.data.fallback import shown_path

        self.reason = reason
        super().__init__(
            f"data source {spec} is not in {shown_path(root)} and could not be downloaded ({reason}; no network?); "
            "pass --source DIR (an image folder DIR/{train,test}/<class>/*) or connect once to download it"
        )


def _short(err: BaseException) -> str:
    from xtl.data.fallback import short_reason

    return short_reason(err)


def data_cache_dir() -> Path:
    """Where downloaded data sets go: $XTL_DATA_CACHE, else ~/.cache/xtl."""
    return Path(os.environ.get("XTL_DATA_CACHE") or Path.home() / ".cache" / "xtl")


def _torchvision_source(name: str, spec: str, folder_order: bool = False) -> Source:
    """CIFAR from torchvision, downloaded once into `data_cache_dir()`.

    Canonical order: torchvision's (the original pickles' order), keys `train/<index>`. With
    `folder_order`, the order an image folder of the same data set has (see `_folder_partition`):
    classes in sorted name order, item i of every class, then item i+1, ..., keys
    `train/<class>/<NNNN>` (the rank within the class). An image folder exported in the original
    within-class order (as `../shared/data/cifar10`) then has the same labels at the same ids,
    so a seeded split of either names the same images.
    """
    import torchvision

    datasets_by_name = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
    if name not in datasets_by_name:
        raise XtlError(f"data source {spec}: torchvision source must be one of {', '.join(datasets_by_name)}")
    root = data_cache_dir()
    dataset = datasets_by_name[name]
    url, folder = getattr(dataset, "url", None), getattr(dataset, "base_folder", None)
    if url and folder and not (root / folder).is_dir():  # to be downloaded: can it be?
        from xtl.hub import unreachable

        reason = unreachable(url)
        if reason is not None:
            raise DownloadFailed(spec, root, f"{reason}")
    partitions = {}
    class_names: list[str] = []
    for part in PARTITIONS:
        try:
            ds = dataset(root=str(root), train=part == "train", download=True)
        except (OSError, RuntimeError, EOFError, tarfile.TarError) as err:  # URLError is an OSError
            raise DownloadFailed(spec, root, _short(err)) from None
        class_names = list(ds.classes)
        data = ds.data  # uint8 [N, H, W, 3]
        labels = np.asarray(ds.targets, dtype=np.int64)
        keys = [f"{part}/{i}" for i in range(len(labels))]
        order = np.arange(len(labels))
        if folder_order:
            sorted_names = sorted(class_names)
            labels = np.array([sorted_names.index(n) for n in class_names], dtype=np.int64)[labels]
            rank = np.zeros(len(labels), dtype=np.int64)
            for c in np.unique(labels):
                members = np.flatnonzero(labels == c)
                rank[members] = np.arange(len(members))
            order = np.lexsort((labels, rank))  # by rank within the class, then by class
            labels, rank = labels[order], rank[order]
            keys = [f"{part}/{sorted_names[c]}/{r:04d}" for c, r in zip(labels.tolist(), rank.tolist())]

        def fetch(ids: Sequence[int], data=data, order=order) -> list[Image.Image]:
            return [Image.fromarray(data[order[i]]) for i in ids]

        def sizes(ids: Sequence[int], data=data) -> list[tuple[int, int]]:
            return [(data.shape[2], data.shape[1])] * len(ids)

        partitions[part] = Partition(labels=labels, keys=keys, fetch=fetch, sizes=sizes)
    return Source(spec=spec, class_names=sorted(class_names) if folder_order else class_names, partitions=partitions)


# ----------------------------------------------------------------------------- to tensors


def images_to_uint8(images: list[Image.Image], store_size: int | None = None) -> torch.Tensor:
    """Stack PIL images into a uint8 tensor [N, 3, H, W].

    Images of one size stack as they are (CIFAR stays 32x32). Mixed sizes are resized
    (shorter side to `store_size`, default 256) and centre-cropped to a square first.
    """
    if not images:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    sizes = {img.size for img in images}
    if store_size is not None or len(sizes) > 1:
        side = store_size or 256
        images = [ImageOps.fit(img, (side, side), method=Image.Resampling.BICUBIC) for img in images]
    array = np.stack([np.asarray(img, dtype=np.uint8) for img in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
