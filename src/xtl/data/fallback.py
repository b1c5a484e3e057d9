"""CIFAR-10 for a machine without `../shared`: the default source's stand-in.

The default data source, `../shared/data/cifar10`, is an image folder that exists only on the
machines that have `../shared`. Where it is absent, `open_source` takes CIFAR-10 from torchvision
instead, downloaded once into `$XTL_DATA_CACHE` (default `~/.cache/xtl`), and says so in one line
on stderr. Only the default falls back: a folder the user names must exist.

Same split semantics: the stand-in lists the images in the folder's canonical order (classes
interleaved, each class in the original order; `_torchvision_source(folder_order=True)`), so ids
are the same positions with the same labels and a seeded split (paper or stratified random)
names the same images. One difference: the folder holds JPEG re-encodings of CIFAR-10 (quality
about 75), torchvision the original pixels, so the numbers of a run differ slightly between them.
(Plain `torchvision:cifar10` keeps torchvision's own order, in which classes are not interleaved:
its paper split's first 5,000 training images are only roughly class-balanced.)

Offline, without the folder, the download fails and `fallback_source` raises one line saying what
to provide.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

from xtl.data.sources import DownloadFailed, Source, _torchvision_source, data_cache_dir
from xtl.errors import XtlError

DEFAULT_SOURCE = "../shared/data/cifar10"
FALLBACK = "torchvision:cifar10"
_announced: set[str] = set()  # one line per process, however often the source is opened


def fallback_source(spec: str = DEFAULT_SOURCE) -> Source:
    """CIFAR-10 from torchvision in the order of the missing folder `spec`; one-line error offline."""
    cache = shown_path(data_cache_dir())
    try:
        source = _torchvision_source("cifar10", FALLBACK, folder_order=True)
    except (DownloadFailed, OSError, RuntimeError, EOFError, tarfile.TarError) as err:  # URLError is an OSError
        reason = err.reason if isinstance(err, DownloadFailed) else short_reason(err)
        raise XtlError(
            f"no CIFAR-10 here: {spec} is missing and the download to {cache} failed "
            f"({reason}; no network?); pass --source DIR (an image folder DIR/{{train,test}}/<class>/*) "
            "or connect once to download it"
        ) from None
    source.spec = f"{FALLBACK} in {cache} ({spec} not found)"
    if spec not in _announced:  # after the download (torchvision shows its own progress), not before a failure
        _announced.add(spec)
        print(f"data: {spec} not found; using CIFAR-10 from torchvision (downloaded once to {cache})",
              file=sys.stderr, flush=True)
    return source


def shown_path(path: Path) -> str:
    """`path` with the home folder written as `~`."""
    try:
        return "~/" + str(Path(path).relative_to(Path.home()))
    except ValueError:
        return str(path)


def short_reason(err: BaseException, limit: int = 160) -> str:
    """An exception as `Type: message` on one line: its first sentence, cut to `limit` characters."""
    text = " ".join(str(err).split())
    text = text.split(". ", 1)[0].rstrip(".")
    reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."
