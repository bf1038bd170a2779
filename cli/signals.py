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

An interrupt is never swallowed. Python cannot propagate an exception out of a destructor, a
weakref or garbage-collection callback, or a callback from C++: it prints "Exception ignored" and
carries on, and the run used to go on, rewrite its report and exit 0. Here such an
:class:`Interrupted` is raised again in the main thread (:func:`_unraisable`, silently), every
report write and result print first calls :func:`check_interrupted`, and the exit code of a run
that received a signal is ``128 + signal`` whatever happened after (``basins.cli.__main__``).
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["Interrupted", "install", "ignore_signals", "received", "check_interrupted", "HANDLED"]

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


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal was received (its exception may have been swallowed)."""
    signum = received()
    if signum is not None:
        raise Interrupted(signum)


def _raise_in_main(signum: int) -> None:
    """Raise :class:`Interrupted` asynchronously in the main thread (at its next bytecode)."""
    main = threading.main_thread().ident
    if main is None:
        return
    cls = type(f"Interrupted{signum}", (Interrupted,), {"__init__": lambda self: Interrupted.__init__(self, signum)})
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main), ctypes.py_object(cls))


_previous_unraisable = sys.unraisablehook


def _unraisable(info: Any) -> None:
    """An :class:`Interrupted` that Python could not propagate (raised in a destructor or a callback
    from C): raise it again in the main thread, shortly, instead of printing it and carrying on."""
    if isinstance(info.exc_value, Interrupted):
        timer = threading.Timer(0.01, _raise_in_main, (info.exc_value.signum,))
        timer.daemon = True
        timer.start()
        return
    _previous_unraisable(info)


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
        return
    sys.unraisablehook = _unraisable
