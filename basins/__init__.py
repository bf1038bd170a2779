"""basins: the geometry of loss basins of trained PyTorch models.

The library is silent: it returns tensors and dataclasses and raises
:class:`basins.errors.BasinsError` subclasses; the ``basins`` command line formats them.

Layers (README, "Architecture"): :mod:`basins.linalg` (operators, Lanczos, SLQ, trace) →
:mod:`basins.engine` (the full-data :class:`Problem`) → :mod:`basins.analyses` (one module
per command) and :mod:`basins.files` (loading, reports) → ``basins.cli``;
:func:`basins.open_problem` builds a Problem from files as the CLI does. Importing
``basins`` imports no torch: :class:`Problem` and :class:`ParamSpace` load on first use.
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import BasinsError, ComputeError, InputError, ReportError

if TYPE_CHECKING:
    from .engine.params import ParamSpace
    from .engine.problem import HVP_ROUTES, Problem
    from .problems import OpenedProblem, open_problem

__all__ = [
    "__version__",
    "BasinsError",
    "ComputeError",
    "InputError",
    "ReportError",
    "ParamSpace",
    "Problem",
    "HVP_ROUTES",
    "open_problem",
    "OpenedProblem",
]

_LAZY = {"Problem": "basins.engine.problem", "HVP_ROUTES": "basins.engine.problem", "ParamSpace": "basins.engine.params",
         "open_problem": "basins.problems", "OpenedProblem": "basins.problems"}


def __getattr__(name: str) -> Any:
    """Import the engine (and torch) only when :class:`Problem` or :class:`ParamSpace` is used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'basins' has no attribute {name!r}")
