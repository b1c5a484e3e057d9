"""Reading and writing files: every write is atomic (a reader never sees a half-written file).

Text, JSON and YAML (`write_text`, `write_json`, `write_yaml`, `read_yaml`), CSV (`write_csv`,
`read_csv`: every CSV xtl writes or reads goes through these two) and matplotlib figures
(`pyplot`: the one place the backend is chosen; `save_figure`).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping, Sequence

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
    if path.is_dir():
        raise XtlError(f"cannot write {path}: it is a folder; give a file name (or remove the folder)")
    check_output_folder(path.parent, f"cannot write {path}: its folder")
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


def check_output_folder(folder: str | os.PathLike, what: str) -> Path:
    """`folder` if it is one or can be made (nothing is created); else an `XtlError` saying `what`
    (e.g. "option --runs-dir") is a file, or lies inside one."""
    folder = Path(folder)
    for above in (folder, *folder.parents):
        if above.exists():
            if not above.is_dir():
                inside = "" if above == folder else f" (inside {above}, a file)"
                raise XtlError(f"{what} {folder} is a file{inside}, not a folder; give a folder")
            break
    return folder


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
    write_text(path, dump_yaml(data))


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """`rows` (dicts) as CSV with a header, atomically; `columns`: the header and its order (default: the
    first row's keys). Without rows or columns the file is empty. Lines end in a newline alone (no \\r)."""
    rows = list(rows)
    columns = list(columns if columns is not None else rows[0] if rows else [])
    buffer = io.StringIO()
    if columns:
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_csv(path: str | os.PathLike, floats: bool = False, text: Collection[str] = (),
             missing_ok: bool = False) -> list[dict[str, Any]]:
    """The rows of a CSV with a header, as dicts in column order: strings, or with `floats` every
    value as a float except the columns named in `text`. `missing_ok`: no file reads as no rows."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if floats:
        return [{k: v if k in text else float(v) for k, v in row.items()} for row in rows]
    return rows


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string (it wants `1.0e-4`); people write `1e-4` for a learning rate."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _AliasRefused(yaml.YAMLError):
    """An alias (`*name`) met while composing: raised before anything is expanded."""


def _refuse_aliases(self, parent, index):
    # A "billion laughs" file expands a few hundred bytes into gigabytes through aliases; xtl writes
    # none (`dump_yaml`) and its settings never need one, so the first alias stops the reading.
    if self.check_event(yaml.AliasEvent):
        raise _AliasRefused(f"alias *{self.peek_event().anchor} at {self.peek_event().start_mark}".strip())
    return yaml.SafeLoader.compose_node(self, parent, index)


_Loader.compose_node = _refuse_aliases

# Settings files are a few KB; a larger one is a mistake (or a probe), read no further than this.
MAX_YAML_BYTES = 4 * 1024 * 1024


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML file at `path` (YAML 1.1 with `1e-4` read as a float). Files over `MAX_YAML_BYTES`,
    with aliases (`&name` / `*name`) or nested too deeply are refused with an `XtlError` naming them."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise XtlError(f"{path} is larger than {MAX_YAML_BYTES // (1024 * 1024)} MB, too large for a settings file")
    return _load_yaml(raw.decode(), str(path))


def parse_yaml_scalar(text: str, where: str = "option") -> Any:
    """A command-line value read as YAML would read it (`3` -> 3, `1e-4` -> 0.0001, `[a, b]` -> list)."""
    return _load_yaml(text, where) if text.strip() else ""


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except _AliasRefused:
        raise XtlError(f"{where} uses YAML aliases (&/*), which xtl does not accept; write the values out") from None
    except RecursionError:
        raise XtlError(f"{where} nests too deeply to be a settings file") from None


class _Dumper(yaml.SafeDumper):
    """Writes a value shared by two keys twice, never as an anchor and an alias (`read_yaml` refuses those)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def pyplot():
    """`matplotlib.pyplot`, for every figure xtl draws: on the first call, if nothing imported pyplot
    before, the Agg backend is selected (files only: no window, no display needed); a backend chosen
    before (a notebook's) is kept, as figures are only ever saved."""
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_figure_path(path: str | os.PathLike) -> str:
    """The image format of a figure file `path` (its extension; png without one); an `XtlError` if
    matplotlib cannot write that format, or `path` is a folder or lies inside a file."""
    path = Path(path)
    from matplotlib.backend_bases import FigureCanvasBase

    kind = path.suffix.lstrip(".").lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if kind not in known:
        raise XtlError(f"cannot write {path}: a figure is saved as {', '.join('.' + k for k in sorted(known))}, "
                       f"not .{kind}; give a file name with one of these")
    if path.is_dir():
        raise XtlError(f"cannot write {path}: it is a folder; give a file name (or remove the folder)")
    check_output_folder(path.parent, f"cannot write {path}: its folder")
    return kind


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically and close it."""
    plt = pyplot()
    try:
        kind = check_figure_path(path)
    except XtlError:
        plt.close(fig)
        raise
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=kind, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
