"""Panel for ``/features``: the spectrum of the feature Gram matrix (nonzero spectrum of the
Gauss–Newton matrix G), eigenvalue against index on log-log axes, with the rank cutoff.

Eigenvalues at or below zero (rounding) cannot sit on a log axis; their number is noted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from basins.record import EIGEN_UNITS

from .data import attr, number, units, values
from .style import empty, note, unit_label

TITLE = "feature Gram spectrum (Gauss–Newton / NTK)"


def draw(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """μ_i against i (descending), the cutoff as a dashed line, rank and participation ratio noted."""
    mu = values(analysis, "eigenvalues")
    if mu is None or mu.size == 0:
        empty(ax, TITLE, "no eigenvalues stored")
        return
    mu = np.sort(mu[np.isfinite(mu)])[::-1]
    idx = np.arange(1, mu.size + 1)
    pos = mu > 0
    ax.plot(idx[pos], mu[pos], ".-", ms=2.5, lw=0.8, label="eigenvalue μ_i")
    ax.set_xscale("log")
    ax.set_yscale("log")
    cutoff = number(attr(analysis, "cutoff"))
    rank = attr(analysis, "rank")
    if cutoff is not None and cutoff > 0:
        ax.axhline(cutoff, color="C3", ls="--", lw=0.8, label=f"rank cutoff {cutoff:.2g}")
    if isinstance(rank, int) and 0 < rank <= mu.size:
        ax.axvline(rank, color="0.4", ls=":", lw=0.8, label=f"numerical rank {rank:,}")
    ax.set_xlabel("index i (descending)")
    ax.set_ylabel(unit_label("eigenvalue μ", units(analysis, "eigenvalues", EIGEN_UNITS)))
    ax.set_title(TITLE)
    lines = []
    pr = number(attr(analysis, "participation_ratio"))
    if pr is not None:
        lines.append(f"participation ratio {pr:.4g}")
    P = problem.get("num_params")
    if isinstance(P, int) and isinstance(rank, int):
        lines.append(f"flat directions of G: P − rank = {P - rank:,}")
    if (~pos).any():
        lines.append(f"{int((~pos).sum()):,} eigenvalues ≤ 0 not shown")
    if lines:
        note(ax, "\n".join(lines), "lower left")
    ax.legend(loc="upper right")
