"""The one progress report every long computation in basins passes to its ``callback``.

Lanczos, SLQ and the trace estimators (:mod:`basins.linalg`), and every analysis
(:mod:`basins.analyses`) call ``callback(Progress(...))`` after each unit of work; the command
line draws one progress bar from it (``cli.common.progress_bar``). It lives beside
:mod:`basins.errors` and :mod:`basins.record` rather than in ``basins.analyses`` because
:mod:`basins.linalg`, the lowest layer, reports progress too and imports only point down
(README, "Architecture"). This module imports nothing heavy, so every layer may use it.

Example:
    >>> seen: list[Progress] = []
    >>> seen.append(Progress("lanczos", 4, 200, "HVPs", info="2 converged"))
    >>> seen[-1].fraction
    0.02
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = ["Progress", "ProgressCallback", "relay"]


@dataclass(frozen=True)
class Progress:
    """State of a computation after one step.

    Attributes:
        phase: what is running, e.g. ``"lanczos"``, ``"trace"``, ``"slq"``, ``"hessian"``,
            ``"jacobian"``, ``"eigh"``, ``"radii"``, ``"walls"``.
        done: units of work done so far (the count actually spent, not an estimate).
        total: the budget in the same units, or None where it is not known.
        unit: the unit of ``done``/``total``: ``"HVPs"`` (Hessian-vector products),
            ``"matvecs"`` (products with a generic operator), ``"examples"``, ``"rays"``, or
            ``""`` for a step without a count.
        info: one short human-readable line about the state (residuals, counts of other work).
        max_residual: iterative eigensolvers: the largest relative residual of the wanted Ritz
            pairs (``nan`` while fewer Ritz values than wanted exist), else None.
        num_converged: iterative eigensolvers: how many wanted pairs converged, else None.
    """

    phase: str
    done: int
    total: int | None
    unit: str = "HVPs"
    info: str = ""
    max_residual: float | None = None
    num_converged: int | None = None

    @property
    def fraction(self) -> float | None:
        """``done / total`` in ``[0, 1]``, or None when the total is unknown or zero."""
        if not self.total:
            return None
        return min(1.0, max(0.0, self.done / self.total))


ProgressCallback = Callable[[Progress], None]
"""Signature of every ``callback`` argument in basins."""


def relay(callback: ProgressCallback | None, *, offset: int = 0, total: int | None = None,
          phase: str | None = None, unit: str | None = None) -> ProgressCallback | None:
    """A callback that forwards to ``callback`` with ``done`` shifted by ``offset`` and, where
    given, ``total``, ``phase`` and ``unit`` replaced (a sub-computation reporting in the units
    and budget of the whole). None when ``callback`` is None."""
    if callback is None:
        return None
    cb = callback

    def forward(p: Progress) -> None:
        whole = total if total is not None else None if p.total is None else p.total + offset
        cb(replace(p, done=p.done + offset, total=whole, phase=phase or p.phase,
                   unit=p.unit if unit is None else unit))

    return forward
