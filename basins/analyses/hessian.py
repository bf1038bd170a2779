"""Hessian eigenvalues at θ* (top, bottom or both ends) and its trace, in one call.

:func:`hessian_eigenvalues` runs Lanczos (:func:`basins.linalg.lanczos.lanczos`) on the exact
full-data Hessian-vector product of a :class:`~basins.engine.problem.Problem`, optionally followed
by a stochastic trace estimate (:mod:`basins.linalg.trace`), and says whether θ* is a saddle.

Error bars: each Ritz value θⱼ comes with the residual norm ``rⱼ = ‖H yⱼ − θⱼ yⱼ‖``
(unit Ritz vector ``yⱼ``); for symmetric H some true eigenvalue lies in ``[θⱼ − rⱼ, θⱼ + rⱼ]``
(Parlett, *The Symmetric Eigenvalue Problem*, Thm 4.5.1). A bottom Ritz value with
``θ + r < −floor`` therefore certifies a direction of negative curvature: θ* is a saddle
(or a maximum), not a minimum. ``floor = 100·eps(dtype)·max|θ|`` absorbs the rounding of
the HVPs themselves.

Error bounds that include rounding (``error_bounds``): the residual above is that of the
operator Lanczos saw, the HVP *as computed*; in float32 its rounding error ``E`` can exceed
the residual by orders of magnitude, and ``|θ − λ| ≤ r + ‖E y‖``. ``bounds`` chooses how
``‖E y‖`` is measured, at run time, for a problem in a dtype other than float64:

* ``"rescaled"`` (default; k HVPs in the problem's dtype): ``d = ‖H(c·y)/c − θy‖`` with
  ``c = 1.375`` (:meth:`basins.Problem.rescaled_residuals`) holds the pair's true residual plus
  the rounding of one product; the bound is ``r + ROUNDING_FACTOR·d + eps(dtype)·max|θ|`` (the last
  term for the forward's rounding, common to both products and so not in ``d``). This is a measured
  estimate, not a proof: rounding shared by both products (the saved activations) is not seen;
  on the benchmark problems ``d`` was 0.4–1.4× ``‖E y‖`` and ``ROUNDING_FACTOR = 4`` kept every
  float64 eigenvalue inside, with a margin of ≥ 2.7×.
* ``"sketch"`` (3 HVPs per end whatever k; :mod:`basins.engine.rounding`): one randomised
  estimate ``ρ`` of the rounding of all the pairs at once, bound ``r + ROUNDING_FACTOR·ρ``: up to
  ``√k`` looser than ``rescaled``, for runs where k check products cost too much (k ≤ 3: the
  per-pair check, which then costs no more).
* ``"float64"`` (k float64 HVPs, each dearer than a float32 one: twice the bytes moved, and
  float64 matmuls run at a fraction of float32's rate; ``scripts/bench_hessian.py --dtype
  float64`` times float64 runs): each Ritz vector gets a float64 check product
  (:meth:`basins.Problem.check_eigenpairs`); the eigenvalue becomes the float64 Rayleigh
  quotient ``ρ = yᵀHy`` and its bound ``‖Hy − ρy‖``, which provably contains an eigenvalue of
  the exact Hessian (ρ's own error is second order, ``‖Hy − ρy‖²/gap``).

In float64, the bound is the residual plus ``BOUND_EPS·eps₆₄·max|θ|`` for the rounding, and for a
built-in softmax loss on class indices ``ROUNDING_FACTOR·ρ``, the measured spread between basins'
loss head (accurate in its derivatives at a small loss) and the textbook ``logsumexp(z) − z_y``
(:func:`~basins.engine.rounding.loss_head_rounding`, 6 HVPs per end): a float64 reference computed
with ``F.cross_entropy`` carries that rounding (1.4e-14 on λ1 = 0.18 of the zoo's ViT at
L = 1.7e-4, above ``BOUND_EPS·eps₆₄·max|θ|`` = 1.0e-14), and the bound holds against it too. The
systematic float32 low bias of the top eigenvalues came mostly from the loss evaluated in
float32; :class:`~basins.engine.problem.Problem` now evaluates the loss (on the model's
outputs) in float64.

Known limitation: the residual bound locates *an* eigenvalue near each Ritz value, not the
k-th one; a cluster that Lanczos has not yet split can hide eigenvalues (tighten ``tol``
or raise the budget; full reorthogonalisation keeps ghosts out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from basins.analyses.eigen import hessian_operator, named_as
from basins.engine.memory import MemoryPlan, plan_lanczos
from basins.engine.precision import audit_precision
from basins.engine.problem import Problem, counted
from basins.engine.rounding import (
    SKETCH_PROBES,
    SOFTMAX_LOSSES,
    has_plain_head,
    loss_head_rounding,
    sketched_rounding,
)
from basins.errors import InputError
from basins.linalg.operator import Operator
from basins.progress import Progress, ProgressCallback
from basins.record import EIGEN_UNITS, Array, Record

__all__ = ["HessianEnd", "HessianResult", "hessian_eigenvalues", "WHICH", "TRACE_METHODS", "SADDLE_FLOOR_EPS",
           "BOUNDS", "ROUNDING_FACTOR", "BOUND_EPS", "plan_hessian"]

WHICH = ("top", "bottom", "both")
TRACE_METHODS = ("hutch++", "hutchinson")
#: How float32 error bounds are measured (module docstring).
BOUNDS = ("rescaled", "float64", "sketch")
#: Safety factor on the measured rounding of ``bounds="rescaled"`` (module docstring).
ROUNDING_FACTOR = 4.0
#: Rounding allowance of error bounds, in units of ``eps₆₄·max|θ|``. A float64 CNN with BatchNorm
#: (tests/test_zoo.py) was off its float64 reference by 107·eps₆₄·max|θ|, so 64 did not hold.
BOUND_EPS = 256.0
#: A bottom Ritz value counts as negative only below ``-SADDLE_FLOOR_EPS·eps(dtype)·max|θ|``.
SADDLE_FLOOR_EPS = 100.0


@dataclass
class HessianEnd:
    """Ritz pairs at one end of the spectrum, on the CPU.

    Attributes:
        eigenvalues: ``(k,)`` float64, loss/θ² units; descending at the top, ascending at the bottom.
        residuals: ``(k,)`` float64 residual norms: an eigenvalue of H lies within each.
        converged: ``(k,)`` bool, ``residual ≤ tol·max|θ|`` (max over all Ritz values, ≈ ‖H‖).
        eigenvectors: ``(P, k)`` unit Ritz vectors (problem dtype) when asked, else None.
        error_bounds: ``(k,)`` float64: an eigenvalue of the exact Hessian lies within each
            eigenvalue ± its bound, rounding of the HVPs included (module docstring).
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    eigenvectors: torch.Tensor | None = None
    error_bounds: torch.Tensor | None = None


@dataclass
class HessianResult:
    """Eigenvalues (with residual bounds) and trace of the Hessian at θ*.

    Attributes:
        which: ``"top"``, ``"bottom"`` or ``"both"``.
        top: the top end (:class:`HessianEnd`) for ``top``/``both``, else None.
        bottom: the bottom end for ``bottom``/``both``, else None.
        trace, trace_stderr, trace_method: the trace estimate and its standard error, when asked.
        num_hvps: all HVPs spent by this call (Lanczos + trace + error-bound checks).
        num_lanczos_hvps, num_trace_hvps, num_restarts: the split and Lanczos restarts.
        is_saddle: True if some Ritz value θ has ``θ + r < −saddle_floor``; False if the
            bottom end was computed and none has; None if only the top end was (unknown).
        saddle_floor: the rounding floor used for ``is_saddle`` (loss/θ² units).
        tol: the relative residual tolerance asked for.
        top_k, max_hvps, block_size, seed, trace_hvps: the settings of the run
            (``trace_hvps`` None without a trace).
        hvp_route: the problem's HVP route.
        work: what ``problem.counters`` counted during the call (:func:`basins.engine.problem.counted`).
        num_check_hvps: products spent on the error bounds (one per Ritz vector; in float64 six per end
            for a softmax loss on class indices, else none).
        warm_start: whether Lanczos started from ``start`` (e.g. the previous checkpoint's Ritz vectors).
        memory_plan: the plan the run was fitted to (:func:`plan_hessian`).
        compute_dtype: the narrowest dtype the model's forward computes in
            (:func:`~basins.engine.precision.audit_precision`); bounds measure its rounding.
        next_start: with ``keep_start``, the ``(P, k)`` (``(P, 2k)`` for both ends) Ritz vectors to
            warm-start the next, nearby problem with (not part of the record).
    """

    which: str
    top: HessianEnd | None
    bottom: HessianEnd | None
    trace: float | None
    trace_stderr: float | None
    trace_method: str | None
    num_hvps: int
    num_lanczos_hvps: int
    num_trace_hvps: int
    num_restarts: int
    is_saddle: bool | None
    saddle_floor: float
    tol: float
    top_k: int = 0
    max_hvps: int | None = None
    block_size: int = 1
    seed: int = 0
    trace_hvps: int | None = None
    hvp_route: str | None = None
    num_check_hvps: int = 0
    warm_start: bool = False
    next_start: torch.Tensor | None = field(default=None, repr=False)
    memory_plan: MemoryPlan | None = None
    compute_dtype: str | None = None
    work: dict[str, int] = field(default_factory=dict)

    @property
    def ends(self) -> list[HessianEnd]:
        """The ends computed: top first."""
        return [e for e in (self.top, self.bottom) if e is not None]

    @property
    def all_converged(self) -> bool:
        """Whether every wanted eigenvalue (both ends) converged."""
        return all(bool(e.converged.all()) for e in self.ends)

    @property
    def num_converged(self) -> int:
        return sum(int(e.converged.sum()) for e in self.ends)

    @property
    def num_wanted(self) -> int:
        return sum(int(e.converged.numel()) for e in self.ends)

    @property
    def lambda_max(self) -> float | None:
        """The largest eigenvalue found (None if only the bottom end was computed)."""
        return float(self.top.eigenvalues[0]) if self.top is not None and self.top.eigenvalues.numel() else None

    @property
    def lambda_min(self) -> float | None:
        """The smallest eigenvalue found (None if only the top end was computed)."""
        b = self.bottom
        return float(b.eigenvalues[0]) if b is not None and b.eigenvalues.numel() else None

    def most_negative(self) -> tuple[float, float]:
        """The smallest Ritz value found and its residual (of the bottom end where computed)."""
        end = self.bottom or self.top
        assert end is not None
        i = int(end.eigenvalues.argmin())
        return float(end.eigenvalues[i]), float(end.residuals[i])

    def record(self) -> Record:
        """The report group ``/hessian`` and the ``--json`` keys (README, "Architecture").

        Keys: ``eigenvalues``/``residuals``/``converged`` (and ``eigenvectors``, report only)
        hold the top end, or the bottom end for ``which="bottom"``; ``which="both"`` adds the
        bottom end as ``bottom_*``.
        """
        attrs: dict[str, Any] = {
            "method": "Lanczos, full reorthogonalisation, float64 tridiagonal, thick restart",
            "which": self.which, "top_k": self.top_k, "tol": self.tol, "max_hvps": self.max_hvps,
            "block_size": self.block_size, "seed": self.seed,
            "trace_method": self.trace_method, "trace_hvps": self.trace_hvps,
            "lambda_max": self.lambda_max, "lambda_min": self.lambda_min,
            "is_saddle": self.is_saddle, "saddle_floor": self.saddle_floor,
            "all_converged": self.all_converged, "num_converged": self.num_converged, "num_wanted": self.num_wanted,
            "trace": self.trace, "trace_stderr": self.trace_stderr,
            "num_hvps": self.num_hvps, "num_lanczos_hvps": self.num_lanczos_hvps,
            "num_trace_hvps": self.num_trace_hvps, "num_check_hvps": self.num_check_hvps,
            "num_restarts": self.num_restarts, "compute_dtype": self.compute_dtype,
            "hvp_route": self.hvp_route,
            "start": "warm: the previous checkpoint's Ritz vectors plus a random vector" if self.warm_start
            else "random",
            **self.work,
        }
        if self.memory_plan is not None:
            plan = self.memory_plan
            attrs.update(memory_plan=plan.describe(), memory_budget_bytes=plan.budget, memory_plan_bytes=plan.total,
                         basis_storage=plan.basis_storage, basis_vectors=plan.basis_vectors)
        main = self.bottom if self.which == "bottom" else self.top
        assert main is not None
        arrays = _end_arrays(main, "", "bottom (ascending)" if self.which == "bottom" else "top (descending)")
        if self.which == "both" and self.bottom is not None:
            arrays.update(_end_arrays(self.bottom, "bottom_", "bottom (ascending)"))
        return Record(attrs, arrays)


def _end_arrays(end: HessianEnd, prefix: str, order: str) -> dict[str, Array]:
    """The datasets of one end of the spectrum, names prefixed (``""`` or ``"bottom_"``)."""
    arrays = {
        "eigenvalues": Array(end.eigenvalues, f"Ritz values, {order}", EIGEN_UNITS),
        "residuals": Array(end.residuals, "Lanczos residual norms ‖Hy − λy‖ of the HVP as computed", EIGEN_UNITS),
        "converged": Array(end.converged.numpy(), "residual ≤ tol·max|λ| (max over all Ritz values)", None),
    }
    if end.error_bounds is not None:
        arrays["error_bounds"] = Array(end.error_bounds, "an eigenvalue of the exact Hessian lies within "
                                       "λ ± bound (HVP rounding included)", EIGEN_UNITS)
    if end.eigenvectors is not None:
        arrays["eigenvectors"] = Array(end.eigenvectors.float(), f"unit Ritz vectors (P, k), {order}, columns as "
                                       "eigenvalues, float32", None, in_json=False)
    return {prefix + name: a for name, a in arrays.items()}


@counted
def hessian_eigenvalues(
    problem: Problem,
    *,
    k: int = 10,
    which: str = "top",
    tol: float = 1e-4,
    max_hvps: int | None = None,
    block_size: int = 1,
    eigenvectors: bool = False,
    trace: bool = False,
    trace_method: str = "hutch++",
    trace_hvps: int = 100,
    seed: int = 0,
    callback: ProgressCallback | None = None,
    bounds: str = "rescaled",
    start: torch.Tensor | None = None,
    keep_start: bool = False,
    memory_plan: MemoryPlan | None = None,
) -> HessianResult:
    """Top/bottom Hessian eigenvalues of ``problem`` at θ* by Lanczos, and optionally the trace.

    Args:
        problem: a :class:`basins.Problem`; its :meth:`~basins.Problem.hvp` is the operator.
        k: eigenvalues wanted at each end asked for (``1 ≤ k ≤ P``).
        which: ``top`` (largest algebraic), ``bottom`` (smallest: negative = saddle) or ``both``.
        tol: a Ritz value counts as converged when its residual ≤ ``tol·max|θ|`` (max over all Ritz values, ≈ ‖H‖).
        max_hvps: Lanczos HVP budget (default: :func:`basins.linalg.lanczos.lanczos`'s).
        block_size: vectors per Lanczos step (one data pass per block).
        eigenvectors: also return the unit Ritz vectors.
        trace: also estimate ``tr H``.
        trace_method: ``hutch++`` (Meyer et al. 2021) or ``hutchinson`` (Rademacher probes).
        trace_hvps: HVPs for the trace estimate.
        seed: seeds the Lanczos start block and the trace probes (same seed, separate generators).
        callback: called with a :class:`~basins.progress.Progress` (unit ``"HVPs"``, phase
            ``"lanczos"`` then ``"trace"``; ``done`` counts both phases, ``total`` is the Lanczos
            budget plus ``trace_hvps``) as the work proceeds.
        bounds: how float32 error bounds measure rounding: ``rescaled``, ``sketch`` or ``float64`` (module docstring).
        start: warm start ``(P, m)`` for Lanczos, e.g. the previous checkpoint's ``next_start``
            (:func:`basins.linalg.lanczos.lanczos`): the same stopping rule and accuracy as a
            cold start, usually fewer HVPs on a nearby Hessian.
        keep_start: keep the wanted Ritz vectors as ``result.next_start`` for the next checkpoint.
        memory_plan: where the basis lives, its size and the trace's block (default
            :func:`plan_hessian` with these arguments).

    Returns:
        A :class:`HessianResult`. Cost: ≤ ``max_hvps`` HVPs (+ ``trace_hvps`` with ``trace``),
        + k per end for the error bounds below float64.

    Raises:
        InputError: a bad ``k``, ``which``, ``tol``, ``block_size``, ``trace_method`` or budget.
    """
    from basins.linalg.lanczos import lanczos

    P = int(problem.num_params)
    if which not in WHICH:
        raise InputError(f"unknown which={which!r}: use top, bottom or both", param="which")
    if not 1 <= k <= P:
        raise InputError(f"k must be between 1 and the number of parameters P = {P}, got {k}", param="k")
    if not (tol > 0 and math.isfinite(tol)):
        raise InputError(f"tol must be a positive number, got {tol}", param="tol")
    if block_size < 1:
        raise InputError(f"block_size must be ≥ 1, got {block_size}", param="block_size")
    if max_hvps is not None and max_hvps < 1:
        raise InputError(f"max_hvps must be ≥ 1, got {max_hvps}", param="max_hvps")
    if bounds not in BOUNDS:
        raise InputError(f"unknown bounds={bounds!r}: use rescaled, sketch or float64", param="bounds")
    if trace and trace_method not in TRACE_METHODS:
        raise InputError(f"unknown trace_method={trace_method!r}: use hutch++ or hutchinson", param="trace_method")
    least = 4 if trace_method == "hutch++" else 2
    if trace and trace_hvps < least:
        raise InputError(f"trace_hvps must be ≥ {least} for {trace_method}, got {trace_hvps}", param="trace_hvps")

    state: dict[str, Any] = {"phase": "lanczos", "base": 0, "lanczos_total": max_hvps}
    extra = trace_hvps if trace else 0

    def total() -> int | None:
        lt = state["lanczos_total"]
        return None if lt is None else int(lt) + extra

    def lanczos_progress(p: Progress) -> None:
        if p.total is not None:
            state["lanczos_total"] = int(p.total)
        if callback is not None:
            callback(replace(p, total=total(), unit="HVPs"))

    plan = memory_plan or plan_hessian(problem, k=k, which=which, block_size=block_size, trace=trace,
                                       trace_hvps=trace_hvps, bounds=bounds)
    options: dict[str, Any] = {"k": k, "which": which, "tol": tol, "max_matvecs": max_hvps, "block_size": block_size,
                               "dtype": problem.dtype, "device": problem.device, "seed": seed,
                               "return_eigenvectors": True, "callback": lanczos_progress, "start": start,
                               "max_basis": plan.max_basis, "storage": plan.basis_storage}
    with named_as(max_matvecs="max_hvps"):
        lres: Any = lanczos(hessian_operator(problem), **options)  # LanczosResult, or LanczosBothEnds for "both"
    num_lanczos = int(lres.num_matvecs)
    if state["lanczos_total"] is None:
        state["lanczos_total"] = num_lanczos
    top, bottom = _split_ends(lres, which)
    next_start = torch.cat([e.eigenvectors for e in (top, bottom) if e is not None and e.eigenvectors is not None],
                           dim=1) if keep_start else None

    tr = tr_se = None
    num_trace = 0
    if trace:
        from basins.linalg.trace import hutchinson, hutchpp

        done = [0]

        def counted(V: torch.Tensor) -> torch.Tensor:
            out = problem.hvp(V)
            done[0] += 1 if V.dim() == 1 else int(V.shape[1])
            if callback is not None:
                callback(Progress("trace", num_lanczos + done[0], total(), "HVPs", info=f"trace ({trace_method})"))
            return out

        estimator = hutchpp if trace_method == "hutch++" else hutchinson
        est = estimator(Operator(counted, P, problem.dtype, problem.device), num_matvecs=trace_hvps,
                        dtype=problem.dtype, device=problem.device, seed=seed, block_size=plan.trace_block or 16)
        tr, tr_se, num_trace = float(est.estimate), float(est.stderr), int(est.num_matvecs)

    scale = float((lres.top if which == "both" else lres).scale)  # max |Ritz value| of the run
    # after the trace: float64 checks free the gradient graph
    audit = audit_precision(problem)
    pure64 = problem.dtype == torch.float64 and not audit.mixed
    head = pure64 and has_plain_head(problem)  # float64: the textbook loss head's rounding, measured
    top, bottom = (_bounded(problem, e, scale, eigenvectors, bounds, audit.mixed, head) if e is not None else None
                   for e in (top, bottom))
    per_end = (2 * SKETCH_PROBES if head else 0) if pure64 else min(k, SKETCH_PROBES) if bounds == "sketch" else k
    num_check = per_end * (2 if which == "both" else 1)
    ends = [e for e in (top, bottom) if e is not None]
    floor = SADDLE_FLOOR_EPS * torch.finfo(problem.dtype).eps * scale
    certified_negative = any(bool(((e.eigenvalues + e.residuals) < -floor).any()) for e in ends)
    is_saddle: bool | None = True if certified_negative else (False if which != "top" else None)
    return HessianResult(
        which=which, top=top, bottom=bottom,
        trace=tr, trace_stderr=tr_se, trace_method=trace_method if trace else None,
        num_hvps=num_lanczos + num_trace + num_check, num_lanczos_hvps=num_lanczos, num_trace_hvps=num_trace,
        num_restarts=int((lres.top if which == "both" else lres).num_restarts), is_saddle=is_saddle,
        saddle_floor=floor, tol=tol, top_k=k, max_hvps=max_hvps, block_size=block_size, seed=seed,
        trace_hvps=trace_hvps if trace else None, hvp_route=getattr(problem, "hvp_route", None),
        num_check_hvps=num_check, warm_start=start is not None, next_start=next_start, memory_plan=plan,
        compute_dtype=str(audit.lowest).replace("torch.", ""),
    )


def plan_hessian(problem: Problem, *, k: int = 10, which: str = "top", block_size: int = 1, trace: bool = False,
                 trace_hvps: int = 100, bounds: str = "rescaled", storage: str | None = None) -> MemoryPlan:
    """The memory plan of :func:`hessian_eigenvalues` with these arguments: the problem's plan
    (route, HVP pieces: :class:`~basins.engine.memory.MemoryPlan`) completed with the Lanczos basis
    (in memory, bounded by thick restart, or on disk), the trace's block and the error-bound
    checks (:func:`~basins.engine.memory.plan_lanczos`). Costs nothing: sizes only.

    Raises:
        InputError: nothing fits the budget (one line, with the sizes).
    """
    need = min(2 * k, int(problem.num_params)) if which == "both" else k
    if problem.dtype == torch.float64:  # the loss head's spread: three (P, 3) blocks (a softmax loss)
        checks = 3 * SKETCH_PROBES if getattr(problem, "loss_name", None) in SOFTMAX_LOSSES else 0
    else:
        checks = 2 * min(need, problem.routes.piece_block)
    return plan_lanczos(problem.routes.plan, int(problem.num_params), problem.dtype.itemsize, need=need,
                        block=block_size, storage=storage, trace_hvps=trace_hvps if trace else 0, check_vectors=checks)


def _bounded(problem: Problem, end: HessianEnd, scale: float, keep_vectors: bool, how: str,
             mixed: bool = False, head: bool = False) -> HessianEnd:
    """``end`` with its error bounds (module docstring); with ``how="float64"`` (below float64)
    the eigenvalues become float64 Rayleigh quotients. ``mixed``: the model computes part of its
    graph below its dtype (:func:`~basins.engine.precision.audit_precision`): the rounding is
    measured by the rescaled products, as below float64 (float64 check products would carry the
    same narrow layers). ``head`` (float64): add the measured spread of the textbook softmax
    loss head (:func:`~basins.engine.rounding.loss_head_rounding`)."""
    vals, res, vecs = end.eigenvalues, end.residuals, end.eigenvectors
    allowance = BOUND_EPS * torch.finfo(torch.float64).eps * scale
    if (problem.dtype == torch.float64 and not mixed) or vecs is None:
        bound = res + allowance
        if head and vecs is not None:
            bound = bound + ROUNDING_FACTOR * loss_head_rounding(problem, vecs)
    elif how == "float64" and not mixed:
        vals, r64 = problem.check_eigenpairs(vecs)
        bound = r64 + allowance
    else:
        # the forward's own rounding is common to both products of a rescaled check, which cannot see
        # it: one eps(dtype)·max|θ| for it (a float32 Llama's pair 2 was off by 2.24e-7 against 4·d = 2.18e-7)
        if problem.dtype != torch.float64:
            allowance += torch.finfo(problem.dtype).eps * scale
        measured = (sketched_rounding(problem, vecs, vals) if how == "sketch" and vecs.shape[1] > SKETCH_PROBES
                    else problem.rescaled_residuals(vecs, vals))
        bound = res + ROUNDING_FACTOR * measured + allowance
    return HessianEnd(vals, res, end.converged, vecs if keep_vectors else None, bound)


def _split_ends(lres: Any, which: str) -> tuple[HessianEnd | None, HessianEnd | None]:
    """(top, bottom) ends of a Lanczos result on the CPU (None where not computed)."""

    def end(r: Any) -> HessianEnd:
        vecs = r.eigenvectors.cpu() if r.eigenvectors is not None else None
        return HessianEnd(r.eigenvalues.to("cpu", torch.float64), r.residuals.to("cpu", torch.float64),
                          r.converged.to("cpu", torch.bool), vecs)

    if which == "both":
        return end(lres.top), end(lres.bottom)
    return (end(lres), None) if which == "top" else (None, end(lres))
