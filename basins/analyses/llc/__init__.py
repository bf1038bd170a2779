"""Local learning coefficient (LLC) by SGLD on the localized tempered posterior.

Estimator (Lau et al. 2023, "Quantifying degeneracy in singular models via the learning
coefficient"; Watanabe, "Algebraic Geometry and Statistical Learning Theory", 2009):

    λ̂ = nβ · (E_w[L(w)] − L(w*)),   w ~ p(w) ∝ exp(−nβ·L(w) − (γ/2)‖w − w*‖²),

L the Problem's full-data mean over its N averaged terms (:attr:`Problem.num_terms`: examples
× outputs for mse, valid tokens for the token losses, the loss's own count for a ``(sum,
count)`` loss) and nβ = N/log N by default (β = 1/log N). λ = P/2 at a regular minimum,
smaller at a singular one.

Each chain step draws a minibatch B (``minibatch`` examples per chain, apart from the memory
chunk ``problem.batch_size``) and evaluates the unbiased estimate L̂_B(w) with its gradient,
and L̂_B(w*) on the same batch (one extra forward): E_w[L] − L(w*) is the mean over draws of
L̂_B(w) − L̂_B(w*) (:mod:`basins.engine.minibatch`; with ``minibatch ≥ n``, exact).

Sampler, step-size rule, starts and seeds: :mod:`basins.analyses.llc.sampler`.

Weight-refined LLC (Wang et al. 2024, "Differentiation and specialization of attention heads
via the refined local learning coefficient"): with ``mask`` (or a Problem built with
``params=[glob]``) only the block's coordinates move and the others stay at w*; λ̂ is then the
LLC of the block. :func:`llc_per_block` gives one per block.

Interval and diagnostics (:mod:`basins.analyses.llc.stats`): the mean of the C per-chain means,
its s.e. the largest of four estimates (batch means within chains, each chain's own ESS, Stan's
multi-chain MCSE, the between-chain spread; :func:`~basins.analyses.llc.stats.chain_mean`), the
95% interval from Student's t with the degrees of freedom of that estimate, the effective sample size, split
R-hat (> 1.05 flags) and a first-20%-vs-last-50% trend test (|z| > 3 flags); either flag sets
``converged = False`` with a note. ``num_draws="auto"`` (the default) doubles the draws until both
pass and the s.e. is at most :data:`REL_STDERR` (4%) of λ̂, or ``max_steps`` per chain are spent;
``num_burnin="auto"`` turns draws that fail the trend test into burn-in. Why a precision target:
nβ·(L(w) − L(w*)) is Gamma-like with coefficient of variation ≈ 1/√λ per independent draw, so at a
fixed 4 × 1,000 draws the s.e. of a small λ is 5–13% (y = w^k·x, λ = 1/(2k): 10–13%), while a
large λ is already precise; measured on tests/test_llc_analytic.py's cases over data and chain
seeds 0–4, the errors at 4 × 1,000 draws against the exact finite-n value were unbiased (mean z
−0.1) but reached 23% on the small-λ cases.

Also reported: ``llc_quadratic``, the λ a quadratic basin with this Hessian would give at this
nβ and γ (Σ ½·nβhᵢ/(nβhᵢ + γ); P/2 at a regular minimum as γ → 0): a reference, not a
correction; and the critical-point test, ‖∇L(w*)‖ against its sampling noise estimated from
per-example gradients on a subsample of ``NOISE_SAMPLE`` examples, and nβ‖∇L‖ against the
localization force √γ at one localization length.

Cost: C·(burn-in + draws) minibatch gradients plus as many minibatch losses at w*, plus MALA
checks (1/4 of burn-in, 1/20 of draws), curvature checks (8·9 per chain in burn-in), the
Lanczos λ_max at w* (≤ 50 HVPs), ``llc_quadratic`` (P HVPs dense for P ≤ 2000, else 300 by SLQ)
and the noise subsample (``NOISE_SAMPLE`` per-example gradients).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from basins.analyses.llc.sampler import (
    ACCEPT_TARGET,
    STEP_RULE,
    Chains,
    Diverged,
    Restart,
)
from basins.analyses.llc.stats import chain_mean, ess, split_rhat, t_quantile, trend_z
from basins.engine.losses import TOKEN_LOSSES
from basins.engine.memory import MemoryPlan, plan_lanczos, plan_sgld
from basins.engine.minibatch import MinibatchLoss
from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError
from basins.progress import ProgressCallback
from basins.record import Array, Record

__all__ = ["LLCResult", "llc", "llc_per_block", "split_rhat", "quadratic_llc", "SAMPLERS", "DEFAULT_GAMMA",
           "STEP_RULE", "t_quantile", "ess", "DEFAULT_MINIBATCH", "REL_STDERR", "plan_llc"]

SAMPLERS = ("sgld", "rmsprop")
DEFAULT_GAMMA = 1.0
DEFAULT_MINIBATCH = 256
DENSE_MAX = 2000
NOISE_SAMPLE = 64
RHAT_MAX = 1.05
TREND_MAX = 3.0
DEFAULT_MAX_STEPS = 16000
REL_STDERR = 0.04


@dataclass
class LLCResult:
    """An LLC estimate with its chains (see the module docstring for every quantity).

    Attributes:
        llc, llc_stderr, llc_ci, llc_dof: the mean of the per-chain λ̂, its standard error, the
            95% Student-t interval and its degrees of freedom (dimensionless, like P/2).
        llc_per_chain: ``(C,)``; traces: ``(C, draws)`` per-draw nβ·(L̂_B(w) − L̂_B(w*));
        loss_traces: ``(C, draws)`` L̂_B(w).
    """

    llc: float
    llc_stderr: float
    llc_ci: tuple[float, float]
    llc_dof: int
    llc_per_chain: list[float]
    ess: float
    nbeta: float
    nbeta_rule: str
    num_terms: int
    gamma: float
    step_size: float
    step_size_initial: float
    step_size_rule: str
    gamma_rule: str
    sampler: str
    seed: int
    num_chains: int
    num_draws: int
    num_burnin: int
    minibatch: int
    frac_below_init: float
    acceptance: float
    rhat: float
    trend_z: float
    converged: bool
    restarts: list[Restart]
    start_radius: list[float]
    llc_quadratic: float | None
    llc_quadratic_method: str
    grad_norm: float
    grad_noise: float
    block: str | None
    block_num_params: int
    num_loss_evals: int
    num_grads: int
    num_hvps: int
    batched: bool
    steps_per_second: float
    traces: torch.Tensor
    loss_traces: torch.Tensor
    loss_at_optimum: float
    warnings: list[str] = field(default_factory=list)
    memory_plan: MemoryPlan | None = None

    def record(self) -> Record:
        """The ``/llc`` report group and ``--json`` keys."""
        attrs: dict[str, Any] = {
            "llc": self.llc, "llc_stderr": self.llc_stderr, "llc_ci": list(self.llc_ci), "llc_ci_level": 0.95,
            "llc_ci_dof": self.llc_dof, "llc_per_chain": self.llc_per_chain, "ess": self.ess,
            "nbeta": self.nbeta, "nbeta_rule": self.nbeta_rule, "num_terms": self.num_terms,
            "gamma": self.gamma, "gamma_rule": self.gamma_rule,
            "step_size": self.step_size, "step_size_initial": self.step_size_initial,
            "step_size_rule": self.step_size_rule, "sampler": self.sampler, "seed": self.seed,
            "seeds": f"numpy SeedSequence({self.seed}).spawn({self.num_chains})",
            "num_chains": self.num_chains, "num_draws": self.num_draws, "num_burnin": self.num_burnin,
            "minibatch": self.minibatch, "converged": self.converged,
            "diagnostics": {"frac_below_init": self.frac_below_init, "acceptance": self.acceptance, "rhat": self.rhat,
                            "trend_z": self.trend_z, "ess": self.ess, "converged": self.converged,
                            "grad_norm": self.grad_norm, "grad_noise": self.grad_noise},
            "restarts": [f"chain {r.chain}, {r.phase} step {r.step}: {r.reason}; ε → {r.step_size:.3g}"
                         for r in self.restarts],
            "start_radius": self.start_radius,
            "llc_quadratic": self.llc_quadratic, "llc_quadratic_method": self.llc_quadratic_method,
            "llc_quadratic_meaning": "λ of a quadratic basin with this Hessian at this nβ and γ: Σ½·nβh/(nβh+γ)",
            "block": self.block, "block_num_params": self.block_num_params,
            "num_loss_evals": self.num_loss_evals, "num_grads": self.num_grads, "num_hvps": self.num_hvps,
            "count_units": "num_loss_evals/num_grads count minibatch evaluations of one chain's minibatch",
            "batched": self.batched, "steps_per_second": self.steps_per_second, "notes": self.warnings,
        }
        if self.memory_plan is not None:
            plan = self.memory_plan
            attrs.update(memory_plan=plan.describe(), memory_budget_bytes=plan.budget, memory_plan_bytes=plan.total)
        arrays = {
            "llc_trace": Array(self.traces, "per chain and draw: nβ·(L_B(w) − L_B(w*)) on the step's minibatch", None),
            "loss_trace": Array(self.loss_traces, "per chain and draw: minibatch estimate L_B(w)", "loss"),
        }
        return Record(attrs, arrays)


def quadratic_llc(eigenvalues: torch.Tensor, nbeta: float, gamma: float, step_size: float = 0.0) -> float:
    """Σᵢ ½·nβhᵢ/((nβhᵢ + γ)(1 − εaᵢ/4)), aᵢ = nβhᵢ + γ, over eigenvalues hᵢ of H_L (clamped at 0):
    the limit of full-batch SGLD with step ε on a quadratic basin (ε = 0: exact Langevin)."""
    h = eigenvalues.to(torch.float64).clamp(min=0) * nbeta
    a = h + gamma
    return float((0.5 * h / (a * (1 - step_size * a / 4))).sum())


def _operator(problem: Problem, mask: torch.Tensor | None):  # type: ignore[no-untyped-def]
    from basins.linalg.operator import Operator

    if mask is None:
        return Operator(problem.hvp, problem.num_params, problem.dtype, problem.device)
    m = mask.to(problem.device, problem.dtype)

    def matvec(V: torch.Tensor) -> torch.Tensor:
        mm = m if V.dim() == 1 else m[:, None]
        return mm * problem.hvp(mm * V)

    return Operator(matvec, problem.num_params, problem.dtype, problem.device)


def _lambda_max(problem: Problem, mask: torch.Tensor | None, seed: int, plan: MemoryPlan) -> float:
    """Largest eigenvalue of H (restricted to the mask) by Lanczos (tol 1e-2, ≤ 50 HVPs), ≥ 0, its
    basis where ``plan`` puts it."""
    from basins.linalg.lanczos import lanczos

    r = lanczos(_operator(problem, mask), k=1, which="top", tol=1e-2, max_matvecs=min(50, problem.num_params),
                seed=seed, dtype=problem.dtype, max_basis=plan.max_basis, storage=plan.basis_storage)
    return max(float(r.eigenvalues[0]), 0.0)


#: SLQ's budget for ``llc_quadratic``: probes and Lanczos steps.
QUADRATIC_PROBES, QUADRATIC_STEPS = 10, 30
#: ``(block, P)`` temporaries of one SLQ step (the product, its dtype conversions, the three-term
#: recurrence and the reorthogonalisation).
SLQ_STEP_VECTORS = 6
QUADRATIC_SKIPPED = "not computed: its vectors do not fit the memory budget"


def _quadratic_plan(problem: Problem, mask: torch.Tensor | None, plan: MemoryPlan
                    ) -> tuple[int, torch.dtype, int] | None:
    """How ``llc_quadratic`` fits what ``plan`` leaves beside the full-data HVPs (resident, graph,
    one HVP, checks): ``(block, dtype, bytes)``, the most vectors at once (float64 first), or None
    when nothing fits. The dense path holds ``block`` unit vectors and their
    products (model dtype) and the ``dim × dim`` float64 Hessian; SLQ its probes and ``block`` Lanczos
    bases of ``QUADRATIC_STEPS + 1`` vectors."""
    P, item = int(problem.num_params), problem.dtype.itemsize
    dim = P if mask is None else int(mask.sum())
    from basins.analyses.eigen import dense_fits

    if dense_fits(dim, max_params=DENSE_MAX):  # unit vectors, products, their rows; H and its copies
        options = [(b, problem.dtype, 3 * b * P * item + 3 * dim * dim * 8) for b in (dim, 256, 64, 16, 1)
                   if b <= dim]
    else:  # probes (drawn in float64, projected, normalised), the bases and a step's (b, P) temporaries
        dtypes = [torch.float64] + ([problem.dtype] if problem.dtype != torch.float64 else [])
        per_block = (QUADRATIC_STEPS + 1 + SLQ_STEP_VECTORS) * P
        options = [(b, dt, 3 * QUADRATIC_PROBES * P * 8 + b * per_block * dt.itemsize)
                   for dt in dtypes for b in (QUADRATIC_PROBES, 5, 2, 1)]
    left = plan.budget - (plan.resident + plan.graph + plan.hvp + plan.checks)
    return next((o for o in options if o[2] <= left), None)


def _quadratic(problem: Problem, mask: torch.Tensor | None, nb: float, gamma: float, seed: int, block: int,
               dtype: torch.dtype) -> tuple[float, str]:
    dim = problem.num_params if mask is None else int(mask.sum())
    op = _operator(problem, mask)
    from basins.analyses.eigen import dense_fits

    if dense_fits(dim, max_params=DENSE_MAX):  # the one dense rule, capped: here a diagnostic costs P HVPs
        idx = (torch.arange(problem.num_params) if mask is None else mask.nonzero().flatten()).to(problem.device)
        H = torch.zeros(dim, dim, dtype=torch.float64, device=problem.device)
        for a in range(0, dim, block):  # columns of H in pieces of `block` unit vectors
            cols = torch.arange(a, min(dim, a + block), device=problem.device)
            E = torch.zeros(problem.num_params, cols.numel(), dtype=problem.dtype, device=problem.device)
            E[idx[cols], cols - a] = 1
            H[:, a : a + cols.numel()] = op.apply(E)[idx].to(torch.float64)
        ev = torch.linalg.eigvalsh((H + H.T) / 2)
        return quadratic_llc(ev, nb, gamma), f"exact ({dim} HVPs)"
    from basins.linalg.slq import slq

    r = slq(op, num_probes=QUADRATIC_PROBES, num_steps=QUADRATIC_STEPS, seed=seed, block_size=block, dtype=dtype)
    vals = [float((w * 0.5 * (t.to(torch.float64).clamp(min=0) * nb) / (t.to(torch.float64).clamp(min=0) * nb + gamma)
                   ).sum()) for t, w in zip(r.nodes, r.weights)]
    # SLQ over the full space: coordinates outside the mask have h = 0 and add nothing
    return problem.num_params * sum(vals) / len(vals), f"slq ({QUADRATIC_PROBES} probes × {QUADRATIC_STEPS} steps)"


def _grad_noise(problem: Problem, mb: MinibatchLoss, mask: torch.Tensor | None, seed: int, chunk: int) -> float:
    """Sampling noise of ∇L, √(n·tr Cov(hᵢ))/N, hᵢ the gradient of example i's sum of terms,
    from per-example gradients of ``NOISE_SAMPLE`` examples per process, ``chunk`` at a time (the
    chains' share of the memory plan). Cost: that many gradients."""
    n_r = problem.num_local_examples
    m = min(NOISE_SAMPLE, n_r)
    g = torch.Generator().manual_seed(seed + 0x5EED)
    idx = torch.randperm(n_r, generator=g)[:m][:, None]
    s1 = torch.zeros(problem.num_params, dtype=torch.float64, device=problem.device)
    s2 = torch.zeros((), dtype=torch.float64, device=problem.device)
    for a in range(0, m, max(1, chunk)):
        part = idx[a : a + max(1, chunk)]
        w0 = problem.theta0.expand(part.shape[0], -1)
        _, h = mb.value_and_grad(w0, mb.batch_at(part, scale=1.0), reduce=False)
        if mask is not None:
            h = h * mask.to(h.device, h.dtype)
        for row in h:  # float64 one example at a time
            r = row.to(torch.float64)
            s1 += r
            s2 += r @ r
        del h
    stats = torch.cat([s1, torch.stack([s2, torch.tensor(float(m), dtype=torch.float64, device=s1.device)])])
    stats = problem.reduce(stats)
    s1, s2v, cnt = stats[:-2], float(stats[-2]), float(stats[-1])
    if cnt < 2:
        return math.nan
    tr = max((s2v - float(s1 @ s1) / cnt) / (cnt - 1), 0.0)
    return math.sqrt(problem.num_examples * tr) / problem.num_terms


def plan_llc(problem: Problem, *, num_chains: int = 4, minibatch: int | None = None, sampler: str = "sgld",
             step_size: float | None = None, quadratic: bool = True, mask: torch.Tensor | None = None
             ) -> MemoryPlan:
    """The memory plan of :func:`llc` with these arguments: the problem's plan (route, HVP pieces)
    completed with the Lanczos basis for λ_max at w* (auto step size only), ``llc_quadratic``'s
    vectors (its ``quadratic`` entry: skipped with a note when they do not fit) and the chains' SGLD
    phase (:func:`~basins.engine.memory.plan_sgld`). Costs nothing: sizes only.

    Raises:
        InputError: the chains do not fit the budget (one line, with the sizes).
    """
    P, item = int(problem.num_params), problem.dtype.itemsize
    plan = problem.routes.plan
    if step_size is None:
        plan = plan_lanczos(plan, P, item, need=1, block=1)
    rows = problem.fixed_batch_size or min(problem.num_examples, minibatch or DEFAULT_MINIBATCH, problem.batch_size)
    plan = plan_sgld(plan, P, item, chains=num_chains, rows=rows, preconditioned=sampler != "sgld")
    if quadratic:
        q = _quadratic_plan(problem, mask, plan)
        plan = replace(plan, quadratic=q[2] if q else 0, notes=[*plan.notes, "llc_quadratic " + (
            f"in pieces of {q[0]} vectors ({str(q[1]).replace('torch.', '')}), {q[2] / 2**30:.2f} GiB" if q else
            QUADRATIC_SKIPPED)])
    return plan


def _terms_unit(problem: Problem) -> str:
    if problem.loss_name in TOKEN_LOSSES:
        return "valid tokens"
    if problem.pair_loss:
        return "terms counted by the loss"
    if problem.terms_per_example > 1:
        return f"terms ({problem.num_examples} examples × {problem.terms_per_example})"
    return "examples"


def llc(
    problem: Problem,
    *,
    num_chains: int = 4,
    num_draws: int | str = "auto",
    num_burnin: int | str = 1000,
    nbeta: float | None = None,
    gamma: float | None = None,
    step_size: float | None = None,
    minibatch: int | None = None,
    sampler: str = "sgld",
    seed: int = 0,
    batched: bool = True,
    quadratic: bool = True,
    mask: torch.Tensor | None = None,
    block: str | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    callback: ProgressCallback | None = None,
    memory_plan: MemoryPlan | None = None,
) -> LLCResult:
    """Estimate the local learning coefficient at w* = ``problem``'s θ* (module docstring).

    Args:
        problem: model, data (in memory) and loss at w*.
        num_chains: C independent chains (seeded by ``SeedSequence(seed).spawn(C)``).
        num_draws, num_burnin: steps kept and discarded per chain, or ``"auto"``: start at 1000
            and extend until R-hat and the trend test pass (and, for the draws, the s.e. is at most
            :data:`REL_STDERR` of λ̂) or ``max_steps`` per chain are spent. Default: auto draws,
            1000 burn-in.
        nbeta: nβ (default N/log N, N = ``problem.num_terms``).
        gamma: localization γ in 1/parameter² (default :data:`DEFAULT_GAMMA`).
        step_size: ε (default: the auto rule, :data:`STEP_RULE`).
        minibatch: examples per chain step (default min(n, 256)); the memory chunk is
            ``problem.batch_size``.
        sampler: ``sgld`` or ``rmsprop``.
        batched: vmap all chains in one call (else a loop over chains).
        quadratic: compute ``llc_quadratic`` (P HVPs dense, or 300 by SLQ).
        mask: ``(P,)`` 0/1, the coordinates that move (the weight-refined LLC of that block).
        block: the block's name, for the record.
        max_steps: budget per chain for ``"auto"`` (burn-in and draws together).
        memory_plan: the plan the run is fitted to (default :func:`plan_llc` of these arguments).

    Raises:
        InputError: a bad parameter, streamed data, or the chains do not fit the memory budget.
        ComputeError: a chain diverged with a given step size, or kept diverging.
    """
    auto_draws, auto_burnin = num_draws == "auto", num_burnin == "auto"
    draws = 1000 if auto_draws else num_draws
    burn = 1000 if auto_burnin else num_burnin
    for name, v, least in (("num_chains", num_chains, 1), ("num_draws", draws, 1), ("num_burnin", burn, 0),
                           ("max_steps", max_steps, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise InputError(f"{name} must be an integer ≥ {least}" + (" or 'auto'" if "num_" in name and name !=
                             "num_chains" else "") + f", got {v!r}", param=name)
    assert isinstance(draws, int) and isinstance(burn, int)
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}", param="sampler")
    for name, val in (("nbeta", nbeta), ("gamma", gamma), ("step_size", step_size)):
        if val is not None and not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise InputError(f"{name} must be a positive number, got {val}", param=name)
    if minibatch is not None and minibatch < 1:
        raise InputError(f"minibatch must be ≥ 1, got {minibatch}", param="minibatch")
    if mask is not None:
        if mask.shape != (problem.num_params,):
            raise InputError(f"mask must have shape ({problem.num_params},), got {tuple(mask.shape)}", param="mask")
        mask = (mask != 0).to(problem.dtype)
        if int(mask.sum()) == 0:
            raise InputError("mask selects no parameter", param="mask")
    N = problem.num_terms
    if N < 2:
        raise InputError("llc needs at least 2 loss terms (β = 1/log N)")
    hvps0 = problem.counters.num_hvps
    nb = float(nbeta) if nbeta is not None else N / math.log(N)
    nb_rule = "given" if nbeta is not None else f"N/log N, N = {N:,} {_terms_unit(problem)}"
    g_val, gamma_rule = (DEFAULT_GAMMA, "default") if gamma is None else (float(gamma), "given")
    mb = MinibatchLoss(problem, min(problem.num_examples, minibatch or DEFAULT_MINIBATCH), batched=batched)
    plan = memory_plan or plan_llc(problem, num_chains=num_chains, minibatch=minibatch, sampler=sampler,
                                   step_size=step_size, quadratic=quadratic, mask=mask)
    lam = _lambda_max(problem, mask, seed, plan) if step_size is None else math.nan
    q = _quadratic_plan(problem, mask, plan) if quadratic else None
    if q is not None:
        lq, lq_method = _quadratic(problem, mask, nb, g_val, seed, q[0], q[1])
    else:
        lq, lq_method = None, QUADRATIC_SKIPPED if quadratic else "not computed"
    problem.routes.free_graph()  # the full-data HVPs are done: the chains' phase has the memory (the plan)
    noise = _grad_noise(problem, mb, mask, seed, num_chains)
    gnorm = float((problem.grad() * mask).norm()) if mask is not None else problem.grad_norm
    chains = Chains(mb, problem.theta0.detach(), num_chains, nb, g_val, seed, mask, sampler, step_size,
                    lam, callback)
    t0 = time.perf_counter()
    planned = burn + draws
    traces = losses = torch.zeros(num_chains, 0, dtype=torch.float64)
    below = 0
    adapt = step_size is None
    done_burn = 0
    while True:
        try:
            chains.burnin(burn - done_burn, adapt=adapt, progress=(chains.steps_done, planned))
            done_burn = burn
            adapt = False
            while True:
                more = draws - traces.shape[1]
                tr, lo, bl = chains.draws(more, progress=(chains.steps_done, planned))
                traces, losses, below = torch.cat([traces, tr], 1), torch.cat([losses, lo], 1), below + bl
                ok = _converged(traces)
                left = max_steps - (burn + draws)
                if (ok and (not auto_draws or _precise(traces))) or not (auto_draws or auto_burnin) or left <= 0:
                    break
                if auto_burnin and (not auto_draws or abs(trend_z(traces)) > TREND_MAX):
                    burn += traces.shape[1]  # the draws were still burn-in: discard them, draw again
                    done_burn = burn
                    traces = losses = torch.zeros(num_chains, 0, dtype=torch.float64)
                    below = 0
                    draws = min(draws, left)
                else:
                    draws += min(draws, left)
                planned = burn + draws
            break
        except Diverged as err:
            if step_size is not None:
                raise ComputeError(
                    f"SGLD chain {err.chain} diverged at step {err.step} (non-finite loss or parameters); use a "
                    f"smaller step_size (now {step_size:.3g}) or a larger gamma (now {g_val:.3g})") from None
            if sum(r.phase == "draws" for r in chains.restarts) >= 3:
                raise ComputeError("SGLD diverged during the draws 4 times although ε was halved each time; "
                                   f"use a larger gamma (now {g_val:.3g})") from None
            chains.after_divergence(err)  # ε halved: burn in again, draw again
            burn += max(num_burnin if isinstance(num_burnin, int) else 1000, 200)
            planned = burn + draws
            traces = losses = torch.zeros(num_chains, 0, dtype=torch.float64)
            below = 0
    wall = time.perf_counter() - t0
    D = traces.shape[1]
    est = chain_mean(traces)
    per_chain = traces.mean(dim=1)
    rhat = split_rhat(traces) if num_chains > 1 else math.nan
    tz = trend_z(traces)
    n_eff = ess(traces)
    converged = _converged(traces)
    frac = below / (num_chains * D)
    acc = chains.acceptance
    eps = float(chains.eps.max())
    notes = []
    if frac > 0.25:
        notes.append(f"{frac:.0%} of draws have loss below L(w*) on their batch: w* is not a minimum, "
                     "or the chains are still descending (more burn-in)")
    if acc < ACCEPT_TARGET:
        notes.append(f"MALA acceptance {acc:.3f} < {ACCEPT_TARGET}: the step size {eps:.3g} is too large for "
                     "exact sampling (λ̂ biased upward); use the auto step size or a smaller one")
    if not converged:
        why = []
        if rhat > RHAT_MAX:
            why.append(f"split R-hat {rhat:.3f} > {RHAT_MAX}")
        if not abs(tz) <= TREND_MAX:
            why.append(f"trend z {tz:.2f} between the first 20% and last 50% of the draws (|z| > {TREND_MAX:g})")
        if not why:
            why.append("too few draws for the diagnostics")
        notes.append("not converged: " + "; ".join(why) + ": more burn-in or draws (num_burnin='auto', num_draws='auto')")
    if auto_draws and not _precise(traces):
        notes.append(f"s.e. {est.stderr:.3g} is above {REL_STDERR:.0%} of λ̂ after {D} draws per chain: the "
                     "budget max_steps was spent")
    if quadratic and q is None:
        notes.append(f"llc_quadratic {QUADRATIC_SKIPPED} (raise memory_bytes, or quadratic=False)")
    if chains.restarts:
        notes.append(f"{len(chains.restarts)} chain restart(s) after a divergence, each with ε halved "
                     f"(final ε {eps:.3g})")
    if gnorm > 3 * noise and nb * gnorm > math.sqrt(g_val):
        notes.append(f"‖∇L(w*)‖ = {gnorm:.3g} is {gnorm / noise:.1f}× its sampling noise {noise:.3g} and "
                     f"nβ‖∇L‖ = {nb * gnorm:.3g} exceeds the localization force √γ = {math.sqrt(g_val):.3g}: w* is "
                     "not a critical point, so the chains drift away from it and λ̂ is not the LLC there")
    P_b = problem.num_params if mask is None else int(mask.sum())
    return LLCResult(
        llc=est.mean, llc_stderr=est.stderr, llc_ci=est.interval(0.95), llc_dof=est.dof,
        llc_per_chain=per_chain.tolist(), ess=n_eff, nbeta=nb, nbeta_rule=nb_rule, num_terms=N, gamma=g_val,
        step_size=eps, step_size_initial=chains.initial_step,
        step_size_rule=STEP_RULE + (f"; λ_max(H at w*) = {lam:.6g} by Lanczos" if step_size is None else "")
        if step_size is None else "given", gamma_rule=gamma_rule, sampler=sampler, seed=seed,
        num_chains=num_chains, num_draws=D, num_burnin=burn, minibatch=mb.size, frac_below_init=frac,
        acceptance=acc, rhat=rhat, trend_z=tz, converged=converged, restarts=chains.restarts,
        start_radius=chains.start_radius, llc_quadratic=lq, llc_quadratic_method=lq_method, grad_norm=gnorm,
        grad_noise=noise, block=block, block_num_params=P_b, num_loss_evals=mb.num_losses,
        num_grads=mb.num_grads, num_hvps=problem.counters.num_hvps - hvps0, batched=mb.batched,
        steps_per_second=num_chains * chains.steps_done / wall if wall > 0 else math.nan, traces=traces,
        loss_traces=losses, loss_at_optimum=problem.loss_at_optimum, warnings=notes, memory_plan=plan,
    )


def _converged(traces: torch.Tensor) -> bool:
    rhat = split_rhat(traces) if traces.shape[0] > 1 else 1.0
    tz = trend_z(traces)
    return bool(rhat <= RHAT_MAX and abs(tz) <= TREND_MAX)


def _precise(traces: torch.Tensor) -> bool:
    est = chain_mean(traces)
    return bool(est.stderr <= REL_STDERR * abs(est.mean))


def llc_per_block(problem: Problem, blocks: list[tuple[str, list[str]]], **kw: Any) -> list[LLCResult]:
    """The weight-refined LLC of each block (``(name, parameter names)``, as
    :func:`basins.analyses.blocks.parse_blocks` gives them): :func:`llc` with the block's mask, the
    other parameters held at w*. Cost: one :func:`llc` per block."""
    space = problem.space
    out = []
    for name, params in blocks:
        mask = torch.zeros(problem.num_params, dtype=problem.dtype)
        for i, pname in enumerate(space.names):
            if pname in set(params):
                mask[space.offsets[i] : space.offsets[i + 1]] = 1
        out.append(llc(problem, mask=mask, block=name, **kw))
    return out
