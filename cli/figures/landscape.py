"""Panel for ``/landscape``: the loss along a 1-D slice or the line between two checkpoints
(a curve), or over a 2-D slice (filled contours with a colour bar, θ* marked at the origin).

Schema: attrs ``kind`` (1d | 2d | line), ``directions``, ``extent``, ``num_points``,
``loss_at_optimum``, and for a line ``barrier``, ``barrier_t``, ``loss_a``, ``loss_b``,
``epsilon``, ``same_basin``, ``other_model``; datasets ``t``, ``loss`` (1d, line) or ``x``,
``y``, ``loss[i, j]`` at ``(x[i], y[j])`` (2d).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .data import attr, number, units, values
from .style import empty, set_scale, unit_label

TITLE = "loss landscape"


def draw(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """Curve or contours by ``kind``."""
    kind = attr(analysis, "kind")
    if kind == "2d":
        _contours(ax, analysis)
    elif kind in ("1d", "line"):
        _curve(ax, analysis, kind)
    else:
        empty(ax, TITLE, f"unknown slice kind {kind!r}")


def _curve(ax: Any, analysis: dict[str, Any], kind: str) -> None:
    t, loss = values(analysis, "t"), values(analysis, "loss")
    if t is None or loss is None or t.size == 0 or t.shape != loss.shape:
        empty(ax, TITLE, "no curve stored")
        return
    loss_units = units(analysis, "loss", "loss units")
    ax.plot(t, loss, "-", label="full-data loss L")
    opt = number(attr(analysis, "loss_at_optimum"))
    if kind == "line":
        a, b = number(attr(analysis, "loss_a")), number(attr(analysis, "loss_b"))
        ax.plot([0, 1], [a if a is not None else np.nan, b if b is not None else np.nan], "ko", ms=4,
                label="θa (t = 0), θb (t = 1)")
        bt, barrier = number(attr(analysis, "barrier_t")), number(attr(analysis, "barrier"))
        if bt is not None and barrier is not None:
            top = max(x for x in (a, b) if x is not None) + barrier if a is not None or b is not None else None
            if top is not None:
                ax.axvline(bt, color="C3", ls="--", lw=0.8)
                ax.plot([bt], [top], "v", color="C3", ms=7, label=f"barrier {barrier:.3g} at t = {bt:.3g}")
        same = attr(analysis, "same_basin")
        eps = number(attr(analysis, "epsilon"))
        other = attr(analysis, "other_model")
        verdict = ("one basin" if same else "two basins") + (f" at ε = {eps:g}" if eps is not None else "")
        ax.set_title(f"loss on the line to {os.path.basename(str(other))}: {verdict}" if other else
                     f"loss on the line between checkpoints: {verdict}")
        ax.set_xlabel("t  (θ(t) = (1 − t)·θa + t·θb)")
    else:
        if opt is not None:
            ax.axhline(opt, color="0.4", ls=":", lw=0.8, label=f"L(θ*) = {opt:.4g}")
        ax.axvline(0, color="0.4", lw=0.5)
        ax.set_title(f"{TITLE}: 1-D slice ({attr(analysis, 'directions')} direction)")
        ax.set_xlabel(unit_label("step along the direction", units(analysis, "t")))
    set_scale(ax, "y", loss, decades=3)
    ax.set_ylabel(unit_label("loss L", loss_units))
    ax.legend(loc="best")


def _contours(ax: Any, analysis: dict[str, Any]) -> None:
    x, y, loss = values(analysis, "x"), values(analysis, "y"), values(analysis, "loss")
    if x is None or y is None or loss is None or loss.shape != (x.size, y.size):
        empty(ax, TITLE, "no 2-D grid stored (loss must be (x, y))")
        return
    z = np.where(np.isfinite(loss), loss, np.nan).T  # contourf wants z[j, i] at (x[i], y[j])
    fin = z[np.isfinite(z)]
    if fin.size == 0:
        empty(ax, TITLE, "no finite loss on the grid")
        return
    from matplotlib import colors

    lo, hi = float(fin.min()), float(fin.max())
    norm = colors.LogNorm(vmin=lo, vmax=hi) if lo > 0 and hi / lo > 1e3 else None
    levels = np.geomspace(lo, hi, 15) if norm is not None else 15
    cs = ax.contourf(x, y, z, levels=levels, norm=norm, cmap="viridis")
    ax.contour(x, y, z, levels=cs.levels, colors="white", linewidths=0.3, alpha=0.6)
    bar = ax.figure.colorbar(cs, ax=ax)
    bar.set_label(unit_label("loss L", units(analysis, "loss", "loss units")))
    ax.plot([0], [0], marker="*", color="red", ms=10, mec="white", mew=0.6, ls="none", label="θ*")
    ax.grid(False)
    axis_units = units(analysis, "x")
    ax.set_xlabel(unit_label("direction 1", axis_units))
    ax.set_ylabel(unit_label("direction 2", axis_units))
    ax.set_title(f"{TITLE}: 2-D slice ({attr(analysis, 'directions')} directions)")
    ax.legend(loc="upper right")
