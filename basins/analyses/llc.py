"""Local learning coefficient (LLC) by SGLD on the localized tempered posterior.

Estimator (Lau et al. 2023, "Quantifying degeneracy in singular models via the learning
coefficient"; Watanabe, "Algebraic Geometry and Statistical Learning Theory", 2009):

    λ̂ = nβ · (E_w[L(w)] − L(w*)),   w ~ p(w) ∝ exp(−nβ·L(w) − (γ/2)‖w − w*‖²),

n the number of examples, L basins' full-data mean loss, β = 1/log n by default (so
nβ = n/log n). λ = P/2 at a regular minimum, smaller at a singular one.

Which losses enter: each chain step draws a minibatch B (``batch_size`` examples, per chain)
and evaluates L_B(w) with its gradient, and L_B(w*) on the same batch (one extra forward,
no backward). E_w[L(w)] − L(w*) is estimated by the mean over draws of L_B(w) − L_B(w*):
unbiased, because B is drawn independently of w, and the common batch cancels most of the
minibatch noise (a control variate). With ``batch_size ≥ n`` this is the exact full-data
difference. The same pair decides ``frac_below_init`` (steps with L_B(w) < L_B(w*)).

Sampler: SGLD, ``w ← w − (ε/2)·∇U(w) + √ε·ξ`` with ``U = nβ·L_B + (γ/2)‖w − w*‖²``, or
RMSProp-preconditioned SGLD (Li et al. 2016) with ``G = 1/(1e-8 + √V)`` scaling drift and noise;
G adapts during the first half of burn-in and is then frozen (a fixed G leaves the stationary
distribution exact up to discretisation; an adapting one, without Li et al.'s Γ term, does not).
With ``auto`` ε, the frozen G sets ε again: 0.05·2/λ_max(G½(nβH + γ)G½) (20 more HVPs), so that
the preconditioned step is as stable as plain SGLD's; without this, G's large entries in flat
directions made the discretisation inflate λ̂.
All chains advance together: one ``vmap`` over a stacked ``(C, P)`` parameter axis
(``torch.func.functional_call``), with a per-chain loop as the fallback (``batched=False``).

Step size ``auto``: ε = 0.05 · 2/(nβ·λ_max + γ), λ_max by 20 power iterations on H (20 HVPs).
For a quadratic basin the SGLD stationary variance in direction i is 1/(aᵢ(1 − εaᵢ/4)),
aᵢ = nβhᵢ + γ, so this ε inflates each direction's share of λ̂ by at most ~2.6%
(``llc_quadratic_sgld`` gives the prediction with this inflation).

γ's pull: for a quadratic basin with Hessian eigenvalues hᵢ the estimator converges to
``Σᵢ ½·nβhᵢ/(nβhᵢ + γ)`` (``llc_quadratic``), not P/2. ``gamma_bias = P/2 − llc_quadratic``
is computed from the dense Hessian (P ≤ 2000) or SLQ otherwise and reported; ``llc`` is
the raw estimate (not corrected). Default γ = 1 (``DEFAULT_GAMMA``, in 1/parameter²): on
reduced-rank regression γ = 0.01·nβ·λ_max pulled λ̂ ~18% low, γ = 1 within ~9%; a smaller
γ lets flat directions wander farther and mix more slowly (relaxation ~1/(εγ) steps).

Diagnostics: ``frac_below_init`` (warn > 0.25), MALA acceptance of the SGLD proposal on
the same batch every ``MALA_EVERY`` steps (warn < 0.9), split R-hat of the per-chain
λ̂ traces (warn > 1.1). A non-finite loss or parameter raises :class:`ComputeError`.

Cost: C·(burnin + draws) minibatch gradients, as many minibatch losses at w*, plus 1/
``MALA_EVERY`` as many extra gradients for MALA, plus 20 HVPs (auto ε) and the γ-bias
Hessian (P HVPs dense, or 10·30 SLQ).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, grad_and_value, vmap

from basins.engine.batch import require_tensor
from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError
from basins.progress import Progress, ProgressCallback
from basins.record import Array, Record

__all__ = ["LLCResult", "llc", "split_rhat", "quadratic_llc", "MALA_EVERY", "SAMPLERS", "DEFAULT_GAMMA"]

SAMPLERS = ("sgld", "rmsprop")
MALA_EVERY = 10
DEFAULT_GAMMA = 1.0
DENSE_MAX = 2000


@dataclass
class LLCResult:
    """An LLC estimate with its chains.

    Attributes:
        llc, llc_stderr, llc_ci: mean over chains of the per-chain λ̂, its standard error
            across chains, and the 95% normal interval (dimensionless, like P/2).
        llc_per_chain: ``(C,)`` per-chain λ̂.
        traces: ``(C, draws)`` per-draw nβ·(L_B(w) − L_B(w*)).
        loss_traces: ``(C, burnin + draws)`` minibatch loss L_B(w) at every step.
        llc_quadratic, gamma_bias: the quadratic-basin prediction Σ½nβh/(nβh+γ) and P/2 minus it.
    """

    llc: float
    llc_stderr: float
    llc_ci: tuple[float, float]
    llc_per_chain: list[float]
    nbeta: float
    gamma: float
    step_size: float
    step_size_rule: str
    gamma_rule: str
    sampler: str
    seeds: list[int]
    num_chains: int
    num_draws: int
    num_burnin: int
    batch_size: int
    frac_below_init: float
    acceptance: float
    rhat: float
    llc_quadratic: float | None
    llc_quadratic_sgld: float | None
    gamma_bias: float | None
    gamma_bias_method: str
    num_loss_evals: int
    num_grads: int
    num_hvps: int
    batched: bool
    steps_per_second: float
    traces: torch.Tensor
    loss_traces: torch.Tensor
    loss_at_optimum: float
    warnings: list[str] = field(default_factory=list)

    def record(self) -> Record:
        """The ``/llc`` report group and ``--json`` keys."""
        attrs: dict[str, Any] = {
            "llc": self.llc, "llc_stderr": self.llc_stderr, "llc_ci": list(self.llc_ci),
            "llc_per_chain": self.llc_per_chain, "nbeta": self.nbeta, "gamma": self.gamma, "gamma_rule": self.gamma_rule,
            "step_size": self.step_size, "step_size_rule": self.step_size_rule, "sampler": self.sampler,
            "seeds": self.seeds, "num_chains": self.num_chains, "num_draws": self.num_draws,
            "num_burnin": self.num_burnin, "batch_size": self.batch_size,
            "diagnostics": {"frac_below_init": self.frac_below_init, "acceptance": self.acceptance, "rhat": self.rhat},
            "llc_quadratic": self.llc_quadratic, "llc_quadratic_sgld": self.llc_quadratic_sgld,
            "gamma_bias": self.gamma_bias,
            "gamma_bias_method": self.gamma_bias_method,
            "num_loss_evals": self.num_loss_evals, "num_grads": self.num_grads, "num_hvps": self.num_hvps,
            "count_units": "num_loss_evals/num_grads count minibatch evaluations of batch_size examples per chain",
            "batched": self.batched, "steps_per_second": self.steps_per_second, "notes": self.warnings,
        }
        arrays = {
            "llc_trace": Array(self.traces, "per chain and draw: nβ·(L_B(w) − L_B(w*)) on the step's minibatch", None),
            "loss_trace": Array(self.loss_traces, "per chain and step (burn-in first): minibatch loss L_B(w)", "loss"),
        }
        return Record(attrs, arrays)


def split_rhat(x: torch.Tensor) -> float:
    """Split R-hat (Gelman et al., BDA3 §11.4) of ``(C, D)`` traces; NaN when D < 4."""
    C, D = x.shape
    if D < 4:
        return math.nan
    h = D // 2
    s = torch.cat([x[:, :h], x[:, h : 2 * h]]).to(torch.float64)
    m = s.shape[1]
    W = s.var(dim=1).mean()
    B = m * s.mean(dim=1).var()
    if float(W) == 0.0:
        return 1.0 if float(B) == 0.0 else math.inf
    var = (m - 1) / m * W + B / m
    return float(torch.sqrt(var / W))


def quadratic_llc(eigenvalues: torch.Tensor, nbeta: float, gamma: float, step_size: float = 0.0) -> float:
    """Σᵢ ½·nβhᵢ/((nβhᵢ + γ)(1 − εaᵢ/4)), aᵢ = nβhᵢ + γ, over eigenvalues hᵢ of H_L (clamped at 0):
    the limit of full-batch SGLD with step ε on a quadratic basin (ε = 0: exact Langevin)."""
    h = eigenvalues.to(torch.float64).clamp(min=0) * nbeta
    a = h + gamma
    return float((0.5 * h / (a * (1 - step_size * a / 4))).sum())


def _power_lambda_max(apply: Callable[[torch.Tensor], torch.Tensor], num_params: int, seed: int,
                      iters: int = 20) -> float:
    """|λ| of the largest-magnitude eigenvalue of the symmetric map ``apply`` (float64 CPU ``(P,)`` in
    and out) by ``iters`` power iterations from a seeded Gaussian start."""
    v = torch.randn(num_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lam = 0.0
    with torch.enable_grad():  # HVPs, also when called inside the sampler's no_grad block
        for _ in range(iters):
            v = v / v.norm()
            w = apply(v)
            lam = float(v @ w)
            if not math.isfinite(lam) or float(w.norm()) == 0.0:
                break
            v = w
    return abs(lam)


def _hvp64(problem: Problem, v: torch.Tensor) -> torch.Tensor:
    return problem.hvp(v.to(problem.dtype)).to("cpu", torch.float64)


def _lambda_max(problem: Problem, seed: int, iters: int = 20) -> float:
    """λ_max of H by power iterations. Cost: ``iters`` HVPs."""
    return _power_lambda_max(lambda v: _hvp64(problem, v), problem.num_params, seed, iters)


def _lambda_max_preconditioned(problem: Problem, G: torch.Tensor, nbeta: float, gamma: float, seed: int,
                               iters: int = 20) -> float:
    """λ_max of ``G½ (nβ·H + γI) G½`` (the drift's curvature under RMSProp preconditioning ``G``,
    shape ``(P,)``), by power iterations. Cost: ``iters`` HVPs."""
    root = G.to(torch.float64).sqrt().cpu()
    return _power_lambda_max(lambda v: root * (nbeta * _hvp64(problem, root * v) + gamma * root * v),
                             problem.num_params, seed + 7, iters)


def _gamma_bias(problem: Problem, nbeta: float, gamma: float, seed: int, eps: float) -> tuple[float, float, str]:
    P = problem.num_params
    if P <= DENSE_MAX:
        H = problem.hvp(torch.eye(P, dtype=problem.dtype)).to(torch.float64)
        ev = torch.linalg.eigvalsh((H + H.T) / 2)
        return quadratic_llc(ev, nbeta, gamma), quadratic_llc(ev, nbeta, gamma, eps), "exact"
    from basins.linalg.operator import Operator
    from basins.linalg.slq import slq

    r = slq(Operator(problem.hvp, P, problem.dtype, problem.device), num_probes=10, num_steps=30, seed=seed)
    q0 = [float((w * _half_ratio(t, nbeta, gamma, 0.0)).sum())
          for t, w in zip(r.nodes, r.weights)]
    q1 = [float((w * _half_ratio(t, nbeta, gamma, eps)).sum()) for t, w in zip(r.nodes, r.weights)]
    return P * sum(q0) / len(q0), P * sum(q1) / len(q1), "slq (10 probes × 30 steps)"


def _half_ratio(t: torch.Tensor, nbeta: float, gamma: float, eps: float) -> torch.Tensor:
    h = t.to(torch.float64).clamp(min=0) * nbeta
    a = h + gamma
    return 0.5 * h / (a * (1 - eps * a / 4))


def llc(
    problem: Problem,
    *,
    num_chains: int = 4,
    num_draws: int = 1000,
    num_burnin: int = 1000,
    nbeta: float | None = None,
    gamma: float | None = None,
    step_size: float | None = None,
    batch_size: int | None = None,
    sampler: str = "sgld",
    seed: int = 0,
    batched: bool = True,
    gamma_bias: bool = True,
    callback: ProgressCallback | None = None,
) -> LLCResult:
    """Estimate the local learning coefficient at w* = ``problem``'s θ*.

    Args:
        problem: model, data (in memory) and loss at w*.
        num_chains: C chains, chain c seeded by ``seed + c`` (recorded).
        num_draws, num_burnin: steps kept and discarded per chain.
        nbeta: nβ (default n/log n).
        gamma: localization γ (default :data:`DEFAULT_GAMMA`).
        step_size: ε (default ``auto``, see module docstring).
        batch_size: minibatch per chain step (default min(n, 256)).
        sampler: ``sgld`` or ``rmsprop``.
        batched: vmap all chains in one call (else a loop over chains).
        gamma_bias: compute ``llc_quadratic``/``gamma_bias`` (P HVPs dense or 300 by SLQ).

    Raises:
        InputError: a bad parameter, or streamed data.
        ComputeError: a chain produced a non-finite loss or parameter.
    """
    for name, v in (("num_chains", num_chains), ("num_draws", num_draws)):
        if v < 1:
            raise InputError(f"{name} must be ≥ 1, got {v}")
    if num_burnin < 0:
        raise InputError(f"num_burnin must be ≥ 0, got {num_burnin}")
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    for name, val in (("nbeta", nbeta), ("gamma", gamma), ("step_size", step_size)):
        if val is not None and not (math.isfinite(val) and val > 0):
            raise InputError(f"{name} must be a positive number, got {val}")
    n = problem.num_examples
    if n < 2:
        raise InputError("llc needs at least 2 examples (β = 1/log n)")
    X, Y = require_tensor(problem.inputs, "llc"), problem.targets
    b = min(n, batch_size or 256)
    if b < 1:
        raise InputError(f"batch_size must be ≥ 1, got {batch_size}")
    hvps0 = problem.counters.num_hvps
    nb = float(nbeta) if nbeta is not None else n / math.log(n)
    lam = _lambda_max(problem, seed) if step_size is None else math.nan
    g_val, gamma_rule = (DEFAULT_GAMMA, "default") if gamma is None else (float(gamma), "given")
    if step_size is None:
        eps = 0.1 / (nb * lam + g_val)
        eps_rule = f"auto: 0.05·2/(nβ·λ_max + γ), λ_max = {lam:.6g} by 20 power iterations"
    else:
        eps, eps_rule = float(step_size), "given"
    lq, lq_eps, gb_method = (_gamma_bias(problem, nb, g_val, seed, eps) if gamma_bias
                             else (None, None, "not computed"))
    P = problem.num_params
    w0 = problem.space.flatten(problem.params).detach().to(problem.dtype)
    C = num_chains
    seeds = [seed + c for c in range(C)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    buffers = problem.buffers
    module, loss_fn = problem.module, problem.loss_fn

    def loss_of(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, (problem.space.unflatten(theta), buffers), (x,))
        return loss_fn(out, y)

    gv = grad_and_value(loss_of)
    gv_all: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    lo_all: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    if batched:
        try:
            gv_all = vmap(gv)
            lo_all = vmap(loss_of)
            gv_all(w0.expand(C, P).clone(), X[:1].expand(C, *X[:1].shape).clone(), Y[:1].expand(C, *Y[:1].shape).clone())
        except Exception:  # noqa: BLE001 - models vmap cannot trace: loop over chains
            batched = False
    if not batched:
        def gv_loop(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outs = [gv(th[c], x[c], y[c]) for c in range(th.shape[0])]
            return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

        def lo_loop(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.stack([loss_of(th[c], x[c], y[c]) for c in range(th.shape[0])])

        gv_all, lo_all = gv_loop, lo_loop

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        if b >= n:
            idx = torch.arange(n).expand(C, n)
        else:
            idx = torch.stack([torch.randperm(n, generator=g)[:b] for g in gens])
        idx = idx.to(X.device)
        return X[idx], Y[idx]

    def noise() -> torch.Tensor:
        return torch.stack([torch.randn(P, generator=g, dtype=torch.float64) for g in gens]).to(w0.device, w0.dtype)

    def grad_u(th: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, lv = gv_all(th, x, y)
        return nb * g + g_val * (th - w0), lv

    def u_of(th: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        return nb * lv.to(torch.float64) + 0.5 * g_val * ((th - w0).to(torch.float64) ** 2).sum(-1)

    total = num_burnin + num_draws
    adapt_until = max(1, num_burnin // 2)  # rmsprop: G adapts, then stays fixed for the rest
    w = w0.expand(C, P).clone()
    V = torch.zeros_like(w)
    G = torch.ones_like(w)
    traces = torch.zeros(C, num_draws, dtype=torch.float64)
    losses = torch.zeros(C, total, dtype=torch.float64)
    below = 0
    acc_sum, acc_n, ngrad, nloss = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in range(total):
            x, y = batch()
            with torch.enable_grad():
                gU, lv = grad_u(w, x, y)
            l0 = lo_all(w0.expand(C, P), x, y)
            ngrad += C
            nloss += C
            if not (torch.isfinite(lv).all() and torch.isfinite(gU).all() and torch.isfinite(w).all()):
                bad = int((~torch.isfinite(lv)).nonzero()[0, 0]) if not torch.isfinite(lv).all() else 0
                raise ComputeError(f"SGLD chain {bad} diverged at step {t} (non-finite loss or parameters); "
                                   f"use a smaller step_size (now {eps:.3g}) or a larger gamma (now {g_val:.3g})")
            losses[:, t] = lv.to(torch.float64)
            if t >= num_burnin:
                d = (lv - l0).to(torch.float64)
                traces[:, t - num_burnin] = nb * d
                below += int((d < 0).sum())
            if sampler == "rmsprop" and (t < adapt_until or t == 0):  # adapt in the first half of burn-in
                V = 0.99 * V + 0.01 * gU**2 if t else gU**2
                G = 1.0 / (1e-8 + V.sqrt())
                if t == adapt_until - 1 and step_size is None:  # G frozen: ε for the preconditioned drift
                    lam_g = _lambda_max_preconditioned(problem, G.amax(0), nb, g_val, seed)
                    eps = 0.1 / lam_g
                    eps_rule = (f"auto, rmsprop: 0.05·2/λ_max(G½(nβH + γ)G½) = 0.1/{lam_g:.6g} with G frozen after "
                                f"{adapt_until} burn-in steps (largest G over chains; 20 power iterations); "
                                f"the first {adapt_until} steps used 0.1/(nβ·λ_max + γ)")
            elif sampler == "sgld" and t == 0:
                G = torch.ones_like(w)
            w_new = w - 0.5 * eps * G * gU + (eps * G).sqrt() * noise()
            if t % MALA_EVERY == 0:
                with torch.enable_grad():
                    gU2, lv2 = grad_u(w_new, x, y)
                ngrad += C
                fwd = -((w_new - w + 0.5 * eps * G * gU) ** 2 / G).to(torch.float64).sum(-1) / (2 * eps)
                bwd = -((w - w_new + 0.5 * eps * G * gU2) ** 2 / G).to(torch.float64).sum(-1) / (2 * eps)
                log_a = -u_of(w_new, lv2) + u_of(w, lv) + bwd - fwd
                a = torch.exp(torch.clamp(log_a, max=0.0))
                a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
                acc_sum += float(a.sum())
                acc_n += C
            w = w_new
            if callback is not None:
                callback(Progress("sgld", t + 1, total, "steps", info=f"{C} chains"))
    wall = time.perf_counter() - t0
    per_chain = traces.mean(dim=1)
    est = float(per_chain.mean())
    se = float(per_chain.std() / math.sqrt(C)) if C > 1 else math.nan
    if C == 1:  # one chain: the standard error from batch means (10 batches)
        k = max(1, num_draws // 10)
        bm = traces[0, : 10 * k].reshape(-1, k).mean(dim=1) if num_draws >= 10 else traces[0]
        se = float(bm.std() / math.sqrt(bm.numel())) if bm.numel() > 1 else math.nan
    ci = (est - 1.96 * se, est + 1.96 * se)
    frac = below / (C * num_draws)
    acc = acc_sum / acc_n if acc_n else math.nan
    rhat = split_rhat(traces) if C > 1 else math.nan
    notes = []
    if frac > 0.25:
        notes.append(f"{frac:.0%} of draws have loss below L(w*) on their batch: w* is not a minimum, "
                     "or the chains are still descending (more burn-in)")
    if acc < 0.9:
        notes.append(f"MALA acceptance {acc:.2f} < 0.9: the step size {eps:.3g} is too large for exact sampling")
    if rhat > 1.1:
        notes.append(f"R-hat {rhat:.3f} > 1.1: chains disagree; more draws or burn-in")
    if lq is not None:
        notes.append(f"γ's pull: a quadratic basin with this Hessian gives {lq:.4g} instead of P/2 = {P / 2:g} "
                     f"(bias {P / 2 - lq:.4g}, {gb_method}); with SGLD's step {eps:.3g}: {lq_eps:.4g}")
    return LLCResult(
        llc=est, llc_stderr=se, llc_ci=ci, llc_per_chain=per_chain.tolist(), nbeta=nb, gamma=g_val, step_size=eps,
        step_size_rule=eps_rule, gamma_rule=gamma_rule, sampler=sampler, seeds=seeds, num_chains=C,
        num_draws=num_draws, num_burnin=num_burnin, batch_size=b, frac_below_init=frac, acceptance=acc, rhat=rhat,
        llc_quadratic=lq, llc_quadratic_sgld=lq_eps, gamma_bias=(P / 2 - lq) if lq is not None else None, gamma_bias_method=gb_method,
        num_loss_evals=nloss, num_grads=ngrad, num_hvps=problem.counters.num_hvps - hvps0, batched=batched,
        steps_per_second=C * total / wall if wall > 0 else math.nan, traces=traces, loss_traces=losses,
        loss_at_optimum=problem.loss_at_optimum, warnings=notes,
    )
