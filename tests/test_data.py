"""Data sources, seeded splits and on-device preprocessing, on real CIFAR-10 images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xtl.data import Preprocess, SplitSpec, decode_image, load_split, open_source
from xtl.data.splits import choose_ids
from xtl.errors import XtlError


def test_folder_source_lists_classes_and_interleaves_them(cifar):
    source = open_source(str(cifar))
    assert source.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train = source.partition("train")
    assert len(train) == 50_000 and len(source.partition("test")) == 10_000
    # The canonical order cycles through the classes, so any prefix is class-balanced.
    assert train.labels[:20].tolist() == list(range(10)) * 2
    assert train.keys[:2] == ["train/airplane/0000.jpg", "train/automobile/0000.jpg"]


def test_paper_split_is_4500_500_2000_from_the_first_5000(cifar):
    split = load_split(str(cifar), SplitSpec("paper", seed=0))
    assert [len(split[p]) for p in ("train", "val", "test")] == [4500, 500, 2000]
    assert split["train"].images.dtype == torch.uint8 and split["train"].images.shape[1:] == (3, 32, 32)
    ids = np.concatenate([split["train"].ids, split["val"].ids])
    assert sorted(ids.tolist()) == list(range(5000))
    assert split["test"].ids.tolist() == list(range(2000))
    assert sum(split.summary()["test"]) == 2000


def test_same_seed_same_ids_other_seed_other_ids():
    labels = np.arange(50_000) % 10
    test_labels = np.arange(10_000) % 10
    a = choose_ids(labels, test_labels, SplitSpec("paper", seed=7))
    b = choose_ids(labels, test_labels, SplitSpec("paper", seed=7))
    c = choose_ids(labels, test_labels, SplitSpec("paper", seed=8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])
    r1 = choose_ids(labels, test_labels, SplitSpec("random", 300, 40, 100, seed=3))
    r2 = choose_ids(labels, test_labels, SplitSpec("random", 300, 40, 100, seed=3))
    assert all(np.array_equal(r1[k], r2[k]) for k in r1)
    assert not set(r1["train"]) & set(r1["val"])


def test_stratified_random_split_keeps_class_proportions(cifar):
    split = load_split(str(cifar), SplitSpec("random", train_size=200, val_size=50, test_size=100, seed=1, stratified=True))
    counts = split.summary()
    assert counts["train"] == [20] * 10
    assert counts["val"] == [5] * 10
    assert counts["test"] == [10] * 10


def test_split_ids_are_saved_and_name_the_source_files(cifar, tmp_path):
    split = load_split(str(cifar), SplitSpec("random", train_size=20, val_size=10, test_size=10, seed=0))
    split.save_ids(tmp_path / "split.csv")
    rows = (tmp_path / "split.csv").read_text().splitlines()
    assert rows[0] == "split,id,label,class,key" and len(rows) == 41
    part, _, label, name, key = rows[1].split(",")
    assert part == "train" and key.startswith(f"train/{name}/")
    # the saved key points at the very image held in memory
    first = np.asarray(decode_image(cifar / key)).transpose(2, 0, 1)
    assert np.array_equal(first, split["train"].images[0].numpy())


def test_random_split_too_large_names_the_option():
    with pytest.raises(XtlError, match="--train-size"):
        choose_ids(np.zeros(100), np.zeros(10), SplitSpec("random", train_size=95, val_size=10))


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(XtlError, match=str(tmp_path / "nope")):
        open_source(str(tmp_path / "nope"))


def test_class_folder_without_images_names_it(tiny_folder):
    empty = tiny_folder / "train" / "zebra"
    empty.mkdir()
    with pytest.raises(XtlError, match=f"{empty} has no images"):
        open_source(str(tiny_folder))


def test_unreadable_image_names_the_file(tiny_folder):
    bad = tiny_folder / "train" / "cat" / "0000.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(XtlError, match="0000.jpg cannot be read"):
        load_split(str(tiny_folder), SplitSpec("random", train_size=36, val_size=0, seed=0))


def test_image_modes_are_decoded_to_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (8, 6, 3), dtype=np.uint8)
    cases = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((8, 6), 255, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "sixteen.png": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = decode_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (6, 8), name
    assert np.array_equal(np.asarray(decode_image(tmp_path / "sixteen.png"))[..., 0], rgb[..., 0])


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((4, 10, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "rotated.jpg", exif=exif)
    assert decode_image(tmp_path / "rotated.jpg").size == (4, 10)


def test_huggingface_source_from_disk(tiny_folder, tmp_path):
    """The `hf:` path the paper used, exercised on a dataset saved locally with `save_to_disk`."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "ship"])})
    splits = {}
    for part in ("train", "test"):
        rows = {"img": [], "label": []}
        for k, name in enumerate(["cat", "dog", "ship"]):
            for f in sorted((tiny_folder / part / name).iterdir()):
                rows["img"].append(str(f))
                rows["label"].append(k)
        splits[part] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "hf")
    split = load_split(f"hf:{tmp_path / 'hf'}", SplitSpec("random", train_size=30, val_size=6, seed=0, stratified=True))
    assert split.class_names == ["cat", "dog", "ship"]
    assert split.summary()["train"] == [10, 10, 10] and len(split["test"]) == 12
    assert split["train"].images.shape[1:] == (3, 32, 32)


def test_preprocess_resizes_and_normalises_in_batches():
    images = torch.full((5, 3, 32, 32), 255, dtype=torch.uint8)
    images[:, 1] = 0
    pre = Preprocess(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = pre(images)
    assert x.shape == (5, 3, 64, 64)
    assert torch.allclose(x[:, 0], torch.full_like(x[:, 0], 2.0)) and torch.allclose(x[:, 1], torch.full_like(x[:, 1], -2.0))
    assert torch.allclose(pre.denormalise(x)[:, 0], torch.ones(5, 64, 64))


def test_augmentation_differs_per_image_and_repeats_with_the_seed(cifar):
    split = load_split(str(cifar), SplitSpec("random", train_size=8, val_size=0, test_size=0, seed=0))
    same = split["train"].images[:1].repeat(8, 1, 1, 1)
    pre = Preprocess(64, (0.5,) * 3, (0.5,) * 3)
    a = pre(same, augment=True, generator=torch.Generator().manual_seed(1))
    b = pre(same, augment=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])
    assert a.shape == (8, 3, 64, 64)


def test_preprocess_leaves_a_float_input_unchanged(cifar):
    split = load_split(str(cifar), SplitSpec("random", train_size=4, val_size=0, test_size=0, seed=0))
    images = split["train"].images.float()  # 0..255 as float32: Preprocess takes it like uint8
    before = images.clone()
    pre = Preprocess(32, (0.5,) * 3, (0.5,) * 3)
    x = pre(images)
    assert torch.equal(images, before)
    assert torch.allclose(x, pre(split["train"].images))
