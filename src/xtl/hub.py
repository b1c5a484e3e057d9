"""Downloads from the internet (hub weights, data sets), checked quickly before they start.

Offline, the libraries xtl downloads with fail slowly and loudly: huggingface_hub retries with
back-off for 30-60 s per file (timm, transformers, datasets), and torch.hub / torchvision's data
sets use urllib without a timeout (a dropped connection waits for minutes) and end in a traceback.
So before anything is downloaded, `unreachable(url)` tries one TCP connection to the host with a
short timeout (once per host and process). Where it fails:

- the Hugging Face libraries are switched to their offline mode for the rest of the process
  (`hf_hub_check`): files already in the cache still load, missing ones fail at once;
- the caller raises one line saying what is missing and the offline alternative (`--weights
  FILE`, an image folder, `$XTL_WEIGHTS_DIR`).

`HF_HUB_OFFLINE=1` (or `TRANSFORMERS_OFFLINE`, `HF_DATASETS_OFFLINE`) is taken at its word: no
connection is tried. `XTL_NETWORK_TIMEOUT` sets the timeout in seconds (default 3).
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlsplit

from xtl.errors import XtlError

_checked: dict[str, str | None] = {}  # host:port -> None (reachable) or why not; once per process


def timeout() -> float:
    try:
        value = float(os.environ.get("XTL_NETWORK_TIMEOUT") or 3.0)
    except ValueError:
        raise XtlError(f"XTL_NETWORK_TIMEOUT must be a number of seconds, not {os.environ['XTL_NETWORK_TIMEOUT']!r}") from None
    return value if value > 0 else 3.0


def unreachable(url: str) -> str | None:
    """None when a TCP connection to `url`'s host opens within `timeout()` seconds, else why not
    (`host: reason`, one line)."""
    parts = urlsplit(url if "//" in url else f"https://{url}")
    host = parts.hostname or url
    port = parts.port or (80 if parts.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key not in _checked:
        seconds = timeout()
        try:
            with socket.create_connection((host, port), timeout=seconds):
                _checked[key] = None
        except socket.timeout:
            _checked[key] = f"{host}: no answer within {seconds:g} s"
        except OSError as err:
            _checked[key] = f"{host}: {_reason(err)}"
    return _checked[key]


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ----------------------------------------------------------------------------- Hugging Face


def hf_offline_by_env() -> bool:
    """Whether the environment puts the Hugging Face libraries offline."""
    true = {"1", "ON", "YES", "TRUE"}
    return any((os.environ.get(name) or "").upper() in true
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_hub_check() -> str | None:
    """Call before asking the Hugging Face hub for anything. None when the hub can be reached;
    otherwise why not, with the Hugging Face libraries switched to offline mode (cached files
    load, missing ones fail at once instead of after a minute of retries)."""
    if "hf-offline" in _checked:
        return _checked["hf-offline"]
    if hf_offline_by_env():
        return "HF_HUB_OFFLINE is set"
    reason = unreachable(hf_endpoint())
    if reason is not None:
        _checked["hf-offline"] = reason
        set_hf_offline()
    return reason


def set_hf_offline() -> None:
    """Put huggingface_hub, transformers and datasets in offline mode for this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # for the libraries imported from now on
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def is_offline_error(err: BaseException) -> bool:
    """Whether a hub library's error means "not in the cache, and the network could not be asked"."""
    names = {type(e).__name__ for e in _chain(err)}
    text = " ".join(str(e) for e in _chain(err))
    return bool(names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout",
                         "URLError", "gaierror"}) or any(
        words in text for words in ("offline mode", "couldn't connect", "Couldn't reach", "cannot find the requested files"))


def _chain(err: BaseException):
    seen = 0
    while err is not None and seen < 10:
        yield err
        err = err.__cause__ or err.__context__
        seen += 1
