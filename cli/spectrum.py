"""``basins spectrum MODEL``: the Hessian's spectral density by stochastic Lanczos quadrature.

Also the renderers ``basins summary`` uses for a report's ``/spectrum`` group
(:func:`summary_tables`, :func:`summary_row`) and :func:`sparkline`, a one-line text picture
of a density. Densities shown by ``summary`` are re-smoothed from the stored raw nodes and
weights (no HVPs).
"""

from __future__ import annotations

import math
from typing import Any

import click
import numpy as np
from rich.console import RenderableType

from basins.record import EIGEN_UNITS

from .common import Command, fmt, is_main_process, key_value_table, output_options, problem_options

_BLOCKS = "▁▂▃▄▅▆▇█"


@click.command()
@problem_options
@click.option("--probes", "num_probes", type=click.IntRange(min=1), default=10, show_default=True,
              help="Random probe vectors (the band is their spread).")
@click.option("--lanczos-steps", "num_steps", type=click.IntRange(min=1), default=80, show_default=True,
              help="Lanczos steps per probe (quadrature nodes).")
@click.option("--scale", type=click.Choice(["linear", "log"]), default="linear", show_default=True,
              help="Density grid: linear in λ, or log-spaced in |λ| (density per decade).")
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True),
              help="Gaussian broadening in grid units [default: 1% of the node range; 0.1 decade for log].")
@click.option("--points", "num_points", type=click.IntRange(min=10), default=500, show_default=True,
              help="Grid points of the density.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also draw the density with its band to this .png/.pdf/.svg (needs matplotlib: pip install 'basins[plot]').")
@output_options
def spectrum(**kw: Any) -> None:
    """Spectral density of the Hessian at the saved parameters (stochastic Lanczos quadrature).

    The density is (1/P) Σᵢ δ(λ − λᵢ) over the P eigenvalues of the full-data Hessian,
    Gaussian-broadened on a grid: per unit λ (loss / parameter²) with --scale linear, per decade
    of |λ| with --scale log; it integrates to about 1. Each of --probes random unit vectors runs
    its own Lanczos (full reorthogonalisation; the probes advance together, one block HVP per
    step), whose nodes and weights are the Gauss quadrature rule of that probe's spectral
    measure. The raw nodes and weights of every probe are kept (in --json and the report) so the
    density can be re-smoothed later with no HVPs. The band is the pointwise 95% interval
    across probes. SLQ does not resolve eigenvalues far below the smallest node: count
    near-zero eigenvalues with `basins nullity`.

    Cost: probes × Lanczos steps HVPs (default 10 × 80), plus the set-up (the loss and gradient
    at θ*, twice to check determinism; a dtype audit; at most about one HVP for the route
    choice). --plot needs the plot extra.

    References: Golub & Meurant, Matrices, Moments and Quadrature with Applications (2010),
    ch. 6; Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl. 38(4), 2017; Ghorbani, Krishnan &
    Xiao, ICML 2019.

    \b
    Examples:
      basins spectrum model.pt
      basins spectrum model.pt --scale log --plot spectrum.png -o report.h5
      basins spectrum model.pt --json | jq .num_hvps
    """
    from basins.analyses.spectrum import hessian_spectrum

    if kw["plot_path"]:
        from .figures.style import figure_format, require_matplotlib

        figure_format(kw["plot_path"], "--plot")
        require_matplotlib("--plot")
    c = Command(kw)
    total = kw["num_probes"] * min(kw["num_steps"], c.problem.num_params)
    result = c.run(f"SLQ ({kw['num_probes']} probes)", hessian_spectrum, c.problem, total=total, seed=c.seed,
                   **c.options("num_probes", "num_steps", "scale", "sigma", "num_points"))
    c.log.print(f"{result.slq.num_matvecs} HVPs in {c.seconds:.2f} s")
    record = result.record()
    if kw["plot_path"] and is_main_process():
        plot_density(record.as_analysis(), kw["plot_path"])
        c.log.print(f"wrote {kw['plot_path']}")
    record.attrs["plot"] = kw["plot_path"]
    c.emit("spectrum", record, tables=summary_tables)


def plot_density(analysis: dict[str, Any], path: str, title: str = "") -> None:
    """Draw a ``/spectrum`` analysis (``record().as_analysis()`` or a report group: density and
    band) to an image file, with the panel ``basins plot`` uses (:mod:`basins.cli.figures.spectrum`)."""
    from .figures.layout import single_panel
    from .figures.style import figure_style, save_figure

    with figure_style():
        save_figure(single_panel("spectrum", analysis, {}, title or None), path)


def sparkline(values: Any, width: int = 48) -> str:
    """A one-line picture of non-negative ``values``: the maximum of each of ``width`` bins as ▁..█
    (a space where a bin is below 1% of the peak)."""
    v = np.nan_to_num(np.asarray(values, dtype=float), nan=0.0)
    if v.size == 0 or float(v.max()) <= 0:
        return " " * width
    bins = np.array_split(v, min(width, v.size))
    peaks = np.array([b.max() for b in bins]) / v.max()
    return "".join(" " if p < 0.01 else _BLOCKS[min(len(_BLOCKS) - 1, int(p * len(_BLOCKS)))] for p in peaks)


# ---------------------------------------------------------------------- summary renderers
def _rules(analysis: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    ds = analysis.get("datasets", {})
    if "nodes" not in ds or "weights" not in ds:
        return None
    return np.asarray(ds["nodes"]["values"], dtype=float), np.asarray(ds["weights"]["values"], dtype=float)


def _log_sparkline(analysis: dict[str, Any], width: int = 48) -> tuple[str, str] | None:
    """The density over log10|λ|, re-smoothed from the stored nodes/weights: (line, axis label)."""
    from basins.linalg.slq import spectral_density

    rules = _rules(analysis)
    if rules is None or not np.isfinite(rules[0]).any() or np.nanmax(np.abs(rules[0])) == 0:
        return None
    d = spectral_density(rules[0], rules[1], scale="log", num_points=4 * width)
    lo, hi = float(d.grid[0]), float(d.grid[-1])
    return sparkline(d.density.numpy(), width), f"|λ| from 1e{round(lo)} to 1e{round(hi)}"


def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """Rich table for a ``/spectrum`` group: cost, trace, node range, and a density sparkline."""
    a = analysis.get("attrs", {})
    t = key_value_table("Hessian spectral density (SLQ)")
    t.add_row("probes × steps", f"{a.get('num_probes')} × {a.get('num_steps')} ({a.get('probe', 'rademacher')})")
    t.add_row("node range", f"[{fmt(a.get('node_min'))}, {fmt(a.get('node_max'))}] {EIGEN_UNITS}")
    tr, se = a.get("trace"), a.get("trace_stderr")
    t.add_row("trace ± s.e.", "-" if tr is None else (fmt(tr) + ("" if se is None or not math.isfinite(se) else f" ± {se:.2g}")))
    line = _log_sparkline(analysis)
    if line is not None:
        t.add_row("density (log |λ|)", f"[{line[0]}] {line[1]}")
    t.add_row("cost", f"{a.get('num_hvps')} HVPs, {fmt(a.get('wall_seconds'), 3)} s")
    for name in ("seed", "scale", "sigma", "hvp_route"):
        if a.get(name) is not None:
            t.add_row(name, str(a[name]) if not isinstance(a[name], float) else fmt(a[name]))
    if a.get("argv"):
        t.add_row("argv", str(a["argv"]))
    return [t]


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of a ``/spectrum`` group: sparkline over log|λ|, trace, HVPs."""
    a = analysis.get("attrs", {})
    line = _log_sparkline(analysis, width=24)
    row = {"density (log|λ|)": line[0] if line else "-"}
    if a.get("trace") is not None:
        row["SLQ trace"] = fmt(a["trace"], 4)
    row["SLQ HVPs"] = str(a.get("num_hvps", "-"))
    return row
