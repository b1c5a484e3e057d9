"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from xtl.errors import XtlError

# Write failures that are the file system's, not a bug: reported as one line naming the file.
DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the process's file-size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    On any failure (an exception, Ctrl-C, SIGTERM raised as an exception) the temporary file is
    removed and `path` keeps its previous content. A full disk, a quota, a file-size limit or a
    read-only folder becomes an `XtlError` naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        _raise_disk_error(err, path)
        raise
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp_path, path)
    except Exception as err:
        _raise_disk_error(err, path)
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def disk_error(err: BaseException) -> int | None:
    """The errno of a file-system failure behind `err` (also when a library wrapped it), else None."""
    seen = set()
    while err is not None and id(err) not in seen and not isinstance(err, XtlError):  # XtlError: reported already
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_ERRORS:
            return err.errno
        # Rust writers (safetensors) report "... (os error 28)" in a message of their own type
        found = re.search(r"os error (\d+)", str(err))
        if found and int(found.group(1)) in DISK_ERRORS:
            return int(found.group(1))
        # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def _raise_disk_error(err: BaseException, path: Path) -> None:
    code = disk_error(err)
    if code is not None:
        exists = "its previous content is unchanged" if path.exists() else "nothing was written"
        raise XtlError(f"cannot write {path}: {DISK_ERRORS[code]} ({exists})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | os.PathLike, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string (it wants `1.0e-4`); people write `1e-4` for a learning rate."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | os.PathLike) -> Any:
    return yaml.load(Path(path).read_text(), Loader=_Loader)


def parse_yaml_scalar(text: str) -> Any:
    """A command-line value read as YAML would read it (`3` -> 3, `1e-4` -> 0.0001, `[a, b]` -> list)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
