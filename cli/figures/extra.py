"""Small panels for groups with no picture of their own: ``/evidence`` (the terms of the Laplace
log evidence) and ``/hessian_blocks`` (λ_max per block of parameters)."""

from __future__ import annotations

from typing import Any

import numpy as np

from basins.record import EIGEN_UNITS

from .data import attr, number, values
from .style import block_bars, empty, set_scale, unit_label

EVIDENCE_TITLE = "Laplace log evidence"
BLOCKS_TITLE = "Hessian per block of parameters"


def draw_evidence(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """Horizontal bars: log p(D|w*) + log Occam factor = log p(D) (with its interval); the Occam
    factor's log p(w*) term (log p(w*) + (P/2)·log 2π − ½·log det Λ) is named in its label."""
    prior = number(attr(analysis, "log_prior"))
    occam = "log Occam factor" + (f"\n(log p(w*) = {prior:.4g} in it)" if prior is not None else "")
    terms = [("log p(D | w*)", "log_likelihood"), (occam, "log_occam"), ("log p(D)", "log_evidence")]
    rows = [(label, number(attr(analysis, key))) for label, key in terms]
    rows = [(label, v) for label, v in rows if v is not None]
    if not rows:
        empty(ax, EVIDENCE_TITLE, "no evidence terms stored")
        return
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [v for _, v in rows], color=["C0"] * (len(rows) - 1) + ["C3"], height=0.6)
    ci = attr(analysis, "log_evidence_ci")
    if rows[-1][0] == "log p(D)" and isinstance(ci, list) and len(ci) == 2 and None not in ci and ci[0] != ci[1]:
        v = rows[-1][1]
        ax.errorbar([v], [y[-1]], xerr=[[v - ci[0]], [ci[1] - v]], fmt="none", color="black", label="interval")
        ax.legend(loc="lower right")
    ax.set_yticks(y, [label for label, _ in rows])
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel("nats")
    ax.set_title(f"{EVIDENCE_TITLE} ({attr(analysis, 'method')})" if attr(analysis, "method") else EVIDENCE_TITLE)


def draw_blocks(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """λ_max ± residual per block as bars."""
    drawn = block_bars(ax, analysis, "lambda_max", BLOCKS_TITLE)
    if drawn is None:
        return
    x, lam = drawn
    res = values(analysis, "lambda_max_residual")
    ax.bar(x, lam, yerr=None if res is None else np.abs(res), color="C0", capsize=2)
    set_scale(ax, "y", lam)
    ax.set_ylabel(unit_label("λ_max ± residual", EIGEN_UNITS))
    ax.set_title(BLOCKS_TITLE)
