"""``basins landscape MODEL``: the loss along 1-D/2-D slices through θ*, or between two checkpoints.

Also the renderers ``basins summary`` uses for a report's ``/landscape`` group:
:func:`summary_tables` and :func:`summary_row`.
"""

from __future__ import annotations

import math
from typing import Any

import click
from rich.console import RenderableType
from rich.table import Table

from .common import (
    Command,
    LibraryOption,
    column,
    flag_errors,
    fmt,
    key_value_table,
    output_options,
    problem_options,
)


@click.command()
@problem_options
@click.option("--dims", type=click.Choice(["1", "2"]),
              help="A 1-D curve or a 2-D grid through θ*.  [default: 1]")
@click.option("--directions", type=click.Choice(["random", "top"]),
              help="random: Gaussian, filter-normalised (Li et al. 2018: each filter, the first dimension of each "
                   "weight tensor, scaled to the norm of θ*'s filter; biases and norm parameters held fixed), "
                   "seeded by --seed; top: the unit Hessian eigenvectors of the largest eigenvalues (Lanczos), "
                   "their eigenvalues recorded.  [default: random]")
@click.option("--points", "num_points", type=click.IntRange(min=2),
              help="Grid points per axis, θ* (t = 0) always among them (default 51 for 1-D, 21 for 2-D, 25 "
                   "along --to).")
@click.option("--extent", type=click.FloatRange(min=0, min_open=True),
              help="The grid spans [−extent, extent] (odd --points; even: one step short at the top). Units: "
                   "filter-normalised for random (default 1: each filter moved by its own norm); Euclidean "
                   "parameter distance for top (default 2·sqrt(2·max(L(θ*), 0.01)/λ), λ the smallest eigenvalue of "
                   "the slice: twice the distance where the quadratic model doubles the loss).")
@click.option("--to", "other_model", cls=LibraryOption, library_names=("other",), type=click.Path(), metavar="OTHER_MODEL",
              help="Instead of a slice: the loss on the straight line from MODEL (t = 0) to OTHER_MODEL (t = 1), "
                   "a checkpoint of the same architecture (opened like MODEL: --arch, --trust-pickle), its "
                   "barrier and whether the two share a basin.")
@click.option("--barrier-tol", "epsilon", type=click.FloatRange(min=0),
              help="With --to: one basin when the barrier ≤ this tolerance ε (loss units; default "
                   "max(1e-3·max(L(θa), L(θb)), 1e-6)).")
@click.option("--chunk", type=click.IntRange(min=1), default=16, show_default=True,
              help="Points per batched loss evaluation (memory ∝ chunk × (P + a data chunk's activations)).")
@output_options
def landscape(**kw: Any) -> None:
    """Loss along 1-D/2-D slices through θ*, or on the line to another checkpoint.

    Every value is the exact full-data mean loss, evaluated for batches of points at once
    (vmap). Only the parameters selected by --params move; buffers (BatchNorm statistics) and
    the other parameters stay MODEL's, on a slice and along the line alike.

    With --to, the barrier is max_t L((1−t)θa + tθb) − max(L(θa), L(θb)) with θa = MODEL,
    θb = OTHER_MODEL: the largest loss on the grid, refined by dichotomous search (12 steps of two
    points, 24 loss evaluations) on the grid interval(s) around it. It is the largest loss found, so a lower bound on the true
    barrier (a bump narrower than the grid step elsewhere can be missed: raise --points).
    L(θa) and L(θb) are the full-data losses at the ends; the two share a basin when the
    barrier is at most --barrier-tol (loss units).

    Random directions are Gaussian and filter-normalised: each filter of each weight tensor is
    scaled to the norm of that filter of θ*, and biases and normalisation parameters get no
    component (axes in filter-normalised units; direction_norms converts them to parameter
    distance). Top directions are unit Hessian eigenvectors (axes in parameter distance).

    Cost: one loss evaluation per grid point (points for 1-D, points² for 2-D; + 24 along
    --to); --directions top adds the Lanczos HVPs of the top eigenvectors. Memory: --chunk × P
    for the points of one batched call, never the whole grid.

    References: Li, Xu, Taylor, Studer & Goldstein, NeurIPS 2018 (filter-normalised slices);
    Frankle, Dziugaite, Roy & Carbin, ICML 2020 (linear mode connectivity).

    \b
    --json keys: 1-D: t, loss; 2-D: x, y, loss (loss[i][j] at x[i], y[j]:
    rows follow the first direction); --to: t, loss, barrier, barrier_t, loss_a,
    loss_b, epsilon, same_basin, line_length, other_model; and kind, directions,
    normalisation, extent, num_points, seed, direction_norms, direction_eigenvalues
    (top), num_loss_evals, num_hvps, wall_seconds, the problem's keys.
    Report group /landscape.

    \b
    Examples:
      basins landscape model.pt                          # 1-D random slice
      basins landscape model.pt --dims 2 --directions top -o r.h5
      basins landscape run/ckpt_100.pt --to run/ckpt_900.pt --data d.pt --json | jq .barrier
    """
    from basins.errors import InputError

    if kw["other_model"] is not None:
        given = [flag for key, flag in (("dims", "--dims"), ("directions", "--directions"), ("extent", "--extent"))
                 if kw[key] is not None]
        if given:
            raise InputError(f"--to draws the line between two checkpoints: it takes no {', '.join(given)}")
    elif kw["epsilon"] is not None:
        raise InputError("--barrier-tol is the one-basin tolerance of --to OTHER_MODEL; give --to or drop it")
    c = Command(kw)
    if kw["other_model"] is not None:
        result = _line(c)
        c.log.print(f"barrier {result.barrier:.4g} at t = {result.barrier_t:.4f}: "
                    f"{'one basin' if result.same_basin else 'separate basins'} at ε = {result.epsilon:.3g}")
    else:
        from basins.analyses.landscape import landscape_slice

        dims, directions = int(kw["dims"] or 1), kw["directions"] or "random"
        result = c.run(f"{dims}-D slice ({directions})", landscape_slice, c.problem, dims=dims, directions=directions,
                       seed=c.seed, **c.options("num_points", "extent", "chunk"))
    c.log.print(f"{result.num_loss_evals:,} loss evaluations"
                f"{f', {result.num_hvps:,} HVPs' if result.num_hvps else ''} in {c.seconds:.2f} s")
    c.emit("landscape", result.record(), tables=summary_tables)


def _line(c: Command) -> Any:
    """``--to``: load OTHER_MODEL matched against MODEL, then the line and its barrier."""
    from basins.analyses.landscape import REFINE_STEPS, linear_path
    from basins.files.loading import load_parameters_like
    from basins.files.loading.adapters import is_adapter_directory

    kw, problem, path = c.kw, c.problem, c.kw["other_model"]
    with flag_errors(by_message=False), c.log.status(f"loading {path}", spinner="dots"):
        other = load_parameters_like(path, problem.module, problem.space.names, arch=kw.get("arch"),
                                     trust_pickle=kw.get("trust_pickle", False),
                                     base_model=kw.get("base_model") if is_adapter_directory(path) else None)
    if other.differ:
        names = ", ".join(other.differ[:3]) + (", ..." if len(other.differ) > 3 else "")
        c.warn(f"{path} has other values of {len(other.differ)} buffer(s) or parameter(s) outside --params "
               f"({names}): the line holds MODEL's all along, so L at t = 1 is not OTHER_MODEL's own loss")
    points = kw["num_points"] or 25
    return c.run("loss along the line", linear_path, problem, other.theta, total=points + REFINE_STEPS,
                 num_points=points, other_model=str(path), other_model_sha256=other.model.sha256,
                 **c.options("epsilon", "chunk"))


# ---------------------------------------------------------------------- summary renderers
def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """The key numbers of a ``/landscape`` group, and the curve (1-D, line) as a table."""
    a = analysis.get("attrs", {})
    key = key_value_table(f"landscape ({a.get('kind')}, {a.get('directions')})")
    loss = column(analysis, "loss")
    flat = [v for row in loss for v in (row if isinstance(row, list) else [row])]
    finite = [v for v in flat if isinstance(v, (int, float)) and math.isfinite(v)]
    key.add_row("L(θ*)", fmt(a.get("loss_at_optimum")))
    if finite:
        key.add_row("loss on the grid", f"{fmt(min(finite))} … {fmt(max(finite))}"
                                        + (f" ({len(flat) - len(finite)} not finite)" if len(finite) < len(flat) else ""))
    if a.get("kind") == "line":
        key.add_row("to", str(a.get("other_model")))
        key.add_row("L(θa), L(θb)", f"{fmt(a.get('loss_a'))}, {fmt(a.get('loss_b'))}")
        key.add_row("‖θb − θa‖", fmt(a.get("line_length"), 5))
        key.add_row("barrier (largest loss found − max end; a lower bound)",
                    f"{fmt(a.get('barrier'))} at t = {fmt(a.get('barrier_t'), 4)}")
        key.add_row("one basin", f"{'yes' if a.get('same_basin') else 'no'} at ε = {fmt(a.get('epsilon'), 3)}")
    else:
        key.add_row("grid", f"{a.get('num_points')} points per axis, extent {fmt(a.get('extent'), 4)} "
                            f"({a.get('axis_units')})")
        if a.get("normalisation"):
            key.add_row("normalisation", str(a.get("normalisation_rule") or a.get("normalisation")))
        norms = a.get("direction_norms")
        if norms is not None and len(norms):
            key.add_row("‖direction‖ (Euclidean)", ", ".join(fmt(float(v), 5) for v in norms))
        if a.get("direction_cosine") is not None:
            key.add_row("cos(direction 1, direction 2)", fmt(a.get("direction_cosine"), 3))
        eig = a.get("direction_eigenvalues")
        if eig is not None and len(eig):
            key.add_row("direction eigenvalues", ", ".join(fmt(float(v), 5) for v in eig))
    hvps = a.get("num_hvps") or 0
    key.add_row("cost", f"{a.get('num_loss_evals')} loss evaluations{f', {hvps} HVPs' if hvps else ''}, "
                        f"{fmt(a.get('wall_seconds'), 3)} s")
    tables: list[RenderableType] = [key]
    t = column(analysis, "t")
    if t and loss and a.get("kind") != "2d":
        curve = Table(title="loss along t", title_justify="left")
        curve.add_column("t", justify="right")
        curve.add_column("L", justify="right")
        step = max(1, len(t) // 25)  # at most ~25 rows; the report has every point
        for tv, lv in list(zip(t, loss))[::step]:
            curve.add_row(fmt(tv, 4), fmt(lv, 8))
        tables.append(curve)
    return tables


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of a ``/landscape`` group for ``basins summary`` of several reports."""
    a = analysis.get("attrs", {})
    if a.get("kind") == "line":
        return {"barrier": fmt(a.get("barrier"), 4), "barrier t": fmt(a.get("barrier_t"), 3),
                "one basin": "yes" if a.get("same_basin") else "no"}
    loss = [v for row in column(analysis, "loss") for v in (row if isinstance(row, list) else [row])]
    finite = [v for v in loss if isinstance(v, (int, float)) and math.isfinite(v)]
    return {"slice": f"{a.get('kind')} {a.get('directions')}", "max L on slice": fmt(max(finite), 5) if finite else "-"}
