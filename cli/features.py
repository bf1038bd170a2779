"""``basins features MODEL``: the feature Gram (empirical NTK) spectrum and the rank of the output Jacobian.

Also the renderers ``basins summary`` uses for a report's ``/features`` group:
:func:`summary_tables` and :func:`summary_row`.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import RenderableType
from rich.table import Table

from basins.record import EIGEN_UNITS

from .common import Command, fmt, key_value_table, ladder_options, output_options, problem_options
from .spectrum import sparkline

_SHOW = 12  # eigenvalues shown in the table


@click.command()
@problem_options
@ladder_options("Rank cutoff: count μ > rtol·μ_max + atol", "cutoff")
@click.option("--top", "top_vectors", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also give the top N eigenvectors' loadings per output and per example.")
@click.option("--route", type=click.Choice(["auto", "gram", "outer"]), default="auto", show_default=True,
              help="gram: the (n·k)² Gram matrix; outer: the P² matrix G; auto: the smaller.")
@click.option("--gn-probes", type=click.IntRange(min=0), default=3, show_default=True,
              help="Random vectors (1 HVP each) for the check ‖Hv − Gv‖/‖Hv‖.")
@output_options
def features(**kw: Any) -> None:
    """Spectrum of the feature Gram matrix: the sizes of the independent features the model computes.

    With J the (n·k)×P Jacobian of the outputs and H_ℓ the loss's Hessian in the outputs, the
    Gram matrix H_ℓ^½ J Jᵀ H_ℓ^½ (for mse (2/N)·JJᵀ, the scaled empirical NTK) has the nonzero
    eigenvalues of the Gauss–Newton part G = JᵀH_ℓJ of the Hessian. Its rank is the number of
    independent features; P − rank directions leave G flat. Reports the participation ratio
    (effective number of features) and ‖Hv − Gv‖/‖Hv‖ (≈ 0 at a zero-residual mse optimum,
    where H = G). Eigenvalues are in loss / parameter²; N is the loss's averaged terms (n·k
    for mse; valid tokens for the token losses, whose Gram matrix is over those tokens). The
    rank ladder counts eigenvalues above rtol·μ_max + atol for each --rtol, with an interval
    from the Jacobian's rounding in the problem's dtype.

    Cost: n·k vector-Jacobian products (per-example vmap(jacrev)), one dense product and one
    symmetric eigendecomposition of size min(n·k, P), and --gn-probes HVPs for the H = G
    check. Memory: 8·(n·k·P + 2(n·k)²) bytes with --route gram, 8·2P² plus one chunk's
    Jacobian with --route outer (the one used under torchrun: G summed over processes, no
    per-example loadings).

    References: Jacot, Gabriel & Hongler, NeurIPS 2018 (NTK); Sagun et al. 2017 and Papyan
    2020 (the Gauss–Newton part and the bulk near zero).

    \b
    Examples:
      basins features model.pt
      basins features model.pt --top 3 --json | jq '.loadings[0].per_output'
      basins features model.pt --max-samples 500 -o report.h5
    """
    from basins.analyses.features import feature_analysis
    from basins.analyses.nullity import DEFAULT_RTOLS

    c = Command(kw)
    result = c.run("feature Gram", feature_analysis, c.problem, total=c.problem.num_examples,
                   rtols=kw["rtols"] or DEFAULT_RTOLS, seed=c.seed, **c.options("atol", "route", "top_vectors",
                                                                                  "gn_probes"))
    fg = result.gram
    c.note(*fg.notes)
    c.log.print(f"{fg.num_vjps:,} Jacobian rows ({fg.jacobian_mode}, route {fg.route}) and {fg.num_hvps} HVPs "
                f"in {c.seconds:.2f} s")

    def tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
        out = summary_tables(analysis, problem)
        return out + [_loadings_table(result.loadings)] if result.loadings else out

    c.emit("features", result.record(), tables=tables)


def _loadings_table(loadings: list[dict[str, Any]]) -> Table:
    t = Table(title="top features: where each eigenvector lives (squared loadings)", title_justify="left")
    for col in ("#", "eigenvalue", "per output", "top examples (share)"):
        t.add_column(col, justify="right" if col in ("#", "eigenvalue") else "left")
    for item in loadings:
        per_output = [float(v) for v in item["per_output"]]
        per_example = [float(v) for v in item["per_example"]]
        top = sorted(range(len(per_example)), key=per_example.__getitem__, reverse=True)[:5]
        outputs = ", ".join(f"{v:.2f}" for v in per_output[:10]) + (" …" if len(per_output) > 10 else "")
        t.add_row(str(item["index"] + 1), fmt(item["eigenvalue"]), outputs,
                  ", ".join(f"{i} ({per_example[i]:.2f})" for i in top))
    return t


# ---------------------------------------------------------------------- summary renderers
def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """Rich tables for a ``/features`` group: rank, participation ratio, H vs G, the rank ladder, top eigenvalues."""
    import numpy as np

    a = analysis.get("attrs", {})
    P = problem.get("num_params")
    head = key_value_table("feature Gram matrix (Gauss–Newton / NTK view)")
    head.add_row("outputs n·k", f"{a.get('num_outputs', '-'):,}" if isinstance(a.get("num_outputs"), int) else "-")
    head.add_row("numerical rank", f"{a.get('rank')} (cutoff {fmt(a.get('cutoff'), 3)})")
    if isinstance(P, int) and isinstance(a.get("rank"), int):
        head.add_row("flat directions of G", f"{P - a['rank']:,} of P = {P:,}")
    head.add_row("participation ratio", fmt(a.get("participation_ratio"), 4))
    head.add_row("μ_max", f"{fmt(a.get('lambda_max'))} {EIGEN_UNITS}")
    if a.get("gn_residual") is not None:
        head.add_row("‖Hv − Gv‖/‖Hv‖", f"{a['gn_residual']:.2g}")
    ev = analysis.get("datasets", {}).get("eigenvalues")
    if ev is not None:
        mu = np.asarray(ev["values"], dtype=float)
        top = float(mu.max()) if mu.size else 0.0
        cutoff = a.get("cutoff") if isinstance(a.get("cutoff"), float) else 0.0
        nonzero = mu[mu > cutoff]
        if top > 0 and nonzero.size:
            hist, _ = np.histogram(np.log10(nonzero / top), bins=16, range=(-16, 0))
            head.add_row("eigenvalues per decade", f"[{sparkline(hist, 16)}] μ/μ_max from 1e-16 to 1, "
                                                   f"{mu.size - nonzero.size:,} below the cutoff not shown")
        head.add_row("largest eigenvalues", ", ".join(fmt(float(v), 4) for v in mu[:_SHOW]))
    head.add_row("cost", f"{a.get('num_vjps')} Jacobian rows ({a.get('jacobian_mode')}), {a.get('num_hvps')} HVPs, "
                         f"{fmt(a.get('wall_seconds'), 3)} s")
    tables: list[RenderableType] = [head]
    ranks = a.get("ranks")
    if ranks:
        t = Table(title="rank of the feature Gram matrix at μ > rtol·μ_max + atol", title_justify="left")
        for col in ("rtol", "threshold", "rank [interval]", "flat = P − rank"):
            t.add_column(col, justify="right")
        for r in ranks:
            interval = "" if r["rank_lower"] == r["rank_upper"] == r["rank"] else f" [{r['rank_lower']}, {r['rank_upper']}]"
            t.add_row(fmt(r["rtol"], 3), fmt(r["threshold"], 4), f"{r['rank']:,}{interval}", f"{r['flat']:,}")
        tables.append(t)
    return tables


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of a ``/features`` group: rank, participation ratio, ‖Hv − Gv‖/‖Hv‖."""
    a = analysis.get("attrs", {})
    row = {"Gram rank": str(a.get("rank", "-")), "PR": fmt(a.get("participation_ratio"), 4)}
    if a.get("gn_residual") is not None:
        row["H≈G"] = f"{a['gn_residual']:.1g}"
    return row
