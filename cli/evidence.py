"""``basins evidence MODEL``: the Laplace log evidence around θ* (MacKay 1992; Bishop PRML §3.5).

Also the renderers ``basins summary`` uses for a report's ``/evidence`` group.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import RenderableType
from rich.table import Table

from .common import Command, fmt, output_options, positive_or_auto, problem_options


@click.command()
@problem_options
@click.option("--prior-precision", callback=positive_or_auto(), default="auto", show_default=True,
              help="δ of the prior N(0, δ⁻¹I), or auto (maximise the evidence over δ).")
@click.option("--noise-std", type=click.FloatRange(min=0, min_open=True),
              help="mse: Gaussian noise σ (default: estimated from the residual, σ² = L(w*)).")
@click.option("--curvature", type=click.Choice(["hessian", "ggn", "both"]), default="hessian", show_default=True,
              help="Hessian of the NLL, its generalised Gauss–Newton part, or both (with their difference, "
                   "a model-error term).")
@click.option("--method", type=click.Choice(["auto", "exact", "slq"]), default="auto", show_default=True,
              help="log det: dense (auto when P ≤ 4096 and it fits in memory; exact, no interval) or stochastic "
                   "Lanczos quadrature with a 95% interval.")
@click.option("--probes", "num_probes", type=click.IntRange(min=2), default=30, show_default=True,
              help="slq: probe vectors.")
@click.option("--lanczos-steps", "num_steps", type=click.IntRange(min=1), default=60, show_default=True,
              help="slq: Lanczos steps per probe.")
@click.option("--deflate", type=click.IntRange(min=0), default=20, show_default=True, help="slq: top eigenpairs kept exactly.")
@output_options
def evidence(**kw: Any) -> None:
    """Laplace log evidence: log p(D|w*) + log p(w*) + (P/2)·log 2π − ½·log det(H_nll + δI).

    In nats. H_nll is the P × P Hessian of the summed negative log-likelihood: basins' mean
    loss L over N terms becomes N·L for cross-entropy, nll (categorical), bce (Bernoulli) and
    the token losses (causal-lm, token-cross-entropy: the token NLL summed over the N valid
    tokens), and N·L/(2σ²) + (N/2)·log 2πσ² for mse with noise σ (--noise-std, or the MLE
    σ² = L(w*), said so). The prior is N(0, δ⁻¹I); --prior-precision auto maximises the
    evidence over δ (one eigendecomposition or one SLQ run serves every δ).

    --method exact: the dense float64 curvature by the one dense rule (P ≤ 4096 and it fits),
    reported as exact with no interval. --method slq: the top --deflate eigenpairs kept exactly,
    the rest of log det by stochastic Lanczos quadrature, with a 95% Student-t interval over
    probes that is never of zero width. --curvature ggn uses the generalised Gauss–Newton
    JᵀH_outJ (positive semi-definite, so defined away from a minimum, where the Hessian
    evidence with --prior-precision auto is unbounded and refused); both gives the two
    evidences and their difference, a model-error term of the Laplace approximation. basins
    summary shows nullity, probed log-volume, LLC and log evidence side by side.

    Cost: exact, P HVPs (or GGN products) and 24·P² bytes; slq, the deflation's Lanczos HVPs
    plus probes × Lanczos steps (default 30 × 60); twice with --curvature both. Set-up: the loss
    and gradient at θ* (twice, to check determinism), a dtype audit (one forward) and at most
    about one HVP for the route choice.

    References: MacKay 1992; Bishop, Pattern Recognition and Machine Learning, §3.5 and §4.4;
    Daxberger et al., "Laplace Redux", NeurIPS 2021.

    \b
    Examples:
      basins evidence model.pt
      basins evidence model.pt --prior-precision 1.0 --noise-std 0.1 --json
      basins evidence model.pt --method slq --curvature ggn -o report.h5
    """
    from basins.analyses.evidence import evidence as laplace

    c = Command(kw)
    result = c.run(f"evidence ({kw['method']})", laplace, c.problem, seed=c.seed,
                   **c.options("prior_precision", "noise_std", "curvature", "method", "num_probes", "num_steps",
                               "deflate"))
    c.note(*result.notes)
    c.log.print(f"evidence ({result.method}): {result.num_matvecs} curvature products in {c.seconds:.2f} s")
    if result.model_error is not None:
        gap, lo, hi = result.model_error
        c.log.print(f"model error (Hessian − GGN evidence): {gap:.6g} [{lo:.6g}, {hi:.6g}] nats")
    c.emit("evidence", result.record(), tables=summary_tables)


def evidence_text(a: dict[str, Any], prefix: str = "") -> str:
    """``log p(D) [lo, hi]``, or ``log p(D) (exact)`` for the dense method."""
    v = a.get(f"{prefix}log_evidence")
    if not isinstance(v, (int, float)):
        return "-"
    ci = a.get(f"{prefix}log_evidence_ci")
    if a.get(f"{prefix}method", a.get("method")) == "exact":
        return f"{v:.6g} (exact)"
    if isinstance(ci, list) and len(ci) == 2:
        return f"{v:.6g} [{ci[0]:.6g}, {ci[1]:.6g}]"
    return f"{v:.6g}"


def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """Rich table for an ``/evidence`` group."""
    a = analysis.get("attrs", {})
    t = Table(title=f"Laplace log evidence ({a.get('method')}, {a.get('curvature')})", show_header=False,
              title_justify="left")
    t.add_column("quantity", style="bold")
    t.add_column("value")
    t.add_row("log p(D)", evidence_text(a) + " nats")
    if a.get("ggn_log_evidence") is not None:
        t.add_row("log p(D), GGN", evidence_text(a, "ggn_") + " nats")
        err, ci = a.get("model_error"), a.get("model_error_ci")
        if isinstance(err, (int, float)) and isinstance(ci, list) and len(ci) == 2:
            t.add_row("model error (H − GGN)", f"{err:.6g} [{ci[0]:.6g}, {ci[1]:.6g}] nats")
    t.add_row("log p(D|w*)", fmt(a.get("log_likelihood")))
    t.add_row("log Occam factor", fmt(a.get("log_occam")))
    t.add_row("log p(w*)", fmt(a.get("log_prior")))
    t.add_row("log det Λ", fmt(a.get("logdet")))
    t.add_row("prior precision δ", f"{fmt(a.get('prior_precision'))} ({a.get('prior_precision_rule')})")
    if a.get("noise_std") is not None:
        t.add_row("noise σ", f"{fmt(a.get('noise_std'))} ({a.get('noise_std_rule')})")
    t.add_row("likelihood", str(a.get("likelihood")))
    products = a.get("num_curvature_products", a.get("num_hvps"))
    t.add_row("cost", f"{products} curvature products, {fmt(a.get('wall_seconds'), 3)} s")
    return [t]


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of an ``/evidence`` group."""
    return {"log evidence": evidence_text(analysis.get("attrs", {}))}
