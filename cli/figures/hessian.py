"""Panel for ``/hessian``: the extreme eigenvalues found by Lanczos with their error bars.

Each end (top, and bottom when computed) is a series against its index from that end (1 = most
extreme). The bars are the stored error bounds (an eigenvalue of the exact Hessian lies within
λ ± bound, HVP rounding included), the Lanczos residuals where a report predates bounds; open
markers are unconverged Ritz values. Symmetric-log axis when eigenvalues of both signs or many
decades are shown.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from basins.record import EIGEN_UNITS

from .data import attr, number, units, values
from .style import empty, note, set_scale, unit_label

TITLE = "extreme Hessian eigenvalues (Lanczos)"
_ENDS = (("top", ""), ("bottom", "bottom_"))


def draw(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """Eigenvalues ± error bound against index from each end; the trace ± s.e. in a note."""
    shown: list[np.ndarray] = []
    worst = 0.0
    which = attr(analysis, "which")
    for color, (label, prefix) in zip(("C0", "C1"), _ENDS):
        lam = values(analysis, prefix + "eigenvalues")
        if lam is None or lam.size == 0:
            continue
        if not prefix and which == "bottom":
            label = "bottom"
        bound = values(analysis, prefix + "error_bounds")
        if bound is None:
            bound = values(analysis, prefix + "residuals")
        conv = values(analysis, prefix + "converged")
        idx = np.arange(1, lam.size + 1)
        err = None if bound is None else np.abs(bound)
        ax.errorbar(idx, lam, yerr=err, fmt="o-" if label == "top" else "s-", lw=1.0, color=color,
                    label=f"{label} ± error bound")
        if conv is not None and not np.asarray(conv, dtype=bool).all():
            bad = ~np.asarray(conv, dtype=bool)
            ax.plot(idx[bad], lam[bad], "o", ms=6, mfc="white", mec=color, zorder=4, label=f"{label}: not converged")
        shown += [lam] + ([lam - err, lam + err] if err is not None else [])
        if err is not None and err.size:
            worst = max(worst, float(np.nanmax(err)))
    if not shown:
        empty(ax, TITLE, "no eigenvalues stored")
        return
    # symmetric-log: linear within the largest error bound (values that close to 0 are not told from 0)
    set_scale(ax, "y", np.concatenate(shown), linthresh=worst or None)
    ax.set_xlabel("index from the end (1 = most extreme)")
    ax.set_ylabel(unit_label("eigenvalue λ", units(analysis, "eigenvalues", EIGEN_UNITS)))
    ax.set_title(TITLE)
    lines = [f"largest error bound {worst:.2g}"]
    tr, se = number(attr(analysis, "trace")), number(attr(analysis, "trace_stderr"))
    if tr is not None:
        lines.append(f"trace {tr:.5g}" + (f" ± {se:.2g} (s.e.)" if se is not None else ""))
    note(ax, "\n".join(lines), "upper right")
    ax.legend(loc="best")
