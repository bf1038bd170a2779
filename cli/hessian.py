"""``basins hessian MODEL``: top/bottom Hessian eigenvalues with residual bounds, and the trace.

Also the renderers ``basins summary`` uses for a report's ``/hessian`` group:
:func:`summary_tables`, :func:`summary_row` and :func:`csv_rows`.
"""

from __future__ import annotations

import math
from typing import Any

import click
from rich.console import RenderableType
from rich.table import Table

from basins.record import EIGEN_UNITS

from .common import (
    Command,
    LibraryOption,
    flag_errors,
    fmt,
    key_value_table,
    output_options,
    problem_options,
)

_ENDS = {"eigenvalues": "", "bottom_eigenvalues": "bottom_"}


@click.command()
@problem_options
@click.option("-k", "--top-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Eigenvalues wanted at each end asked for.")
@click.option("--which", type=click.Choice(["top", "bottom", "both"]), default="top", show_default=True,
              help="Largest, smallest (negative ones mean a saddle) or both ends of the spectrum.")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Converged when residual ≤ tol·max|λ| (≈ tol·‖H‖).")
@click.option("--max-hvps", cls=LibraryOption, library_names=("max_matvecs",), type=click.IntRange(min=1),
              help="Lanczos budget in Hessian-vector products (default max(200, 20·K), with 2K for --which both). "
                   "A budget reached before convergence gives a result flagged unconverged (exit 1 only with "
                   "--strict); a budget below the K HVPs (rounded up to whole blocks) that K Ritz values need at "
                   "all is bad usage (exit 2).")
@click.option("--block-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Vectors per Lanczos step (one data pass per block).")
@click.option("--eigenvectors", is_flag=True, help="Store the Ritz vectors (float32) in the report (-o).")
@click.option("--trace", is_flag=True, help="Also estimate the trace of the Hessian.")
@click.option("--trace-method", type=click.Choice(["hutch++", "hutchinson"]), default="hutch++", show_default=True,
              help="Trace estimator.")
@click.option("--trace-hvps", type=click.IntRange(min=2), default=100, show_default=True,
              help="Hessian-vector products for the trace estimate.")
@click.option("--bounds", type=click.Choice(["rescaled", "sketch", "float64"]), default="rescaled", show_default=True,
              help="How a float32 run measures the HVPs' rounding in error_bounds: rescaled (k more HVPs; a "
                   "measured estimate), sketch (3 more HVPs whatever k: one randomised estimate for all the pairs, "
                   "up to √k looser) or float64 (k float64 check products, about 10x a float32 one on CPU; "
                   "eigenvalues become float64 Rayleigh quotients and the bounds provably contain an exact "
                   "eigenvalue). No effect in float64.")
@click.option("--strict", is_flag=True, help="Exit 1 unless every eigenvalue converged (output is still written).")
@click.option("--cold", is_flag=True,
              help="With several checkpoints: start each Lanczos run from random vectors, not warm from the previous "
                   "checkpoint's Ritz vectors (the results agree within --tol either way; warm needs fewer HVPs).")
@click.option("--per-block", "per_block", multiple=True, metavar="DEPTH|GLOB",
              help="Instead of the whole Hessian: one row per block of parameters (block, P, λ_max ± residual, "
                   "trace ± s.e. by Hutch++ with --trace-hvps products), each the Hessian in that block with the "
                   "others fixed (as --params BLOCK). An integer groups parameters by module prefix at that depth "
                   "(2: transformer.h, transformer.wte, ...); globs (repeatable) are one block each. Report group "
                   "/hessian_blocks.")
@output_options
def hessian(**kw: Any) -> None:
    """Largest (and/or smallest) Hessian eigenvalues at the saved parameters, by Lanczos.

    H is the P × P Hessian of the full-data mean loss L at θ* (units: loss / parameter²).
    Block Lanczos with full reorthogonalisation and thick restart; a pair has converged when its
    residual r ≤ tol·max|λ|, so eigenvalues near zero carry errors on the scale of tol·λ_max.
    --block-size b resolves eigenvalues of multiplicity up to b (one data pass per block).
    --which bottom finds negative eigenvalues: one beyond its residual means θ* is a saddle
    (a warning, and is_saddle: true).

    Every eigenvalue comes with an error bound b (JSON error_bounds): an eigenvalue of the exact
    Hessian lies within λ ± b, rounding of the HVPs included (it locates an eigenvalue, not
    necessarily the k-th: a cluster Lanczos has not split can hide some). The Lanczos residual r
    (JSON residuals) is that of the HVP as computed; in float32 its rounding can exceed r by
    orders of magnitude, so it is measured at run time: one more HVP per eigenvalue, at the
    rescaled Ritz vector c·y (c = 1.375), and b = r + 4·‖H(c·y)/c − λy‖ (an estimate; it held
    on every benchmark and test problem). --bounds float64 instead checks each pair with a
    float64 product, a bound that provably holds. In float64, b = r + 256·eps·max|λ|. A model
    that computes part of its graph below its dtype (found by a dtype audit of one forward) gets
    measured bounds as in float32, and a warning naming the layers. The loss itself (on the
    model's outputs) is evaluated in float64 whatever the dtype.

    Trace: Hutch++ (default) or Hutchinson with Rademacher probes, with a standard error (Meyer,
    Musco, Musco & Woodruff 2021; Hutchinson 1990). --per-block: one row per block (block, P,
    λ_max ± residual, trace ± s.e., exact for a block of at most --trace-hvps parameters), each
    equal to a separate --params BLOCK run with the same seed (report group /hessian_blocks).

    Cost in HVPs: Lanczos until convergence, at most --max-hvps; then k for the float32 bounds
    (rescaled; 3 per end with --bounds sketch; k float64 products with --bounds float64, about
    10× a float32 one on CPU); --trace-hvps with --trace; with --per-block, each block's Lanczos
    and trace HVPs (each one full-data HVP). Set-up: the loss and gradient at θ* (twice, to
    check determinism), a dtype audit (one forward) and at most about one HVP for the route
    choice. With several checkpoints each Lanczos run starts warm from the previous checkpoint's
    Ritz vectors (--cold: random).

    Memory is planned before the work and the plan printed on stderr (and stored as
    memory_plan): the cached gradient graph of the `graph` HVP route (activations of every
    example) is kept only when it fits; the functional routes run over pieces of the chunks
    with a number of vectors at a time that fit; the Lanczos basis (P × basis-size numbers,
    at most max_basis + block_size vectors: for P = 10⁷ in float32 and k = 50 about 4.8 GB)
    stays in memory, is bounded by thick restart, or lives in a memory-mapped scratch file
    ($BASINS_SCRATCH or the temp dir; same eigenvalues to rounding). --memory sets the budget
    (default 80% of the memory available); a run that cannot fit exits 2 before the work.

    References: Parlett, The Symmetric Eigenvalue Problem, Thm 4.5.1 (residual bounds); Golub &
    Van Loan, Matrix Computations, ch. 10 (block Lanczos).

    \b
    --json keys: eigenvalues (descending for top, ascending for bottom),
    residuals, error_bounds, converged, all_converged, is_saddle (null if only the
    top was computed), lambda_max, lambda_min, trace, trace_stderr, trace_method
    (null without --trace), num_hvps (every HVP computed: num_setup_hvps for the
    route choice + num_lanczos_hvps + num_trace_hvps + num_check_hvps), num_grads,
    num_loss_evals (set-up included), num_restarts, start (random, or warm
    from the previous checkpoint), wall_seconds, setup_seconds, report (path
    or null), step (the checkpoint's training step or null), the problem's keys
    (num_params, num_examples, loss, loss_at_optimum, grad_norm, dtype, device,
    seed, warnings, model_sha256, data_sha256, params, attention, ...: README,
    "Output"); with --which both also bottom_eigenvalues, bottom_residuals, bottom_error_bounds,
    bottom_converged (eigenvalues stays the top end).

    \b
    Examples:
      basins hessian model.pt                       # top 10, rich table
      basins hessian model.pt --which both --trace -o report.h5
      basins hessian model.pt --json --dtype float64 --tol 1e-10 | jq .eigenvalues
      basins hessian ckpts/ --data d.pt -o runs/    # every checkpoint: runs/<name>.h5
      basins hessian ./my-gpt2/ --data tokens.pt --per-block 3
    """
    from basins.analyses.hessian import hessian_eigenvalues, plan_hessian
    from basins.engine.precision import audit_precision

    c = Command(kw, plan_line=bool(kw["per_block"]))
    problem, k = c.problem, kw["k"]
    if kw["eigenvectors"] and not kw["output_path"]:
        c.log.print("[yellow]note:[/] eigenvectors are stored only in a report: add -o report.h5")
    if kw["per_block"]:
        _per_block(c)
        return

    run = kw.get("_run")  # several checkpoints: warm-start from the previous one's Ritz vectors
    warm_key = f"hessian:{kw['which']}"
    start = run.warm.get(warm_key) if run is not None and not kw["cold"] else None
    if start is not None and start.shape[0] != problem.num_params:
        start = None  # another architecture: a cold start
    with flag_errors():
        plan = plan_hessian(problem, k=min(k, problem.num_params), **c.options("which", "block_size", "trace",
                                                                               "trace_hvps", "bounds"))
    c.print_plan(plan.describe())
    precision_warning = audit_precision(problem).warning()
    if precision_warning:
        c.warn(precision_warning)
    result = c.run(f"Lanczos ({kw['which']} {k})", hessian_eigenvalues, problem, total=kw["max_hvps"],
                   eigenvectors=kw["eigenvectors"] and bool(kw["output_path"]), seed=c.seed, start=start,
                   keep_start=run is not None and not kw["cold"], memory_plan=plan,
                   **c.options("k", "which", "tol", "max_hvps", "block_size", "trace", "trace_method", "trace_hvps",
                               "bounds"))
    if run is not None and result.next_start is not None:
        run.warm[warm_key] = result.next_start
    if result.is_saddle:
        lam, r = result.most_negative()
        c.warn(f"λ_min = {lam:.6g} ± {r:.2g} < 0: the Hessian has a direction of negative curvature, "
               "so this point is a saddle (or a maximum), not a minimum")
    unconverged = result.num_wanted - result.num_converged
    if not result.all_converged:
        c.warn(f"{unconverged} of {result.num_wanted} eigenvalues did not converge to tol {kw['tol']:g} within "
               f"{result.num_lanczos_hvps} HVPs: their residuals bound the error; raise --max-hvps or loosen --tol")
    c.log.print(f"{result.num_hvps} HVPs in {c.seconds:.2f} s ({problem.counters.num_hvps} in all, set-up included"
                + ("; warm start from the previous checkpoint)" if result.warm_start else ")"))
    c.emit("hessian", result.record(), tables=summary_tables)

    if kw["strict"] and not result.all_converged:
        from basins.errors import ComputeError

        raise ComputeError(f"--strict: {unconverged} of {result.num_wanted} eigenvalues did not converge within "
                           f"{result.num_lanczos_hvps} HVPs (raise --max-hvps or loosen --tol)")


def _per_block(c: Command) -> None:
    """``--per-block``: the per-block table (:mod:`basins.analyses.blocks`), group ``/hessian_blocks``."""
    from basins.analyses.blocks import parse_blocks, per_block_hessian

    from .hessian_blocks import summary_tables as block_tables

    with flag_errors():
        blocks = parse_blocks(c.problem.space.names, list(c.kw["per_block"]))
    result = c.run(f"Hessian of {len(blocks)} blocks", per_block_hessian, c.problem, blocks, total=len(blocks),
                   seed=c.seed, spec=" ".join(c.kw["per_block"]), **c.options("tol", "max_hvps", "trace_hvps"))
    c.log.print(f"{result.num_hvps} HVPs in {c.seconds:.2f} s over {len(blocks)} blocks")
    c.emit("hessian_blocks", result.record(), tables=block_tables)


# ---------------------------------------------------------------------- summary renderers
def _values(analysis: dict[str, Any], name: str) -> list[Any] | None:
    ds = analysis.get("datasets", {}).get(name)
    if ds is None:
        return None
    v = ds["values"]
    return list(v.tolist() if hasattr(v, "tolist") else v)


def _pm(x: Any, err: Any, digits: int = 6) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    if err is None or not isinstance(err, (int, float)) or not math.isfinite(err):
        return fmt(float(x), digits)
    return f"{fmt(float(x), digits)} ± {float(err):.1e}"


def _ends(analysis: dict[str, Any]) -> list[tuple[str, list[Any], list[Any], list[Any], list[Any]]]:
    """Per end: label, eigenvalues, residuals, converged flags, and error bounds (the residuals for
    reports written before error bounds existed)."""
    which = analysis.get("attrs", {}).get("which", "top")
    out = []
    for name, prefix in _ENDS.items():
        vals = _values(analysis, name)
        if vals is None:
            continue
        label = "bottom" if (prefix or which == "bottom") else "top"
        res = _values(analysis, prefix + "residuals") or [None] * len(vals)
        conv = _values(analysis, prefix + "converged") or [None] * len(vals)
        bounds = _values(analysis, prefix + "error_bounds") or res
        out.append((label, vals, res, conv, bounds))
    return out


def _sci(x: Any) -> str:
    return "-" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.1e}"


def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """Rich tables for a ``/hessian`` group: key numbers with error bars, then the eigenvalues."""
    a = analysis.get("attrs", {})
    key = key_value_table("Hessian (Lanczos)")
    ends = _ends(analysis)
    for label, vals, _, _, bounds in ends:
        if vals:
            name = "λ_max" if label == "top" else "λ_min"
            key.add_row(f"{name} ± error bound", _pm(vals[0], bounds[0]))
    if a.get("trace") is not None:
        key.add_row(f"trace ± s.e. ({a.get('trace_method')}, {a.get('num_trace_hvps')} HVPs)",
                    _pm(a.get("trace"), a.get("trace_stderr")))
    saddle = a.get("is_saddle")
    key.add_row("saddle point", "[red]yes: negative curvature[/]" if saddle else ("no" if saddle is False else
                                                                                   "not checked (--which top)"))
    key.add_row("converged", f"{a.get('num_converged', '?')}/{a.get('num_wanted', '?')} at tol {a.get('tol')}")
    key.add_row("cost", f"{a.get('num_hvps')} HVPs ({a.get('num_restarts', 0)} restarts), "
                        f"{fmt(a.get('wall_seconds'), 3)} s")
    for name in ("which", "top_k", "block_size", "seed", "hvp_route"):
        if name in a:
            key.add_row(name, str(a[name]))
    if "eigenvectors" in analysis.get("datasets", {}):
        key.add_row("eigenvectors", "stored (float32)")
    if a.get("replaced"):
        key.add_row("replaced", f"{a['replaced']} earlier run(s)")
    if a.get("argv"):
        key.add_row("argv", str(a["argv"]))
    tables: list[RenderableType] = [key]
    for label, vals, res, conv, bounds in ends:
        t = Table(title=f"{label} eigenvalues ({EIGEN_UNITS})", title_justify="left")
        t.add_column("#", justify="right")
        t.add_column("λ", justify="right")
        t.add_column("± error bound", justify="right")
        t.add_column("± residual", justify="right")
        t.add_column("converged", justify="center")
        for i, (v, r, c, b) in enumerate(zip(vals, res, conv, bounds), 1):
            t.add_row(str(i), fmt(v, 10), _sci(b), _sci(r), "✓" if c else ("✗" if c is not None else "-"))
        tables.append(t)
    return tables


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of a ``/hessian`` group for ``basins summary`` of several reports."""
    a = analysis.get("attrs", {})
    row: dict[str, str] = {}
    for label, vals, _, _, bounds in _ends(analysis):
        if vals:
            row["λ_max" if label == "top" else "λ_min"] = _pm(vals[0], bounds[0], 5)
    if a.get("trace") is not None:
        row["trace"] = _pm(a.get("trace"), a.get("trace_stderr"), 5)
    if a.get("is_saddle") is not None:
        row["saddle"] = "yes" if a["is_saddle"] else "no"
    row["converged"] = f"{a.get('num_converged', '?')}/{a.get('num_wanted', '?')}"
    row["HVPs"] = str(a.get("num_hvps", "-"))
    return row


def csv_rows(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The eigenvalue table of a ``hessian`` ``--json`` object (the command's, or ``basins summary``'s
    for a ``/hessian`` group) as rows ``{end, index, eigenvalue, residual, error_bound, converged}``
    (index 1 = most extreme): one row per eigenvalue, every per-eigenvalue key."""
    rows = []
    for prefix in _ENDS.values():
        vals = obj.get(prefix + "eigenvalues")
        if not isinstance(vals, list):
            continue
        label = "bottom" if (prefix or obj.get("which") == "bottom") else "top"
        columns = {key: obj.get(prefix + key + "s") or [None] * len(vals)
                   for key in ("residual", "error_bound")}
        columns["converged"] = obj.get(prefix + "converged") or [None] * len(vals)
        for i, v in enumerate(vals):
            rows.append({"end": label, "index": i + 1, "eigenvalue": v,
                         **{key: col[i] if i < len(col) else None for key, col in columns.items()}})
    return rows
