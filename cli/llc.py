"""``basins llc MODEL``: the local learning coefficient by SGLD (Lau et al. 2023).

Also the renderers ``basins summary`` uses for a report's ``/llc`` group:
:func:`summary_tables` and :func:`summary_row`.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import RenderableType

from .common import (
    Command,
    flag_errors,
    fmt,
    key_value_table,
    output_options,
    positive_or_auto,
    problem_options,
)


def _steps_or_auto(least: int) -> Any:
    def parse(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
        if value == "auto":
            return "auto"
        try:
            k = int(value)
        except ValueError:
            raise click.BadParameter(f"an integer ≥ {least} or 'auto', got {value!r}") from None
        if k < least:
            raise click.BadParameter(f"an integer ≥ {least} or 'auto', got {value!r}")
        return k

    return parse


#: the rule of basins.analyses.llc.sampler.STEP_RULE, word for word (a test checks it and the README)
STEP_RULE = (
             "auto: ε = 1/a, a the largest curvature of nβ·L + γ‖w − w*‖²/2 met so far (Lanczos at w*, then "
             "power iteration on each chain's minibatch Hessian at its start and at 8 points of burn-in); during "
             "burn-in ε backs off ×0.7 per 100 steps with MALA acceptance < 0.8, and a divergence (non-finite, or γ‖w − w*‖² > 4(dim + 10)) halves the "
             "chain's ε and restarts it; ε is then frozen (smallest over chains) for the draws; Leimkuhler–Matthews "
             "steps (no O(ε) bias on quadratic directions)")
STEP_HELP = f"SGLD step ε ({STEP_RULE})."


@click.command()
@problem_options
@click.option("--chains", "num_chains", type=click.IntRange(min=1), default=4, show_default=True,
              help="Independent SGLD chains (numpy SeedSequence(SEED).spawn(CHAINS): seeds never share a chain).")
@click.option("--draws", "num_draws", callback=_steps_or_auto(1), default="auto", show_default=True,
              help="Steps kept per chain, or auto: 1000, doubled until R-hat and the trend test pass and the s.e. "
                   "is at most 4% of λ̂, or --max-steps are spent.")
@click.option("--burnin", "num_burnin", callback=_steps_or_auto(0), default="1000", show_default=True,
              help="Steps discarded per chain, or auto: 1000, and draws that fail the trend test become burn-in.")
@click.option("--max-steps", type=click.IntRange(min=1), default=16000, show_default=True,
              help="Budget per chain (burn-in + draws) for --draws/--burnin auto.")
@click.option("--nbeta", callback=positive_or_auto(None), default="auto", show_default=True,
              help="nβ, the inverse temperature times N (auto: N/log N, N the loss's terms: valid tokens for "
                   "token losses, examples × outputs for mse).")
@click.option("--gamma", callback=positive_or_auto(None), default="auto", show_default=True,
              help="Localization γ in 1/parameter² (auto: 1).")
@click.option("--step-size", callback=positive_or_auto(None), default="auto", show_default=True, help=STEP_HELP)
@click.option("--minibatch", type=click.IntRange(min=1), default=256, show_default=True,
              help="Examples per SGLD step and chain (the memory chunk is --batch-size).")
@click.option("--sampler", type=click.Choice(["sgld", "rmsprop"]), default="sgld", show_default=True,
              help="SGLD, or RMSProp-preconditioned SGLD (preconditioner fixed after half the burn-in).")
@click.option("--per-block", "per_block", multiple=True, metavar="DEPTH|GLOB",
              help="One weight-refined LLC per block of parameters (a module depth, or globs), the others held at "
                   "w* (Wang et al. 2024).")
@click.option("--quadratic/--no-quadratic", "quadratic", default=True, show_default=True,
              help="Also compute llc_quadratic, the λ of a quadratic basin with this Hessian (P HVPs, or 300 by SLQ).")
@click.option("--batch-chains/--no-batch-chains", "batched", default=True, show_default=True,
              help="One vmapped step for all chains, or a loop over chains.")
@output_options
def llc(**kw: Any) -> None:
    """Estimate the local learning coefficient λ̂ = nβ·(E_w[L] − L(w*)) by SGLD around w*.

    SGLD samples the localized tempered posterior ∝ exp(−nβ·L(w) − (γ/2)‖w − w*‖²). λ is
    dimensionless: P/2 at a regular minimum, smaller at a singular one (reduced-rank
    regression: Aoyagi & Watanabe 2005). nβ = N/log N by default, N the loss's
    terms (valid tokens for the token losses, examples × outputs for mse; the output says
    which). The chains (numpy SeedSequence(SEED).spawn: no two seeds share a chain) advance
    together in one vmap step, each on its own minibatch of --minibatch examples (the memory
    chunk stays --batch-size); E_w[L] − L(w*) is the mean of L_B(w) − L_B(w*) on each step's
    batch (unbiased; exact when the minibatch is all n). Under torchrun each process draws its
    share of every minibatch from its shard, stratified, and the sums are reduced. Named
    inputs, ModelOutput, (sum, count) and token losses, fixed-batch .pt2 exports and the
    float64 loss work as in every command.

    Chains start at dispersed points within 1/√γ of w* (radius halved until nβ·(L − L(w*))
    ≤ P/2), so that split R-hat sees a transient they would otherwise share. The step-size
    rule is --step-size below. The interval is Student-t with the degrees of freedom of its
    standard error (batch means within chains, 10 per chain, or each chain's effective
    sample size, or the spread between chains when larger); the effective sample size is
    reported. converged: false (and a note) when split R-hat > 1.05 or the first 20% of the
    draws differ from the last 50% (trend |z| > 3); --draws auto (the default) and --burnin
    auto extend the run until both pass and the s.e. is at most 4% of λ̂, or --max-steps are
    spent.

    Also reported: llc_quadratic, the λ of a quadratic basin with this Hessian at this nβ and γ
    (Σ ½·nβhᵢ/(nβhᵢ + γ)), a reference, not a correction; and the critical-point test,
    ‖∇L(w*)‖ against its sampling noise (per-example gradients of 64 examples) and nβ‖∇L‖
    against the localization force √γ. With --params GLOB, the weight-refined LLC of that
    block (the other parameters held at w*; Wang et al. 2024); --per-block gives one per
    block. --sampler rmsprop preconditions (fixed after half the burn-in, ε then set from the
    preconditioned curvature); it is not validated against a truth yet.

    Cost: chains × (burn-in + draws) minibatch gradients (default 4 × (1,000 + 1,000 to 15,000)) and as many
    minibatch losses at w*, plus MALA checks (1/4 of burn-in, 1/20 of draws) and curvature
    checks (8 × 9 minibatch HVPs per chain in burn-in); in full-data HVPs, ≤ 50 for λ_max by
    Lanczos at w* and P (dense, P ≤ 2000) or 300 (SLQ) for llc_quadratic (--no-quadratic:
    none). Memory is planned before the work and the plan printed on stderr (and stored as
    memory_plan): the chains' state and one step's buffers, the Lanczos basis, and
    llc_quadratic's vectors (not computed, with a note, when they do not fit --memory).

    References: Lau, Furman, Wang, Murfet & Wei 2023 (the estimator); Watanabe, Algebraic
    Geometry and Statistical Learning Theory, 2009; Aoyagi & Watanabe 2005; Wang et al. 2024
    (refined LLC); Leimkuhler & Matthews 2013 (the step).

    \b
    Examples:
      basins llc model.pt
      basins llc model.pt --chains 8 --draws auto --burnin auto --json
      basins llc gpt2-dir --data tok.pt --loss causal-lm --params 'transformer.h.0.*'
      basins llc model.pt --step-size 1e-5 --gamma 100 -o report.h5
    """
    from basins.analyses.llc import llc as estimate
    from basins.analyses.llc import plan_llc

    c = Command(kw, plan_line=False)
    with flag_errors():
        plan = plan_llc(c.problem, **c.options("num_chains", "minibatch", "sampler", "step_size", "quadratic"))
    c.print_plan(plan.describe())
    planned = sum(1000 if kw[n] == "auto" else kw[n] for n in ("num_burnin", "num_draws"))
    opts = dict(seed=c.seed, **c.options("num_chains", "num_draws", "num_burnin", "nbeta", "gamma", "step_size",
                                         "minibatch", "sampler", "batched", "quadratic", "max_steps"))
    if kw["per_block"]:
        _per_block(c, opts, planned)
        return
    block = " ".join(c.problem.selection.patterns) if c.problem.selection.patterns else None
    result = c.run(f"llc ({kw['sampler']})", estimate, c.problem, total=planned, block=block, memory_plan=plan,
                   **opts)
    c.note(*result.warnings)
    c.warnings += result.warnings
    c.log.print(f"llc: nβ = {result.nbeta:.6g} ({result.nbeta_rule}); {result.num_grads} minibatch gradients in "
                f"{c.seconds:.2f} s")
    record = result.record()
    minibatch_counts(record.attrs)

    def tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
        return summary_tables({**analysis, "attrs": {**analysis["attrs"], "notes": []}}, problem)

    c.emit("llc", record, tables=tables)


def _per_block(c: Command, opts: dict[str, Any], planned: int) -> None:
    """``--per-block``: one weight-refined LLC per block, group ``/llc_blocks``."""
    from basins.analyses.blocks import parse_blocks
    from basins.analyses.llc import llc_per_block
    from basins.record import Array, Record

    from .llc_blocks import summary_tables as block_tables

    with flag_errors():
        blocks = parse_blocks(c.problem.space.names, list(c.kw["per_block"]))

    def each_block(callback: Any) -> list[Any]:
        results = []
        for i, block in enumerate(blocks):
            def relay(p: Any, i: int = i) -> None:
                callback(type(p)(p.phase, p.done + i * planned, planned * len(blocks), p.unit, info=p.info))

            results.extend(llc_per_block(c.problem, [block], callback=relay, **opts))
        return results

    results = c.run(f"llc of {len(blocks)} blocks", each_block, total=planned * len(blocks))
    notes = [f"block {r.block}: {w}" for r in results for w in r.warnings]
    c.note(*notes)
    c.warnings += notes
    attrs = {"blocks": " ".join(c.kw["per_block"]), "block_names": [r.block for r in results],
             "method": "weight-refined LLC (Wang et al. 2024): SGLD on the block, the other parameters at w*",
             "nbeta": results[0].nbeta, "nbeta_rule": results[0].nbeta_rule, "gamma": results[0].gamma,
             "num_chains": results[0].num_chains, "seed": c.seed,
             "num_minibatch_grads": sum(r.num_grads for r in results), "count_units": MINIBATCH_UNITS,
             "notes": notes}
    arrays = {
        "block_num_params": Array([r.block_num_params for r in results], "P of the block", None),
        "llc": Array([r.llc for r in results], "weight-refined LLC of the block", None),
        "llc_stderr": Array([r.llc_stderr for r in results], "its standard error", None),
        "llc_ci_low": Array([r.llc_ci[0] for r in results], "95% Student-t interval, low end", None),
        "llc_ci_high": Array([r.llc_ci[1] for r in results], "95% Student-t interval, high end", None),
        "step_size": Array([r.step_size for r in results], "frozen SGLD step ε", None),
        "converged": Array([r.converged for r in results], "R-hat and trend test passed", None),
    }
    c.emit("llc_blocks", Record(attrs, arrays), tables=block_tables)


#: what the minibatch counts of an /llc group count (the full-data counts are num_loss_evals, num_grads, num_hvps)
MINIBATCH_UNITS = ("num_minibatch_loss_evals/num_minibatch_grads count evaluations on one chain's minibatch; "
                   "num_loss_evals, num_grads and num_hvps count full-data work, set-up included")


def minibatch_counts(attrs: dict[str, Any]) -> None:
    """Move the sampler's own counts (of minibatch evaluations, not of ``problem.counters``) to
    ``num_minibatch_loss_evals``/``num_minibatch_grads``: ``num_loss_evals`` and ``num_grads`` are the
    full-data counts of every command."""
    attrs["num_minibatch_loss_evals"] = attrs.pop("num_loss_evals", 0)
    attrs["num_minibatch_grads"] = attrs.pop("num_grads", 0)
    attrs["count_units"] = MINIBATCH_UNITS


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
    t = key_value_table("local learning coefficient (SGLD)")
    t.add_row("λ̂ ± se", llc_text(a) + (f"   (P/2 = {P / 2:g})" if isinstance(P, int) else ""))
    ci = a.get("llc_ci")
    if isinstance(ci, list) and len(ci) == 2:
        t.add_row("95% interval", f"[{fmt(ci[0], 4)}, {fmt(ci[1], 4)}] (Student t, {a.get('llc_ci_dof', '-')} "
                  f"degrees of freedom; effective sample size {fmt(a.get('ess'), 4)})")
    per = a.get("llc_per_chain")
    if isinstance(per, list):
        t.add_row("per chain", ", ".join(fmt(x, 4) for x in per))
    if a.get("block"):
        t.add_row("block", f"{a.get('block')} ({a.get('block_num_params')} parameters): weight-refined LLC "
                  "(Wang et al. 2024)")
    if a.get("llc_quadratic") is not None:
        t.add_row("quadratic basin λ", f"{fmt(a.get('llc_quadratic'), 4)} (a quadratic basin with this Hessian at "
                  "this nβ, γ; a reference, not a correction)")
    t.add_row("nβ", f"{fmt(a.get('nbeta'), 4)} ({a.get('nbeta_rule', '-')})")
    t.add_row("γ, ε", f"{fmt(a.get('gamma'), 4)}, {fmt(a.get('step_size'), 4)} (first {fmt(a.get('step_size_initial'), 3)})")
    t.add_row("chains × draws (+burn-in)", f"{a.get('num_chains')} × {a.get('num_draws')} (+{a.get('num_burnin')}), "
              f"minibatch {a.get('minibatch')}, {a.get('sampler')}")
    d = a.get("diagnostics")
    if isinstance(d, dict):
        t.add_row("diagnostics", f"converged {'yes' if d.get('converged') else 'NO'}: R-hat {fmt(d.get('rhat'), 4)}, "
                  f"trend z {fmt(d.get('trend_z'), 3)}, MALA acceptance {fmt(d.get('acceptance'), 3)}, below L(w*) "
                  f"{fmt(d.get('frac_below_init'), 3)}")
        t.add_row("critical point", f"‖∇L(w*)‖ {fmt(d.get('grad_norm'), 3)} vs sampling noise "
                  f"{fmt(d.get('grad_noise'), 3)}")
    r = a.get("restarts")
    if isinstance(r, list) and r:
        t.add_row("restarts", "; ".join(map(str, r)))
    grads = a.get("num_minibatch_grads", a.get("num_grads"))  # num_grads: a report written before the split
    t.add_row("cost", f"{grads} minibatch gradients, {a.get('num_hvps', '-')} HVPs, {fmt(a.get('wall_seconds'), 3)} s")
    return [t]


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of a ``/llc`` group."""
    return {"LLC": llc_text(analysis.get("attrs", {}))}
