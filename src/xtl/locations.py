"""Where runs and their data are: run folders kept under the runs directory, data folders stored
as absolute paths (a run is read from any folder), and a run whose data folder is not where it
was named, in one line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from xtl.errors import XtlError

_REMOTE = ("hf:", "torchvision:")


def run_folder(runs_dir: str | os.PathLike, name: str, option: str = "option --name") -> Path:
    """`runs_dir / name`, where `name` must stay inside `runs_dir`: a relative path without `..`
    (a subfolder like `ablation/lr-1e-4` is fine)."""
    text = str(name)
    path = Path(text)
    if not text.strip() or path.is_absolute() or ".." in path.parts or path == Path("."):
        raise XtlError(f"{option} must name a folder inside the runs directory ({runs_dir}), not {text!r}; "
                       "to keep runs elsewhere, pass --runs-dir DIR")
    return Path(runs_dir) / path


def local_folder(spec: str) -> str | None:
    """The folder a data source spec names (`DIR`, `folder:DIR`, `hf:DIR` when DIR is a path),
    or None for a source from the internet (`hf:NAME`, `torchvision:NAME`, `cifar10`)."""
    from xtl.data.sources import HF_ALIASES

    spec = str(spec)
    if spec.startswith("folder:"):
        return spec[len("folder:"):]
    if spec.startswith("hf:"):
        rest = spec[len("hf:"):]
        return rest if os.path.isabs(rest) or rest.startswith(".") or os.path.isdir(rest) else None
    if spec.startswith(_REMOTE) or spec in HF_ALIASES:
        return None
    return spec


def stored_source(spec: str) -> str:
    """The source spec to store in a run: a folder that exists here as an absolute path (with its
    prefix), so the run reads the same data from any working folder; anything else as given (the
    default `../shared/data/cifar10`, where absent, still falls back to torchvision's copy)."""
    folder = local_folder(spec)
    if folder is None or not os.path.isdir(folder):
        return spec
    prefix = spec[: len(spec) - len(folder)]
    return prefix + os.path.abspath(folder)


def check_run_source(run_path: Path, config_path: Path, spec: str) -> None:
    """One line when a run's data folder is not where its config names it."""
    from xtl.data.fallback import DEFAULT_SOURCE

    folder = local_folder(spec)
    if folder is None or os.path.isdir(folder) or spec == DEFAULT_SOURCE:  # the default falls back, as in training
        return
    where = "" if os.path.isabs(folder) else f" (a path relative to the folder a command runs in, here {os.getcwd()})"
    raise XtlError(f"run {run_path}: its data folder {folder} does not exist{where}; the run was made elsewhere or "
                   f"the data moved: run the command where the run was made, or set source: in {config_path} "
                   "to the data's path")


class FirstStart:
    """Remove what a failed first start wrote, so the fixed command starts afresh (instead of
    "already exists", or `--resume` reusing the failed settings).

    A run folder this start created goes entirely (and the runs directory, when it created that
    too and it is empty); in a folder that existed, only the entries the start added go. Nothing
    is removed once an epoch is kept (`checkpoints/last.pt`): that is for `--resume`.
    """

    def __init__(self, run_path: Path) -> None:
        self.path = Path(run_path)
        self.created = [p for p in [self.path, *self.path.parents] if not p.exists()]  # deepest first
        self.before = set(os.listdir(self.path)) if self.path.is_dir() else None

    def undo(self) -> None:
        if (self.path / "checkpoints" / "last.pt").is_file():
            return
        if self.before is None:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self.created[1:]:
                try:
                    parent.rmdir()  # only when empty: another run may have started there meanwhile
                except OSError:
                    break
            return
        for name in set(os.listdir(self.path)) - self.before if self.path.is_dir() else ():
            entry = self.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
