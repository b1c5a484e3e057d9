"""What every benchmark shares: the machine's name, data that works without ../shared, result files.

The data comes from `device_payload/cifar10_train.npz` (written by `bench/payload.py` from
../shared, so that a GPU machine with the repo alone has real CIFAR-10 JPEGs) or, where that file
is missing, straight from the image folder ../shared/data/cifar10/train.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = REPO / "device_payload" / "cifar10_train.npz"
IMAGE_FOLDER = REPO / "../shared/data/cifar10/train"


# ----------------------------------------------------------------------------- the machine


def machine_name(device: str) -> str:
    """`NVIDIA H100 80GB HBM3` on a GPU, `Intel(R) Xeon(R) Processor, 2 cores` on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def header(device: str) -> dict:
    return {
        "machine": machine_name(device), "device": device, "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[], object], device: str | torch.device) -> float:
    """Wall seconds of `run()`, the device's queue drained before and after."""
    sync(device)
    started = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def save(results: dict, json_path: Path | None, markdown: str, markdown_path: Path | None) -> None:
    print(markdown, flush=True)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown + "\n")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CIFAR-10 JPEGs


class JpegSet(torch.utils.data.Dataset):
    """JPEG bytes + labels, decoded by PIL on access: what ImageFolder does, from one .npz."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray, transform=None) -> None:
        self.blob, self.offsets, self.labels, self.transform = blob, offsets, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int):
        from PIL import Image

        data = self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes()
        return Image.open(io.BytesIO(data)).convert("RGB")

    def __getitem__(self, i: int):
        image = self.image(i)
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def jpeg_dataset(transform=None, limit: int | None = None) -> torch.utils.data.Dataset:
    """The payload when it exists, else torchvision's ImageFolder on ../shared (the seed's own reader)."""
    if PAYLOAD.is_file():
        data = np.load(PAYLOAD)
        n = len(data["labels"]) if limit is None else min(limit, len(data["labels"]))
        return JpegSet(data["jpeg"], data["offsets"][: n + 1], data["labels"][:n], transform)
    if not IMAGE_FOLDER.is_dir():
        raise SystemExit(f"no {PAYLOAD} and no {IMAGE_FOLDER}: run bench/payload.py where ../shared exists")
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(IMAGE_FOLDER), transform=transform)
    if limit is not None and limit < len(folder):
        # every class, not only the first: `limit` images spread evenly over the folder
        keep = np.linspace(0, len(folder) - 1, limit).round().astype(int)
        return torch.utils.data.Subset(folder, keep.tolist())
    return folder


def uint8_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` decoded images as our loop keeps them: uint8 [n, 3, 32, 32] and int64 labels."""
    dataset = jpeg_dataset(limit=n)
    images, labels = [], []
    for i in range(len(dataset)):
        image, label = dataset[i]
        images.append(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)
