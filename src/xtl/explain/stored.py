"""Where `xtl explain` keeps a run's maps, keyed by everything they depend on.

    runs/<name>/explanations/<split>/<method>/<key>/key.json
    runs/<name>/explanations/<split>/<method>/<key>/batch_<k>_<first>-<last>.safetensors

`key.json` says what the maps depend on: the method and its options, the class each map explains
(`target`: predicted or true), the batch size, the model (a hash of model.safetensors, its input size
and normalisation) and a hash of the split (its ids, labels and images); `<key>` is a hash of it, as
the faithfulness cache keys its batches (`xtl.faithfulness.cache`). Explaining with any of these
changed writes a new set instead of reusing the old one; sets of other weights, or of an older
layout (`SET_LAYOUT`), are removed then.

Readers take one set whole, never shards of two: the newest set of the run's current weights (and,
where they ask, of these images and this target), its shards from position 0 on without overlaps.
Shards of the layout before the key (directly in `<method>/`) cannot be checked and are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from xtl.errors import XtlError
from xtl.io import write_json

KEY_FILE = "key.json"
# 2: a `predicted` target is the class the evaluation predicted (`xtl.models.class_probabilities`), not the
# map's own float32 argmax, which can differ under bf16 (issue 28); sets of another layout are never read
SET_LAYOUT = 2
SHARD = re.compile(r"^batch_(\d+)_(\d+)-(\d+)\.safetensors$")
_digests: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """A hash of a file's bytes (remembered per path, size and modification time)."""
    stat = os.stat(path)
    memo = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _digests:
        digest = hashlib.blake2b(digest_size=8)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _digests[memo] = digest.hexdigest()
    return _digests[memo]


def images_digest(part) -> str:
    """A hash of a split part's ids, labels and images (`xtl.data.SplitPart`)."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in (torch.as_tensor(part.ids), part.labels, part.images):
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        # streamed images (xtl.data.stream) are hashed a chunk at a time: the same bytes in the same order
        for chunk in (tensor.chunks() if hasattr(tensor, "chunks") else (tensor,)):
            digest.update(chunk.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(run) -> dict:
    """What the maps depend on of the run's model: its weights file's hash and preprocessing."""
    preprocess = run.preprocess()
    return {"weights": file_digest(run.weights_path), "input_size": int(preprocess.size),
            "mean": [float(v) for v in preprocess.mean], "std": [float(v) for v in preprocess.std]}


def set_info(run, split: str, method: str, target: str, batch_size: int, options: dict | None, images: str) -> dict:
    """key.json of a set of maps: everything its maps depend on."""
    return {"method": method, "split": split, "target": target, "batch_size": int(batch_size),
            "options": dict(options or {}), "images": images, "layout": SET_LAYOUT, **model_identity(run)}


def set_key(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]


def method_folder(run, split: str, method: str) -> Path:
    return Path(run.path) / "explanations" / split / method


def open_set(run, info: dict) -> Path:
    """The folder of the set `info` describes, ready for shards: key.json (re)written (so it is the
    newest set), sets of other weights and shards of the unkeyed layout removed."""
    parent = method_folder(run, info["split"], info["method"])
    folder = parent / set_key(info)
    if parent.is_dir():
        for entry in parent.iterdir():
            if entry.is_file() and SHARD.match(entry.name):  # the layout before keys: unverifiable
                entry.unlink(missing_ok=True)
            elif entry.is_dir() and entry != folder:
                stored = _read_info(entry)
                if stored is None or stored.get("weights") != info["weights"] or stored.get("layout") != SET_LAYOUT:
                    shutil.rmtree(entry, ignore_errors=True)
    write_json(folder / KEY_FILE, info)
    return folder


def drop_overlapping(folder: Path, planned: list[str]) -> None:
    """Remove the shards of `folder` that overlap a planned shard under another name (the last,
    shorter batch of an earlier call with fewer images), so that one set never holds a row twice."""
    ranges = [_range(name) for name in planned]
    for shard in folder.glob("batch_*.safetensors"):
        span = _range(shard.name)
        if span is None or (shard.name not in planned and any(a <= span[1] and span[0] <= b for a, b in ranges)):
            shard.unlink(missing_ok=True)


def chosen_set(run, method: str, split: str, target: str | None = None, images: str | None = None) -> Path | None:
    """The one set readers use: of the run's current model (and `images` where given), options none;
    of `target` if there is such a set, else of the other target (callers check each map's class);
    the newest of those."""
    parent = method_folder(run, split, method)
    if not parent.is_dir():
        return None
    try:
        identity = model_identity(run)
    except Exception:  # no weights, or an unreadable run: nothing stored can be trusted
        return None
    candidates = []
    for folder in parent.iterdir():
        info = _read_info(folder) if folder.is_dir() else None
        if info is None or folder.name != set_key(info) or info.get("options") or info.get("layout") != SET_LAYOUT:
            continue
        if any(info.get(k) != v for k, v in identity.items()) or (images is not None and info.get("images") != images):
            continue
        newest = (folder / KEY_FILE).stat().st_mtime_ns
        candidates.append((target is None or info.get("target") == target, newest, folder.name, folder))
    return max(candidates)[-1] if candidates else None


def shard_files(folder: Path | None) -> list[Path]:
    """The shards of a set in order from position 0, as long as they follow on without gap or overlap."""
    if folder is None:
        return []
    spans = [(span, shard) for shard in folder.glob("batch_*.safetensors") if (span := _range(shard.name))]
    chain, start = [], 0
    for (first, last), shard in sorted(spans, key=lambda s: (s[0][0], -s[0][1], s[1].name)):
        if first == start:
            chain.append(shard)
            start = last + 1
    return chain


def _range(name: str) -> tuple[int, int] | None:
    found = SHARD.match(name)
    return (int(found.group(2)), int(found.group(3))) if found else None


def _read_info(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


SHARD_KEYS = {"raw": torch.float32, "targets": torch.int64, "ids": torch.int64}


def load_shard(shard: Path) -> dict[str, torch.Tensor]:
    """The tensors of one shard (`raw` [n, h, w] float32, `targets` and `ids` [n] int64), checked
    before anything reads them: written for this set (its metadata names the set's key, so a shard
    copied from another run's or another setting's set is refused), the names, dtypes and shapes the
    writer gives, n equal to the positions in the shard's name, and every map value finite. Anything
    else is one `XtlError` naming the file and the way out (remove it: `xtl explain` writes it anew)."""
    from safetensors import safe_open

    def damaged(reason: str) -> XtlError:
        return XtlError(f"stored map shard {shard} is damaged or not this set's ({reason}); remove it, and "
                        "xtl explain writes it anew")

    span = _range(shard.name)
    if span is None:
        raise damaged("its name is not batch_<k>_<first>-<last>.safetensors")
    n = span[1] - span[0] + 1
    try:
        with safe_open(str(shard), framework="pt") as f:
            metadata, names = f.metadata() or {}, set(f.keys())
            if metadata.get("set") != shard.parent.name:
                raise damaged(f"it was written for set {metadata.get('set')!r}, not {shard.parent.name!r}")
            if names != set(SHARD_KEYS):
                raise damaged(f"tensors {', '.join(sorted(names)) or 'none'}, not raw, targets and ids")
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in SHARD_KEYS}
            if len(shapes["raw"]) != 3 or shapes["targets"] != (n,) or shapes["ids"] != (n,) or shapes["raw"][0] != n:
                raise damaged(f"shapes {shapes}, not {n} maps of positions {span[0]} to {span[1]}")
            tensors = {key: f.get_tensor(key) for key in SHARD_KEYS}
    except XtlError:
        raise
    except Exception as err:  # not a safetensors file, a header that does not fit the file, ...
        raise damaged(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}") from None
    for key, dtype in SHARD_KEYS.items():
        if tensors[key].dtype != dtype:
            raise damaged(f"{key} is {tensors[key].dtype}, not {dtype}")
    if not torch.isfinite(tensors["raw"]).all():
        raise damaged("its maps hold NaN or infinite values")
    if (tensors["targets"] < 0).any():
        raise damaged("a negative class index")
    return tensors


def shard_metadata(shard: Path) -> dict[str, str]:
    """What a shard's writer stores beside its tensors (`load_shard` checks it)."""
    return {"set": Path(shard).parent.name}
