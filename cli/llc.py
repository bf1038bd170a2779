"""``basins llc MODEL``: the local learning coefficient by SGLD (Lau et al. 2023).

Also the renderers ``basins summary`` uses for a report's ``/llc`` group:
:func:`summary_tables` and :func:`summary_row`.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import RenderableType
from rich.table import Table

from .common import (
    Timer,
    attr_value,
    emit,
    flag_names,
    fmt,
    load_problem,
    output_options,
    problem_options,
    progress_bar,
    stderr_console,
)


def _positive_or_auto(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None or value == "auto":
        return None
    try:
        x = float(value)
    except ValueError:
        raise click.BadParameter(f"a positive number or 'auto', got {value!r}") from None
    if not x > 0 or x != x or x == float("inf"):
        raise click.BadParameter(f"a positive number or 'auto', got {value!r}")
    return x


@click.command()
@problem_options
@click.option("--chains", type=click.IntRange(min=1), default=4, show_default=True, help="SGLD chains (seeds SEED, SEED+1, ...).")
@click.option("--draws", type=click.IntRange(min=1), default=1000, show_default=True, help="Steps kept per chain.")
@click.option("--burnin", type=click.IntRange(min=0), default=1000, show_default=True, help="Steps discarded per chain.")
@click.option("--nbeta", callback=_positive_or_auto, default="auto", show_default=True,
              help="nβ, the inverse temperature times n (auto: n/log n).")
@click.option("--gamma", callback=_positive_or_auto, default="auto", show_default=True,
              help="Localization γ in 1/parameter² (auto: 1).")
@click.option("--step-size", callback=_positive_or_auto, default="auto", show_default=True,
              help="SGLD step ε (auto: 0.1·2/(nβ·λ_max + γ)).")
@click.option("--sampler", type=click.Choice(["sgld", "rmsprop"]), default="sgld", show_default=True,
              help="SGLD, or RMSProp-preconditioned SGLD.")
@click.option("--no-batch-chains", is_flag=True, help="Loop over chains instead of one vmapped step for all.")
@output_options
def llc(**kw: Any) -> None:
    """Estimate the local learning coefficient λ̂ = nβ·(E_w[L] − L(w*)) by SGLD around w*.

    λ = P/2 at a regular minimum, smaller at a singular one. Chains step on minibatches of
    --batch-size examples (default min(n, 256)); E_w[L] − L(w*) is the mean of
    L_B(w) − L_B(w*) on each step's batch. The γ-pull of the localization is reported
    (llc_quadratic: what a quadratic basin with this Hessian would give).

    \b
    Examples:
      basins llc model.pt
      basins llc model.pt --chains 8 --draws 2000 --json
      basins llc model.pt --step-size 1e-5 --gamma 100 -o report.h5
    """
    from basins.analyses.llc import llc as estimate

    log = stderr_console(kw["quiet"])
    with Timer() as setup:
        loaded = load_problem(kw, log)
    problem = loaded.problem
    with Timer() as t, progress_bar(log, f"llc ({kw['sampler']})", total=kw["burnin"] + kw["draws"]) as update:
        with flag_names(num_chains="--chains", num_draws="--draws", num_burnin="--burnin", nbeta="--nbeta",
                        gamma="--gamma", step_size="--step-size", batch_size="--batch-size", sampler="--sampler"):
            result = estimate(problem, num_chains=kw["chains"], num_draws=kw["draws"], num_burnin=kw["burnin"],
                              nbeta=kw["nbeta"], gamma=kw["gamma"], step_size=kw["step_size"],
                              batch_size=kw["batch_size"], sampler=kw["sampler"], seed=loaded.seed,
                              batched=not kw["no_batch_chains"], callback=update)
    for note in result.warnings:
        log.print(f"note: {note}")
    log.print(f"llc: {result.num_grads} minibatch gradients in {t.seconds:.2f} s")
    record = result.record()
    record.attrs.update(wall_seconds=t.seconds, setup_seconds=setup.seconds)

    def tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
        return summary_tables({**analysis, "attrs": {**analysis["attrs"], "notes": []}}, problem)

    emit(kw, log, loaded, "llc", record, warnings=[*loaded.warnings, *result.warnings], tables=tables)


def llc_text(a: dict[str, Any]) -> str:
    """``λ̂ ± se``."""
    v, se = a.get("llc"), a.get("llc_stderr")
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.4g} ± {se:.2g}" if isinstance(se, (int, float)) else f"{v:.4g}"


def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """Rich table for a ``/llc`` group: the estimate, settings, diagnostics, cost."""
    a = analysis.get("attrs", {})
    P = problem.get("num_params")
    t = Table(title="local learning coefficient (SGLD)", show_header=False, title_justify="left")
    t.add_column("quantity", style="bold")
    t.add_column("value")
    t.add_row("λ̂ ± se", llc_text(a) + (f"   (P/2 = {P / 2:g})" if isinstance(P, int) else ""))
    ci = attr_value(a, "llc_ci")
    if isinstance(ci, list) and len(ci) == 2:
        t.add_row("95% interval", f"[{fmt(ci[0], 4)}, {fmt(ci[1], 4)}]")
    per = attr_value(a, "llc_per_chain")
    if isinstance(per, list):
        t.add_row("per chain", ", ".join(fmt(x, 4) for x in per))
    if a.get("llc_quadratic") is not None:
        t.add_row("quadratic prediction", f"{fmt(a.get('llc_quadratic'), 4)} (γ bias {fmt(a.get('gamma_bias'), 3)})")
    t.add_row("nβ, γ, ε", f"{fmt(a.get('nbeta'), 4)}, {fmt(a.get('gamma'), 4)}, {fmt(a.get('step_size'), 4)}")
    t.add_row("step size rule", str(a.get("step_size_rule", "-")))
    t.add_row("chains × draws (+burn-in)", f"{a.get('num_chains')} × {a.get('num_draws')} (+{a.get('num_burnin')}), "
              f"batch {a.get('batch_size')}, {a.get('sampler')}")
    d = attr_value(a, "diagnostics")
    if isinstance(d, dict):
        t.add_row("diagnostics", f"below L(w*) {fmt(d.get('frac_below_init'), 3)}, MALA acceptance "
                  f"{fmt(d.get('acceptance'), 3)}, R-hat {fmt(d.get('rhat'), 4)}")
    t.add_row("cost", f"{a.get('num_grads')} minibatch gradients, {fmt(a.get('wall_seconds'), 3)} s")
    return [t]


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of a ``/llc`` group."""
    return {"LLC": llc_text(analysis.get("attrs", {}))}
