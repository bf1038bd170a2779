"""Panel for ``/walls``: the wall profile C/ε = (L(θ* + t·r(u)·u) − L(θ*))/ε against t = radius/r(u).

Per ray family the median across rays with 25–75% and 5–95% bands (log-log), and the
references t² (a quadratic wall) and t⁴; C/ε = 1 at t = 1 by construction. Log axes; where
some ray dips below L(θ*) (C < 0, off a minimum) the C axis is symmetric-log, linear within the
floor fraction of ε.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .data import attr, number, subgroups, values
from .style import empty

TITLE = "basin walls"


def draw(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """Median C/ε with quantile bands per family, t² and t⁴ references."""
    t_ref: np.ndarray | None = None
    shown: list[np.ndarray] = []
    for i, name in enumerate(subgroups(analysis)):
        q, t = values(analysis, f"{name}/profile_quantiles"), values(analysis, f"{name}/t")
        if t is None and isinstance(attr(analysis, "t"), list):
            t = np.asarray(attr(analysis, "t"), dtype=float)
        if q is None or t is None or q.ndim != 2 or q.shape[0] != 5 or q.shape[1] != t.size:
            continue
        color = f"C{i}"
        ax.fill_between(t, q[0], q[4], alpha=0.15, color=color, linewidth=0)
        ax.fill_between(t, q[1], q[3], alpha=0.3, color=color, linewidth=0)
        ax.plot(t, q[2], color=color, label=f"{name}: median, 25–75%, 5–95%")
        t_ref = t if t_ref is None else t_ref
        shown.append(q[np.isfinite(q)])
    if t_ref is None:
        empty(ax, TITLE, "no wall profiles stored")
        return
    for p, style in ((2, ":"), (4, "--")):
        ax.plot(t_ref, t_ref ** p, style, color="0.5", lw=0.8, label=f"t^{p}")
    ax.set_xscale("log")
    if all((q > 0).all() for q in shown):
        ax.set_yscale("log")
    else:  # C < 0 somewhere (a point below L(θ*)): linear within the floor fraction of ε
        floor = number(attr(analysis, "floor_fraction")) or 0.01
        ax.set_yscale("symlog", linthresh=floor)
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_xlabel("t = radius / r(u)")
    eps = number(attr(analysis, "walls_epsilon"))
    ax.set_ylabel("C / ε" + (f"  (ε = {eps:g} loss units)" if eps is not None else ""))
    ax.set_title(TITLE + ": L(θ* + t·r(u)·u) − L(θ*)")
    ax.legend(loc="upper left")
