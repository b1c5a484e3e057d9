"""User-facing errors: the CLI prints them as one line, without a traceback.

Long jobs (fine-tuning, explaining, scoring) also treat SIGTERM like Ctrl-C while they run, so a
scheduler's or `kill`'s stop unwinds normally: what is finished stays on disk, temporary files are
removed, and running the command again (`--resume` for fine-tuning) continues.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class XtlError(Exception):
    """A problem with the user's input (a file, an option, a run directory)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into what Ctrl-C raises (the CLI reports both the same way)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def sigterm_as_interrupt(on_interrupt: Callable[[], str | None] | None = None) -> Iterator[None]:
    """Raise `Interrupted` on SIGTERM inside the block (main thread only); one-shot: a second
    SIGTERM during the unwinding kills as usual. The previous handler is restored afterwards.

    On Ctrl-C or SIGTERM, the line `on_interrupt()` returns (what is kept, how to continue) goes
    to stderr before the interrupt propagates (the CLI then exits with status 130).
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        raise Interrupted(signum)

    if main:
        signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt:
        message = on_interrupt() if on_interrupt is not None else None
        # Ctrl-C reaches every process of a multi-process command (its process group): one says it
        if message and all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK")):
            print(f"interrupted: {message}", file=sys.stderr, flush=True)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends (main thread only), then deliver the signal as it
    would have been delivered (`sigterm_as_interrupt`'s handler, Ctrl-C's KeyboardInterrupt): for
    writes that belong together and are quick (an epoch's weights and checkpoint), so that what an
    interrupt's message says is kept is on disk. A second signal inside the block is not held: it
    interrupts at once (atomic writes keep the previous files; the message must say so)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}
    held: list[int] = []

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    def hold(signum, frame):
        held.append(signum)
        if len(held) > 1:  # asked twice: now
            restore()
            signal.raise_signal(signum)

    for s in signals:
        signal.signal(s, hold)
    try:
        yield
    finally:
        if len(held) <= 1:
            restore()
            if held:
                signal.raise_signal(held[0])


@contextmanager
def gpu_out_of_memory(message: Callable[[], str]) -> Iterator[None]:
    """Turn CUDA's out-of-memory error into one line, `message()`, after freeing the cached memory."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise XtlError(message()) from None
