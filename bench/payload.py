"""Fill the git-ignored `device_payload/` so that `bench/gpu.sh` runs from the repo alone.

    .venv/bin/python bench/payload.py [--images 5000]

- `device_payload/cifar10_train.npz`: the first `--images` CIFAR-10 training JPEGs of
  ../shared/data/cifar10/train (evenly over the classes) as bytes, with offsets and labels;
  about 1 KB per image.
- `device_payload/site/`: the pure-Python packages xtl imports that the GPU machine's image lacks
  (captum, zennit, pytorch_grad_cam and its helper ttach), copied from this `.venv`.

Everything travels with the `carry` argument of the device tool (64 MiB in all).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from common import IMAGE_FOLDER, PAYLOAD, REPO

PACKAGES = ("captum", "zennit", "pytorch_grad_cam", "ttach")


def write_jpegs(n: int) -> None:
    classes = sorted(p.name for p in IMAGE_FOLDER.iterdir() if p.is_dir())
    files = [(f, label) for label, c in enumerate(classes) for f in sorted((IMAGE_FOLDER / c).glob("*.jpg"))]
    keep = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    chunks, labels = [], []
    for i in keep:
        path, label = files[i]
        chunks.append(np.frombuffer(path.read_bytes(), dtype=np.uint8))
        labels.append(label)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    PAYLOAD.parent.mkdir(exist_ok=True)
    np.savez(PAYLOAD, jpeg=np.concatenate(chunks), offsets=offsets, labels=np.array(labels, dtype=np.int64),
             classes=np.array(classes))
    print(f"{PAYLOAD.relative_to(REPO)}: {len(labels)} JPEGs, {PAYLOAD.stat().st_size / 2**20:.1f} MiB")


def copy_packages() -> None:
    site = PAYLOAD.parent / "site"
    for name in PACKAGES:
        module = __import__(name)
        source = Path(module.__file__).parent
        target = site / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    print(f"{site.relative_to(REPO)}: {', '.join(PACKAGES)} ({size / 2**20:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    args = parser.parse_args()
    if not IMAGE_FOLDER.is_dir():
        sys.exit(f"{IMAGE_FOLDER} is missing: run this where ../shared exists")
    write_jpegs(args.images)
    copy_packages()


if __name__ == "__main__":
    main()
