from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
CIFAR = SHARED / "data" / "cifar10"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"
DINOV2 = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar() -> Path:
    assert CIFAR.is_dir(), f"tests need the shared data at {CIFAR}"
    return CIFAR


@pytest.fixture()
def tiny_folder(tmp_path: Path, cifar: Path) -> Path:
    """A 3-class image folder copied from real CIFAR-10 images: 12 train and 4 test per class."""
    import shutil

    for part, n in (("train", 12), ("test", 4)):
        for name in ("cat", "dog", "ship"):
            dest = tmp_path / "data" / part / name
            dest.mkdir(parents=True)
            for f in sorted((cifar / part / name).iterdir())[:n]:
                shutil.copy(f, dest / f.name)
    return tmp_path / "data"
