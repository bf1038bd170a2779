"""``basins nullity MODEL``: count near-zero Hessian eigenvalues (flat directions) for a ladder of thresholds.

Also the renderers ``basins summary`` uses for a report's ``/nullity`` group:
:func:`summary_tables` and :func:`summary_row`.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import RenderableType
from rich.table import Table

from basins.record import EIGEN_UNITS

from .common import Command, fmt, key_value_table, ladder_options, output_options, problem_options


@click.command()
@problem_options
@click.option("--method", type=click.Choice(["auto", "exact", "features", "slq"]), default="auto", show_default=True,
              help="exact: dense Hessian (auto when P ≤ 4096 and it fits in memory); features: P − rank of the "
                   "feature Gram matrix (the Gauss–Newton part G; auto only where G = H, an mse loss at a "
                   "zero-residual point); slq: an estimate with an interval (auto otherwise).")
@ladder_options("Relative threshold: count |λ| ≤ rtol·λ_max + atol", "threshold")
@click.option("--probes", "num_probes", type=click.IntRange(min=2), default=10, show_default=True,
              help="slq: probe vectors.")
@click.option("--lanczos-steps", "num_steps", type=click.IntRange(min=1), default=80, show_default=True,
              help="slq: Lanczos steps per probe.")
@click.option("--deflate", type=click.IntRange(min=0), default=20, show_default=True,
              help="slq: top eigenpairs removed (by Lanczos) before the quadrature.")
@output_options
def nullity(**kw: Any) -> None:
    """Count the Hessian's near-zero eigenvalues: directions the model can move in without changing the loss.

    For each threshold t = rtol·λ_max + atol (units of λ: loss / parameter²) the count
    #{|λ| ≤ t} of the P eigenvalues of the full-data Hessian comes with the method that
    produced it and an interval. Near an interpolating minimum eigenvalues fill every decade, so
    a count means something only with its threshold: read the whole ladder (--rtol repeats).

    \b
    Methods (--method auto takes the first that serves):
      exact     the dense Hessian from P HVPs (in blocks), eigvalsh in float64; the
                interval covers the rounding of the computed Hessian. The one dense rule
                every command shares: P ≤ 4096 and 24·P² bytes fit the memory budget.
      features  P − rank of the feature Gram matrix (basins features): exact for the
                Gauss–Newton part G, which equals H at a zero-residual mse optimum (there
                H = (2/N)·JᵀJ, N = n·k averaged terms); the reported ‖Hv − Gv‖/‖Hv‖ says
                whether that holds, and auto keeps features only where it is at rounding
                level. Token losses get the Gram matrix over their valid tokens. Interval:
                the Jacobian's rounding.
      slq       an estimate: the top --deflate eigenpairs by Lanczos, then stochastic
                Lanczos quadrature on the rest, with a 95% interval over probes that also
                widens where the quadrature cannot resolve eigenvalues near t (up to
                [0, P − deflate]) instead of printing a confident 0.

    Cost: exact, P HVPs and 24·P² bytes; features, n·k vector-Jacobian products and 3 HVPs for
    the H = G check (auto spends them before falling back to slq); slq, the deflation's Lanczos
    HVPs plus probes × Lanczos steps (default 10 × 80). Set-up: the loss and gradient at θ*
    (twice, to check determinism), a dtype audit (one forward) and at most about one HVP for the
    route choice.

    References: Sagun et al. 2017 (the bulk near zero); Golub & Meurant 2010, Thm 6.4
    (Chebyshev–Markov–Stieltjes brackets of Gauss quadrature).

    \b
    Examples:
      basins nullity model.pt
      basins nullity model.pt --method features --rtol 1e-8 --rtol 1e-6 --json
      basins nullity model.pt --method slq --probes 20 -o report.h5
    """
    from basins.analyses.nullity import DEFAULT_RTOLS
    from basins.analyses.nullity import nullity as count_nullity

    c = Command(kw)
    result = c.run(f"nullity ({kw['method']})", count_nullity, c.problem, rtols=kw["rtols"] or DEFAULT_RTOLS,
                   seed=c.seed, **c.options("method", "atol", "num_probes", "num_steps", "deflate"))
    c.note(*result.notes)
    c.log.print(f"method {result.method}: {result.num_hvps} HVPs in {c.seconds:.2f} s")

    def tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
        return summary_tables({**analysis, "attrs": {**analysis["attrs"], "notes": []}}, problem)  # notes: stderr

    c.emit("nullity", result.record(), tables=tables)


# ---------------------------------------------------------------------- summary renderers
def _counts(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    c = analysis.get("attrs", {}).get("counts")
    return list(c) if isinstance(c, list) else []


def _count_text(c: dict[str, Any]) -> str:
    n, lo, hi = c.get("count"), c.get("count_lower"), c.get("count_upper")
    if not isinstance(n, (int, float)):
        return "-"
    if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
        lo = hi = n
    if c.get("method") == "slq":
        return f"≈ {n:,.1f} [{lo:,.0f}, {hi:,.0f}]"
    if lo == hi == n:
        return f"{int(n):,}"
    return f"{int(n):,} [{int(lo):,}, {int(hi):,}]"


def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """Rich tables for a ``/nullity`` group: the threshold ladder with counts and intervals, then notes."""
    a = analysis.get("attrs", {})
    P = problem.get("num_params")
    head = key_value_table(f"near-zero Hessian eigenvalues ({a.get('method')})")
    head.add_row("λ_max", f"{fmt(a.get('lambda_max'))} {EIGEN_UNITS}")
    if a.get("gn_residual") is not None:
        head.add_row("‖Hv − Gv‖/‖Hv‖", f"{a['gn_residual']:.2g} (≈ 0: H is its Gauss–Newton part)")
    if a.get("eigenvalue_error") is not None:
        head.add_row("eigenvalue error δ", f"{a['eigenvalue_error']:.2g}")
    if a.get("num_deflated") is not None:
        head.add_row("slq", f"{a.get('num_probes')} probes × {a.get('num_steps')} steps, top {a['num_deflated']} deflated")
    head.add_row("cost", f"{a.get('num_hvps')} HVPs, {fmt(a.get('wall_seconds'), 3)} s")
    ladder = Table(title="count of |λ| ≤ rtol·λ_max + atol", title_justify="left")
    for col in ("rtol", "atol", "threshold", "count [interval]", "of P", "method"):
        ladder.add_column(col, justify="right" if col != "method" else "left")
    for c in _counts(analysis):
        share = f"{c['count'] / P:.1%}" if isinstance(P, int) and P and isinstance(c.get("count"), (int, float)) else "-"
        ladder.add_row(fmt(c.get("rtol"), 3), fmt(c.get("atol"), 3), fmt(c.get("threshold"), 4), _count_text(c), share,
                       str(c.get("method", "")))
    tables: list[RenderableType] = [head, ladder]
    notes = a.get("notes")
    if notes:
        nt = Table(show_header=False, box=None)
        nt.add_column("note")
        for n in notes:
            nt.add_row(f"note: {n}")
        tables.append(nt)
    return tables


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of a ``/nullity`` group: the count at each rtol, and the method."""
    row = {f"flat@{c.get('rtol'):g}": _count_text(c) for c in _counts(analysis) if c.get("atol", 0) == 0}
    row["nullity method"] = str(analysis.get("attrs", {}).get("method", "-"))
    return row
