"""Interrupts end a run cleanly: SIGINT, SIGTERM and SIGHUP all unwind the stack, so a report
being written is left as it was and its temporary file is removed, and the exit code is
``128 + signal number`` (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP).

The handlers are installed when ``basins.cli`` is imported, before click, rich or torch, so
an interrupt during start-up also exits with its code (not with a KeyboardInterrupt traceback
or a death by signal). The handler raises :class:`Interrupted`, a :class:`SystemExit`, so
``finally`` blocks and ``except BaseException`` clean-ups run. A second signal while the
first unwinds is ignored, so clean-up cannot itself be interrupted. A signal that arrives while a
module is being imported is delivered again every :data:`IMPORT_RETRY_SECONDS` until the import
is over: unwinding a half-imported torch module could abort the process.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

__all__ = ["Interrupted", "install", "ignore_signals", "received", "HANDLED"]

#: the signal that began unwinding the run, if any (:func:`received`)
_RECEIVED: list[int] = []

#: The signals that end a run cleanly.
HANDLED = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                            getattr(signal, "SIGHUP", None)) if s is not None)


class Interrupted(SystemExit):
    """Raised by the signal handler: ``code`` is ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def ignore_signals() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP from now on (clean-up or a finished run must not be cut short)."""
    try:
        for s in HANDLED:
            signal.signal(s, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


def received() -> int | None:
    """The signal number that interrupted this run, or None.

    Code that the interrupt unwinds can turn :class:`Interrupted` into another error (a library's
    clean-up that fails half-way, e.g. a half-imported module during ``torch.export.load``); the
    command line checks this before it reports an error, so that the run still ends as interrupted.
    """
    return _RECEIVED[0] if _RECEIVED else None


#: seconds between re-deliveries of a signal that arrived during an import
IMPORT_RETRY_SECONDS = 0.05


def _importing(frame: FrameType | None) -> bool:
    """Whether the interrupted code is inside an ``import`` (an importlib frame on the stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    if _importing(frame):
        # unwinding a half-run module body (torch registers kernels and C++ callbacks while its
        # modules import) has aborted the process (SIGABRT) instead of exiting: deliver the signal
        # again shortly, until the import is over
        main = threading.main_thread().ident
        if main is not None:
            timer = threading.Timer(IMPORT_RETRY_SECONDS, signal.pthread_kill, (main, signum))
            timer.daemon = True
            timer.start()
            return
    ignore_signals()  # unwinding has begun: later signals must not interrupt the clean-up
    _RECEIVED.append(signum)
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to :class:`Interrupted` (main thread only; no-op elsewhere)."""
    try:
        for s in HANDLED:
            signal.signal(s, _handler)
    except ValueError:  # not the main thread (e.g. imported by a test runner's worker thread)
        pass
