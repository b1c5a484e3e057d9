"""The resume cache of a faithfulness job: each finished batch's scores of each method, on disk.

    runs/<name>/faithfulness_cache/<key>/<map set>/batch_<k>_<first>-<last>.safetensors

(a map set: a method in one reading, `method` or `method:reading`, or a reference map)

`<key>` is a fingerprint of everything the scores depend on (the model's weights, the images,
their labels and the scoring settings), so a killed job run again with the same command computes
only the batches that are missing, and a job with other settings or weights never reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from xtl.faithfulness.metrics import Curve
from xtl.faithfulness.readings import split_name
from xtl.faithfulness.results import MethodScores
from xtl.faithfulness.settings import FaithfulnessSettings
from xtl.io import atomic_path

CACHE = "faithfulness_cache"  # the folder, in a run (or the output folder)
PROTOCOL = 2  # of the scores a batch file holds (`cache_settings`)


def cache_folder(root: Path, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 settings: FaithfulnessSettings, pixel_std: Sequence[float]) -> Path:
    """The folder of these images' batches under `root` (e.g. `<run>/faithfulness_cache`)."""
    return Path(root) / fingerprint(model, images, labels, cache_settings(settings, pixel_std))


def cache_settings(settings: FaithfulnessSettings, pixel_std: Sequence[float]) -> dict:
    """The settings the scores depend on, as the key holds them. `protocol` 2: each metric's own fractions
    up to its maximum inclusive, signed maps in three readings, the logit share (caches of the first
    protocol are not read)."""
    key = dict(steps=settings.steps, baseline=settings.baseline, batch_size=settings.batch_size,
               explain_batch_size=settings.explain_batch_size, seed=settings.seed,
               method_options=settings.method_options or {}, protocol=PROTOCOL)
    if settings.cells is not None:  # only where not the default: the caches of per-pixel scoring stay valid
        key["grid"] = settings.cells
    if settings.baseline == "road":
        key["pixel_std"] = list(pixel_std)
    return key


def fingerprint(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: dict) -> str:
    """A key of everything a batch's scores depend on: weights, images, labels, settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for tensor in (images, labels):
        digest.update(str(tuple(tensor.shape)).encode())
        # images made a batch at a time (`xtl.inference.SplitInputs`) are hashed so: the same bytes in order
        for chunk in (tensor.chunks() if hasattr(tensor, "chunks") else (tensor,)):
            digest.update(chunk.detach().float().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def batch_path(cache: Path, name: str, k: int, part: slice) -> Path:
    return cache / name / f"batch_{k:05d}_{part.start}-{part.stop - 1}.safetensors"


def write_batch(cache: Path, name: str, k: int, part: slice, scores: MethodScores) -> None:
    from safetensors.torch import save_file

    tensors = {f"extra.{key}.values": value for key, value in scores.extras.items()}
    for column, curve in scores.curves.items():
        tensors.update({f"{column}.x": curve.x, f"{column}.values": curve.values, f"{column}.auc": curve.auc})
    metadata = {"explain_s": repr(scores.explain_seconds), "score_s": repr(scores.score_seconds)}
    with atomic_path(batch_path(cache, name, k, part)) as tmp:
        save_file({key: t.detach().cpu().clone() for key, t in tensors.items()}, str(tmp), metadata=metadata)


def read_batch(cache: Path, name: str, k: int, part: slice) -> MethodScores | None:
    """A finished batch's scores, or None (not there, or unreadable: then it is computed again)."""
    from safetensors import safe_open

    path = batch_path(cache, name, k, part)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        extras = {key.split(".")[1]: t for key, t in tensors.items() if key.startswith("extra.")}
        columns = sorted({key.rsplit(".", 1)[0] for key in tensors if not key.startswith("extra.")})
        curves = {c: Curve(tensors[f"{c}.x"], tensors[f"{c}.values"], tensors[f"{c}.auc"]) for c in columns}
        method, reading = split_name(name)
        return MethodScores(method, curves, float(metadata["explain_s"]), float(metadata["score_s"]), reading, extras)
    except Exception:
        return None
