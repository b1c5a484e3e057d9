"""`hf:DIR` sources on the streamed data path: rows read on demand from the memory-mapped Arrow files,
decoded in worker processes, the same images as in memory and as the image folder they were made from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from xtl.data import SplitSpec, load_split
from xtl.data.sources import open_source
from xtl.errors import XtlError
from xtl.runs import RunDir

from helpers import assert_same_images, class_folder

datasets = pytest.importorskip("datasets")

CLASSES = ("cat", "dog", "ship")
SPEC = SplitSpec("random", train_size=30, val_size=9, test_size=10, seed=3, stratified=True)


def _save_hf(folder: Path, dest: Path) -> Path:
    """`folder`'s images as a `datasets.DatasetDict` saved with `save_to_disk` (image bytes embedded),
    its rows in the folder source's canonical order, so the ids of both name the same images."""
    source = open_source(str(folder))
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=source.class_names)})
    splits = {}
    for part, partition in source.partitions.items():
        rows = {"img": [str(folder / key) for key in partition.keys], "label": partition.labels.tolist()}
        splits[part] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(dest))
    return dest


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory, cifar):
    """(image folder, hf:DIR spec) of 60 real CIFAR-10 jpgs: 16 train and 4 test images of 3 classes."""
    root = tmp_path_factory.mktemp("hf")
    folder = class_folder(root / "folder", cifar, (("train", 16), ("test", 4)), CLASSES)
    return folder, f"hf:{_save_hf(folder, root / 'saved')}"


@pytest.fixture(scope="module")
def hf_mixed(tmp_path_factory, cifar):
    """As `hf_data`, but 4 train images of other sizes, one of them EXIF-rotated a quarter turn and one
    an RGBA png: train parts are fitted to 256 px, the test part (all 32x32) is kept as it is."""
    root = tmp_path_factory.mktemp("hf_mixed")
    folder = class_folder(root / "folder", cifar, (("train", 16), ("test", 4)), CLASSES)
    cats = sorted((folder / "train" / "cat").iterdir())
    Image.open(cats[0]).resize((40, 30)).save(cats[0])
    Image.open(cats[1]).resize((50, 30)).save(cats[1])
    rotated = Image.open(cats[2]).resize((48, 24))
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: decoded as 24 x 48
    rotated.save(cats[2], exif=exif)
    Image.open(cats[3]).convert("RGBA").resize((36, 36)).save(cats[3].with_suffix(".png"))
    cats[3].unlink()
    return folder, f"hf:{_save_hf(folder, root / 'saved')}"


def test_streamed_hf_images_are_the_in_memory_images_bit_for_bit(hf_data):
    folder, spec = hf_data
    memory = load_split(spec, SPEC)
    streamed = load_split(spec, SPEC, data_path="stream", num_workers=2)
    assert streamed.class_names == list(CLASSES) and streamed["train"].images.shape == (30, 3, 32, 32)
    assert_same_images(memory, streamed)
    # decoded as the image folder they were saved from is: the same ids, labels and pixels
    as_folder = load_split(str(folder), SPEC)
    for name in ("train", "val", "test"):
        assert as_folder[name].ids.tolist() == memory[name].ids.tolist()
        assert torch.equal(as_folder[name].labels, memory[name].labels)
        assert torch.equal(as_folder[name].images, memory[name].images)


def test_streamed_hf_images_of_mixed_sizes_are_resized_as_in_memory(hf_mixed):
    folder, spec = hf_mixed
    split = SplitSpec("random", val_size=6, seed=1)
    memory, streamed = load_split(spec, split), load_split(spec, split, data_path="stream", num_workers=2)
    assert memory["train"].images.shape[-2:] == (256, 256) and memory["test"].images.shape[-2:] == (32, 32)
    assert_same_images(memory, streamed)
    as_folder = load_split(str(folder), split)
    for name in ("train", "val", "test"):
        assert torch.equal(as_folder[name].images, memory[name].images)


def test_hf_sizes_read_from_headers_are_the_decoded_sizes(hf_mixed):
    folder, spec = hf_mixed
    for part, partition in open_source(spec).partitions.items():
        ids = list(range(len(partition)))[::-1]
        assert partition.sizes is not None
        decoded = [img.size for img in partition.fetch(ids)]
        assert partition.sizes(ids) == decoded
        assert partition.sizes(ids) == open_source(str(folder)).partition(part).sizes(ids)
    train = open_source(spec).partition("train")
    assert {(40, 30), (50, 30), (24, 48), (36, 36), (32, 32)} == set(train.sizes(range(len(train))))


def test_hf_sizes_do_not_decode_the_images(hf_data, monkeypatch):
    """`stored_side` learns a streamed part's sizes from the rows' headers: no pixels are decoded."""
    _, spec = hf_data
    decoded = []
    original = ImageFile.ImageFile.load  # what a JPEG's pixels are read by
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or original(self))
    train = open_source(spec).partition("train")
    assert train.sizes(range(len(train))) == [(32, 32)] * 48 and not decoded
    assert len(train.fetch([0, 5])) == 2 and decoded


def test_a_bad_hf_image_decoded_in_a_worker_is_one_line(hf_data, tmp_path):
    """A row whose bytes are not an image: one line naming the row and the source, raised in the
    training process, whether it is decoded there or in a worker."""
    folder, _ = hf_data
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    rows = {"img": [str(p) for p in sorted((folder / "train" / "cat").iterdir())[:9]], "label": [0, 1, 2] * 3}
    rows["img"][4] = {"bytes": b"not an image", "path": None}
    good = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": good, "test": good}).save_to_disk(str(tmp_path / "bad"))
    spec = f"hf:{tmp_path / 'bad'}"
    # its size cannot be read without decoding it, so the split names it on both data paths (issue 28)
    for data_path in ("stream", "memory"):
        with pytest.raises(XtlError, match=r"^image train/4 of data source .* cannot be read as an image"):
            load_split(spec, SplitSpec("random", train_size=9, val_size=0, test_size=2, seed=0), data_path=data_path)
    # decoded when its batch is asked for (a row spoiled after the split): in a worker or here
    from xtl.data.stream import StreamedImages

    images = StreamedImages(open_source(spec).partition("train"), np.arange(9), 32, (32, 32), 2)
    for workers in (2, 0):
        images.num_workers = workers
        with pytest.raises(XtlError, match="cannot be read as an image") as err:
            list(images.batches([range(0, 3), range(3, 6), range(6, 9)]))
        assert "\n" not in str(err.value) and str(err.value).startswith(f"image train/4 of data source {spec} ")


def test_finetune_streams_an_hf_source_from_the_command_line(hf_data, tmp_path):
    _, spec = hf_data
    done = subprocess.run(
        [sys.executable, "-m", "xtl", "finetune", "--model", "timm:resnet10t", "--random-init", "--input-size", "32",
         "--split", "random", "--train-size", "32", "--val-size", "8", "--test-size", "12", "--epochs", "1",
         "--batch-size", "16", "--data-path", "stream", "--num-workers", "1", "--runs-dir", str(tmp_path),
         "--name", "s", "--no-progress", "--source", spec],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = RunDir(tmp_path / "s")
    config = run.read()
    assert config["run"]["data_path"] == "stream" and config["derived"]["data_path"] == "stream"
    assert config["run"]["source"] == spec
    assert run.metrics()["n_images"] == 12
    assert np.isfinite(run.metrics()["accuracy"])
