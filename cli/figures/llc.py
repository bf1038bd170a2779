"""Panel for ``/llc``: the SGLD chain traces behind the local learning coefficient.

Each chain's nβ·(L_B(w) − L_B(w*)) against draw (after burn-in); λ̂ is their mean, drawn as a
line with its ± s.e. band. Reports holding only the loss traces show L_B(w) against step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .data import attr, number, units, values
from .style import block_bars, empty, unit_label

TITLE = "local learning coefficient: SGLD chains"


def draw(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """One line per chain; λ̂ ± s.e. as a band; P/2 noted in the title."""
    tr = values(analysis, "llc_trace")
    ylabel = "nβ·(L_B(w) − L_B(w*))"
    xlabel = "draw (after burn-in)"
    if tr is None or tr.size == 0:
        tr = values(analysis, "loss_trace")
        ylabel, xlabel = unit_label("minibatch loss L_B(w)", units(analysis, "loss_trace", "loss")), "SGLD step"
    if tr is None or tr.size == 0:
        empty(ax, TITLE, "no chain traces stored")
        return
    tr = np.atleast_2d(tr)
    x = np.arange(tr.shape[1])
    for c, row in enumerate(tr):
        ax.plot(x, row, lw=0.7, alpha=0.75, color=f"C{c % 10}", label=f"chain {c}" if tr.shape[0] <= 8 else None)
    lam, se = number(attr(analysis, "llc")), number(attr(analysis, "llc_stderr"))
    if lam is not None and ylabel.startswith("nβ"):
        ax.axhline(lam, color="black", lw=1.2, label=f"λ̂ = {lam:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
        if se is not None:
            ax.axhspan(lam - se, lam + se, color="black", alpha=0.12, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    P = problem.get("num_params")
    ax.set_title(TITLE + (f" (P/2 = {P / 2:g})" if isinstance(P, int) else ""))
    ax.legend(loc="best", ncols=2)


BLOCKS_TITLE = "weight-refined LLC per block"


def draw_blocks(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """``/llc_blocks``: λ̂ per block as bars with their 95% intervals, P_B/2 as a tick per block."""
    drawn = block_bars(ax, analysis, "llc", BLOCKS_TITLE)
    if drawn is None:
        return
    x, lam = drawn
    lo, hi = values(analysis, "llc_ci_low"), values(analysis, "llc_ci_high")
    err = None if lo is None or hi is None else np.abs(np.vstack([lam - lo, hi - lam]))
    ax.bar(x, lam, yerr=err, color="C2", capsize=2)
    pb = values(analysis, "block_num_params")
    if pb is not None and pb.size == len(x):
        ax.scatter(x, pb / 2, marker="_", s=200, color="black", label="P_B/2")
        ax.legend(loc="best")
    ax.set_ylabel("λ̂ (95% interval)")
    ax.set_title(BLOCKS_TITLE)
