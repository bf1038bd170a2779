"""Exceptions raised by basins.

The library never prints or exits; it raises one of these. The command line maps
:class:`InputError` (bad files, bad data, bad options) to exit code 2 and every other
:class:`BasinsError` (a failure while computing) to exit code 1.
"""

from __future__ import annotations

__all__ = ["BasinsError", "InputError", "ComputeError", "ReportError"]


class BasinsError(Exception):
    """Base class of every error basins raises on purpose."""


class InputError(BasinsError, ValueError):
    """The user's input (a file, the data, an option) is wrong; the message says how to fix it.

    ``param`` names the library parameter at fault (e.g. ``"num_probes"``), or None. The message
    names parameters, never command-line flags; the command line prefixes the flag whose
    destination is ``param`` (``--probes: num_probes must be ≥ 2 ...``).
    """

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ReportError(InputError):
    """A report file is missing, corrupt, foreign, of an unknown schema, or of another problem."""


class ComputeError(BasinsError, RuntimeError):
    """A computation failed at run time (non-finite loss, non-determinism, no convergence)."""
