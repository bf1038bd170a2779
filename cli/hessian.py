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

from .common import (
    Timer,
    argv,
    fmt,
    load_problem,
    output_options,
    print_json,
    problem_json,
    problem_options,
    progress_bar,
    stderr_console,
    stdout_console,
    write_report,
)

EIGEN_UNITS = "loss / parameter²"
_ENDS = {"eigenvalues": "", "bottom_eigenvalues": "bottom_"}


@click.command()
@problem_options
@click.option("-k", "--top-k", "top_k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Eigenvalues wanted at each end asked for.")
@click.option("--which", type=click.Choice(["top", "bottom", "both"]), default="top", show_default=True,
              help="Largest, smallest (negative ones mean a saddle) or both ends of the spectrum.")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
              help="Converged when residual ≤ tol·max|λ| (≈ tol·‖H‖).")
@click.option("--max-hvps", type=click.IntRange(min=1), help="Lanczos budget in Hessian-vector products (default max(200, 20·K), with 2K for --which both).")
@click.option("--block-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Vectors per Lanczos step (one data pass per block).")
@click.option("--eigenvectors", is_flag=True, help="Store the Ritz vectors (float32) in the report (-o).")
@click.option("--trace", is_flag=True, help="Also estimate the trace of the Hessian.")
@click.option("--trace-method", type=click.Choice(["hutch++", "hutchinson"]), default="hutch++", show_default=True,
              help="Trace estimator.")
@click.option("--trace-hvps", type=click.IntRange(min=2), default=100, show_default=True,
              help="Hessian-vector products for the trace estimate.")
@click.option("--strict", is_flag=True, help="Exit 1 unless every eigenvalue converged (output is still written).")
@output_options
def hessian(**kw: Any) -> None:
    """Largest (and/or smallest) Hessian eigenvalues at the saved parameters, by Lanczos.

    Every eigenvalue comes with an error bound b (JSON error_bounds): an eigenvalue of the exact
    Hessian lies within λ ± b. In float32, b is measured: each Ritz vector y gets one float64
    check product, λ is its float64 Rayleigh quotient yᵀHy and b = ‖Hy − λy‖ (k extra HVPs per
    end), so the rounding of the float32 HVPs is included. In float64, b is the Lanczos residual
    (JSON residuals, kept in both dtypes) plus 64·eps·max|λ|. A negative bottom eigenvalue beyond
    its residual means the point is a saddle.

    Memory is dominated by the cached gradient graph of the `graph` HVP route (activations of
    every example, kept only when they fit a quarter of this process' share of RAM; --hvp fwd-rev
    recomputes one chunk at a time instead, --batch-size sets the chunk), then by the Lanczos
    basis (P × (steps+1) numbers).

    \b
    --json keys: eigenvalues (descending for top, ascending for bottom),
    residuals, error_bounds, converged, all_converged, is_saddle (null if only the
    top was computed), lambda_max, lambda_min, trace, trace_stderr, trace_method
    (null without --trace), num_hvps (every HVP computed: num_setup_hvps for the
    route choice + num_lanczos_hvps + num_trace_hvps + num_check_hvps), num_grads,
    num_loss_evals (set-up included), num_restarts,
    wall_seconds, setup_seconds, report (path or null), the problem's keys
    (num_params, num_examples, loss, loss_at_optimum, grad_norm, dtype, device,
    seed, warnings); with --which both also bottom_eigenvalues, bottom_residuals, bottom_error_bounds,
    bottom_converged (eigenvalues stays the top end).

    \b
    Examples:
      basins hessian model.pt                       # top 10, rich table
      basins hessian model.pt --which both --trace -o report.h5
      basins hessian model.pt --json --dtype float64 --tol 1e-10 | jq .eigenvalues
    """
    from basins.analyses.hessian import hessian_eigenvalues

    log = stderr_console(kw["quiet"])
    with Timer() as setup:
        loaded = load_problem(kw, log)
    problem = loaded.problem
    num_setup_hvps = problem.counters.num_hvps  # the HVP route choice's products
    if kw["eigenvectors"] and not kw["output"]:
        log.print("[yellow]note:[/] eigenvectors are stored only in a report: add -o report.h5")
    k = kw["top_k"]

    with Timer() as t, progress_bar(log, f"Lanczos ({kw['which']} {k})", total=kw["max_hvps"]) as update:

        def on_progress(p: Any) -> None:
            if p.phase == "lanczos":
                rel = "-" if p.max_residual is None or math.isnan(p.max_residual) else f"{p.max_residual:.1e}"
                info = f"max residual/‖H‖ {rel}, {p.num_converged} converged"
            else:
                info = f"trace ({kw['trace_method']})"
            update(p.num_hvps, total=p.max_hvps, info=info)

        result = hessian_eigenvalues(
            problem, k=k, which=kw["which"], tol=kw["tol"], max_hvps=kw["max_hvps"], block_size=kw["block_size"],
            eigenvectors=kw["eigenvectors"] and bool(kw["output"]), trace=kw["trace"],
            trace_method=kw["trace_method"], trace_hvps=kw["trace_hvps"], seed=loaded.seed, callback=on_progress,
        )

    warnings = list(loaded.warnings)
    if result.is_saddle:
        lam, r = _most_negative(result)
        msg = (f"λ_min = {lam:.6g} ± {r:.2g} < 0: the Hessian has a direction of negative curvature, "
               "so this point is a saddle (or a maximum), not a minimum")
        warnings.append(msg)
        log.print(f"[yellow]warning:[/] {msg}")
    if not result.all_converged:
        msg = (f"{result.num_wanted - result.num_converged} of {result.num_wanted} eigenvalues did not converge to "
               f"tol {kw['tol']:g} within {result.num_lanczos_hvps} HVPs: their residuals bound the error; "
               "raise --max-hvps or loosen --tol")
        warnings.append(msg)
        log.print(f"[yellow]warning:[/] {msg}")
    log.print(f"{result.num_hvps} HVPs in {t.seconds:.2f} s ({problem.counters.num_hvps} in all, set-up included)")

    # everything the run computed: set-up (loss, gradient, determinism check, route choice) and checks included
    counts = {**problem.counters.as_dict(), "num_setup_hvps": num_setup_hvps}
    attrs: dict[str, Any] = {
        "method": "Lanczos, full reorthogonalisation, float64 tridiagonal, thick restart",
        "which": result.which, "top_k": k, "tol": kw["tol"], "max_hvps": kw["max_hvps"],
        "block_size": kw["block_size"], "seed": loaded.seed,
        "trace_method": result.trace_method, "trace_hvps": kw["trace_hvps"] if kw["trace"] else None,
        "lambda_max": result.lambda_max, "lambda_min": result.lambda_min,
        "is_saddle": result.is_saddle, "saddle_floor": result.saddle_floor,
        "all_converged": result.all_converged, "num_converged": result.num_converged, "num_wanted": result.num_wanted,
        "trace": result.trace, "trace_stderr": result.trace_stderr,
        **counts, "num_lanczos_hvps": result.num_lanczos_hvps,
        "num_trace_hvps": result.num_trace_hvps, "num_check_hvps": result.num_check_hvps,
        "num_restarts": result.num_restarts, "hvp_route": problem.hvp_route,
        "wall_seconds": t.seconds, "setup_seconds": setup.seconds, "argv": argv(),
    }
    arrays = _arrays(result)
    if kw["output"]:
        write_report(kw["output"], loaded.record, "hessian", attrs, arrays, force=kw["force"])
        log.print(f"wrote /hessian to {kw['output']}")

    if kw["as_json"]:
        out: dict[str, Any] = {**problem_json(loaded), "warnings": warnings, "hvp_route": problem.hvp_route,
                               "which": result.which, "top_k": k, "tol": kw["tol"]}
        for name in ("eigenvalues", "residuals", "error_bounds", "converged"):
            out[name] = getattr(result, name)
        if result.which == "both":
            for name in ("bottom_eigenvalues", "bottom_residuals", "bottom_error_bounds", "bottom_converged"):
                out[name] = getattr(result, name)
        out.update({
            "all_converged": result.all_converged, "is_saddle": result.is_saddle,
            "lambda_max": result.lambda_max, "lambda_min": result.lambda_min,
            "trace": result.trace, "trace_stderr": result.trace_stderr, "trace_method": result.trace_method,
            **counts, "num_lanczos_hvps": result.num_lanczos_hvps,
            "num_trace_hvps": result.num_trace_hvps, "num_check_hvps": result.num_check_hvps,
            "num_restarts": result.num_restarts, "wall_seconds": t.seconds, "setup_seconds": setup.seconds, "report": kw["output"],
        })
        print_json(out)
    else:
        analysis = {"attrs": attrs, "datasets": {n: {"values": a.values, "description": a.description,
                                                      "units": a.units} for n, a in arrays.items()}}
        console = stdout_console()
        for table in summary_tables(analysis, loaded.record):
            console.print(table)

    if kw["strict"] and not result.all_converged:
        from basins.errors import ComputeError

        raise ComputeError(
            f"--strict: {result.num_wanted - result.num_converged} of {result.num_wanted} eigenvalues did not "
            f"converge within {result.num_lanczos_hvps} HVPs (raise --max-hvps or loosen --tol)"
        )


def _most_negative(result: Any) -> tuple[float, float]:
    vals, res = result.eigenvalues, result.residuals
    if result.which == "both" and result.bottom_eigenvalues is not None:
        vals, res = result.bottom_eigenvalues, result.bottom_residuals
    i = int(vals.argmin())
    return float(vals[i]), float(res[i])


def _arrays(result: Any) -> dict[str, Any]:
    from basins.files.report import Array

    end = "bottom (ascending)" if result.which == "bottom" else "top (descending)"
    arrays = {
        "eigenvalues": Array(result.eigenvalues, f"Ritz values, {end}", EIGEN_UNITS),
        "residuals": Array(result.residuals, "Lanczos residual norms ‖Hy − λy‖ of the HVP as computed", EIGEN_UNITS),
        "error_bounds": Array(result.error_bounds, "an eigenvalue of the exact Hessian lies within λ ± bound "
                              "(HVP rounding included: float64 check products)", EIGEN_UNITS),
        "converged": Array(result.converged.numpy(), "residual ≤ tol·max|λ| (max over all Ritz values)", None),
    }
    if result.which == "both":
        arrays.update({
            "bottom_eigenvalues": Array(result.bottom_eigenvalues, "Ritz values, bottom (ascending)", EIGEN_UNITS),
            "bottom_residuals": Array(result.bottom_residuals, "residual norms of the bottom Ritz values", EIGEN_UNITS),
            "bottom_error_bounds": Array(result.bottom_error_bounds, "error bounds of the bottom eigenvalues "
                                         "(HVP rounding included)", EIGEN_UNITS),
            "bottom_converged": Array(result.bottom_converged.numpy(), "residual ≤ tol·max|λ| (max over all Ritz values)", None),
        })
    if result.eigenvectors is not None:
        arrays["eigenvectors"] = Array(result.eigenvectors.float(), "unit Ritz vectors (P, k), columns as eigenvalues, "
                                       "float32", None)
    if result.bottom_eigenvectors is not None:
        arrays["bottom_eigenvectors"] = Array(result.bottom_eigenvectors.float(), "unit Ritz vectors of the bottom end "
                                              "(P, k), float32", None)
    return arrays


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


def _ends(analysis: dict[str, Any]) -> list[tuple[str, list[Any], list[Any], list[Any]]]:
    which = analysis.get("attrs", {}).get("which", "top")
    out = []
    for name, prefix in _ENDS.items():
        vals = _values(analysis, name)
        if vals is None:
            continue
        label = "bottom" if (prefix or which == "bottom") else "top"
        res = _values(analysis, prefix + "residuals") or [None] * len(vals)
        conv = _values(analysis, prefix + "converged") or [None] * len(vals)
        out.append((label, vals, res, conv))
    return out


def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """Rich tables for a ``/hessian`` group: key numbers with error bars, then the eigenvalues."""
    a = analysis.get("attrs", {})
    key = Table(title="Hessian (Lanczos)", show_header=False, title_justify="left")
    key.add_column("quantity", style="bold")
    key.add_column("value")
    ends = _ends(analysis)
    for label, vals, res, _ in ends:
        if vals:
            name = "λ_max" if label == "top" else "λ_min"
            key.add_row(f"{name} ± residual", _pm(vals[0], res[0]))
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
    for label, vals, res, conv in ends:
        t = Table(title=f"{label} eigenvalues ({EIGEN_UNITS})", title_justify="left")
        t.add_column("#", justify="right")
        t.add_column("λ", justify="right")
        t.add_column("± residual", justify="right")
        t.add_column("converged", justify="center")
        for i, (v, r, c) in enumerate(zip(vals, res, conv), 1):
            t.add_row(str(i), fmt(v, 10), "-" if r is None or not math.isfinite(r) else f"{r:.1e}",
                      "✓" if c else ("✗" if c is not None else "-"))
        tables.append(t)
    return tables


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of a ``/hessian`` group for ``basins summary`` of several reports."""
    a = analysis.get("attrs", {})
    row: dict[str, str] = {}
    for label, vals, res, _ in _ends(analysis):
        if vals:
            row["λ_max" if label == "top" else "λ_min"] = _pm(vals[0], res[0], 5)
    if a.get("trace") is not None:
        row["trace"] = _pm(a.get("trace"), a.get("trace_stderr"), 5)
    if a.get("is_saddle") is not None:
        row["saddle"] = "yes" if a["is_saddle"] else "no"
    row["converged"] = f"{a.get('num_converged', '?')}/{a.get('num_wanted', '?')}"
    row["HVPs"] = str(a.get("num_hvps", "-"))
    return row


def csv_rows(analysis: dict[str, Any]) -> list[dict[str, Any]]:
    """The eigenvalue table as rows ``{end, index, eigenvalue, residual, converged}`` (index 1 = most extreme)."""
    rows = []
    for label, vals, res, conv in _ends(analysis):
        for i, (v, r, c) in enumerate(zip(vals, res, conv), 1):
            rows.append({"end": label, "index": i, "eigenvalue": v, "residual": r, "converged": c})
    return rows
