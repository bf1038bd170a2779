"""Panel for ``/spectrum``: the SLQ spectral density (mean over probes) with its band across probes.

Draws the stored grid, density and band as they are (no re-smoothing). Log density axis, floored
eight decades below the band's peak so the empty regions between clusters stay readable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from basins.record import EIGEN_UNITS

from .data import attr, number, units, values
from .style import empty, unit_label

TITLE = "Hessian spectral density (SLQ)"


def draw(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """Density on the stored grid (linear in λ, or log10|λ| for ``scale = log``), band shaded."""
    grid, dens = values(analysis, "grid"), values(analysis, "density")
    lo, hi = values(analysis, "density_lower"), values(analysis, "density_upper")
    if grid is None or dens is None or grid.size == 0:
        empty(ax, TITLE, "no density stored")
        return
    coverage = number(attr(analysis, "coverage"))
    if lo is not None and hi is not None:
        band = f"{coverage:.0%} band across probes" if coverage else "band across probes"
        ax.fill_between(grid, lo, hi, alpha=0.3, linewidth=0, label=band)
    ax.plot(grid, dens, label="density (mean over probes)")
    top = float(np.nanmax(hi if hi is not None else dens))
    if top > 0:
        ax.set_yscale("log")
        ax.set_ylim(top * 1e-8, top * 2)
    log_scale = attr(analysis, "scale") == "log"
    ax.set_xlabel(unit_label("log10 |λ|", None) if log_scale else
                  unit_label("eigenvalue λ", units(analysis, "grid", EIGEN_UNITS)))
    ax.set_ylabel(unit_label("density", units(analysis, "density", "per decade of |λ|" if log_scale else None)))
    probes, steps = attr(analysis, "num_probes"), attr(analysis, "num_steps")
    ax.set_title(f"{TITLE}, {probes} probes × {steps} steps" if probes and steps else TITLE)
    tr, se = number(attr(analysis, "trace")), number(attr(analysis, "trace_stderr"))
    if tr is not None:  # in the legend, so it never overlaps it
        ax.plot([], [], " ", label=f"SLQ trace {tr:.4g}" + (f" ± {se:.2g} (s.e.)" if se is not None else ""))
    ax.legend(loc="upper right")
