"""Shared by the tests: tiny real runs and a headless Debian Chromium."""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Iterator

from xtl.config import RunConfig
from xtl.data import load_split
from xtl.evaluate import evaluate
from xtl.runs import RunDir, split_spec
from xtl.train import finetune

XTL = str(Path(sys.executable).with_name("xtl"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def class_folder(folder: Path, cifar: Path, per_part: tuple[tuple[str, int], ...] = (("train", 20), ("test", 8)),
                 classes: tuple[str, ...] = ("cat", "dog", "ship")) -> Path:
    """`folder` made an image folder of real CIFAR-10 images: the first n of each class per part."""
    for part, n in per_part:
        for name in classes:
            (folder / part / name).mkdir(parents=True)
            for f in sorted((cifar / part / name).iterdir())[:n]:
                shutil.copy(f, folder / part / name / f.name)
    return folder


def one_line_error(result, *fragments: str) -> str:
    """Exit status 2, one line `error: ...` on stderr with every fragment, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tiny_run(path: Path, cifar: Path, model: str, input_size: int, **overrides) -> RunDir:
    """A real fine-tuning run on 40 CIFAR-10 images (random init, one epoch), evaluated on 24."""
    options = dict(source=str(cifar), model=model, pretrained=False, input_size=input_size, split="random",
                   train_size=40, val_size=10, test_size=24, stratified=True, batch_size=20, epochs=1, patience=0)
    options.update(overrides)
    config = RunConfig(**options)
    run = RunDir(path)
    data = load_split(config.source, split_spec(config))
    finetune(config, data, run, progress=False)
    evaluate(run, data, device="cpu")
    return run


def assert_same_images(memory, streamed) -> None:
    """The split read in memory and streamed (`xtl.data.stream`): the same parts, ids, keys, labels and
    uint8 images bit for bit, indexed every way and decoded in 2 worker processes, and the same
    images digest (stored maps stay valid)."""
    import torch

    from xtl.data.stream import StreamedImages
    from xtl.explain.stored import images_digest

    assert memory.data_path == "memory" and streamed.data_path == "stream"
    for name in ("train", "val", "test"):
        kept, lazy = memory[name].images, streamed[name].images
        assert isinstance(lazy, StreamedImages) and lazy.shape == kept.shape
        assert torch.equal(memory[name].labels, streamed[name].labels)
        assert memory[name].ids.tolist() == streamed[name].ids.tolist() and memory[name].keys == streamed[name].keys
        assert torch.equal(lazy[2], kept[2]) and torch.equal(lazy[1:7], kept[1:7])
        picks = torch.tensor([len(kept) - 1, 0, 3])
        assert torch.equal(lazy[picks], kept[picks])
        half = len(lazy) // 2
        decoded = list(lazy.batches([range(0, half), range(half, len(lazy))]))  # in 2 worker processes, in order
        assert torch.equal(torch.cat(decoded), kept)
        assert images_digest(memory[name]) == images_digest(streamed[name])


@contextlib.contextmanager
def chromium_page(viewport: tuple[int, int] = (1280, 900)) -> Iterator:
    """A Playwright page in Debian's headless Chromium (never `playwright install`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            yield page
        finally:
            browser.close()


def cifar_images(cifar: Path, n_per_class: int = 1, classes: tuple[str, ...] = ("cat", "dog", "ship", "truck"),
                 part: str = "test"):
    """Real CIFAR-10 images as uint8 [N, 3, 32, 32] and their class indices within `classes`."""
    import numpy as np
    import torch
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((cifar / part / name).iterdir())[:n_per_class]:
            images.append(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def noise_images(n: int, size: int, seed: int = 1):
    """A seeded batch of standard-normal "preprocessed" images [n, 3, size, size]."""
    import torch

    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cifar_resnet18(cifar: Path, n_per_class: int):
    """A random-init timm ResNet-18 (10 classes, 32 px, eval) and CIFAR test images preprocessed for it:
    (model, spec, images, labels)."""
    import torch

    from xtl.models import build_model, preprocessing

    torch.manual_seed(0)
    model, spec = build_model("timm:resnet18", 10, pretrained=False, input_size=32)
    model.eval()
    raw, labels = cifar_images(cifar, n_per_class=n_per_class)
    return model, spec, preprocessing(model, spec)(raw), labels


def cifar_uint8(cifar: Path, per_class: int = 3, classes=("cat", "ship")):
    """uint8 [B, 3, 32, 32] real CIFAR-10 test images, `per_class` of each class, and their labels."""
    import numpy as np
    import torch
    from PIL import Image

    names = sorted(p.name for p in (cifar / "test").iterdir() if p.is_dir())
    images, labels = [], []
    for name in classes:
        for f in sorted((cifar / "test" / name).iterdir())[:per_class]:
            images.append(torch.tensor(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1))
            labels.append(names.index(name))
    return torch.stack(images), torch.tensor(labels)


def random_resnet10t():
    """A seeded random-init timm resnet10t with 10 classes, in eval mode."""
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
