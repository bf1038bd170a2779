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
  the rounding of one product; the bound is ``r + ROUNDING_FACTOR·d``. This is a measured
  estimate, not a proof: rounding shared by both products (the saved activations) is not seen;
  on the benchmark problems it was 0.4–1.4× ``‖E y‖`` and ``ROUNDING_FACTOR = 4`` keeps every
  float64 eigenvalue inside, with a margin of ≥ 2.7×.
* ``"float64"`` (k float64 HVPs: 10–12× a float32 one on CPU): each Ritz vector gets a float64
  check product (:meth:`basins.Problem.check_eigenpairs`); the eigenvalue becomes the float64
  Rayleigh quotient ``ρ = yᵀHy`` and its bound ``‖Hy − ρy‖``, which provably contains an
  eigenvalue of the exact Hessian (ρ's own error is second order, ``‖Hy − ρy‖²/gap``).

In float64, the bound is the residual plus ``BOUND_EPS·eps₆₄·max|θ|`` for the rounding. The
systematic float32 low bias of the top eigenvalues seen before came mostly from the loss head
evaluated in float32; :class:`~basins.engine.problem.Problem` now evaluates it in float64.

Known limitation: the residual bound locates *an* eigenvalue near each Ritz value, not the
k-th one; a cluster that Lanczos has not yet split can hide eigenvalues (raise ``--tol``
strictness or the budget; full reorthogonalisation keeps ghosts out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from basins.errors import InputError

__all__ = ["HessianProgress", "HessianResult", "hessian_eigenvalues", "WHICH", "TRACE_METHODS", "SADDLE_FLOOR_EPS"]

WHICH = ("top", "bottom", "both")
TRACE_METHODS = ("hutch++", "hutchinson")
#: Safety factor on the measured rounding of ``bounds="rescaled"`` (module docstring).
ROUNDING_FACTOR = 4.0
#: How float32 error bounds are measured (module docstring).
BOUNDS = ("rescaled", "float64")
#: Rounding allowance of float64 error bounds, in units of ``eps₆₄·max|θ|``.
BOUND_EPS = 64.0
#: A bottom Ritz value counts as negative only below ``-SADDLE_FLOOR_EPS·eps(dtype)·max|θ|``.
SADDLE_FLOOR_EPS = 100.0


@dataclass
class HessianProgress:
    """Progress of :func:`hessian_eigenvalues`, passed to its callback.

    Attributes:
        phase: ``"lanczos"`` or ``"trace"``.
        num_hvps: HVPs done so far (both phases together).
        max_hvps: the total budget (Lanczos budget + trace HVPs), None if not known yet.
        max_residual: Lanczos phase: the largest residual of the wanted Ritz values.
        num_converged: Lanczos phase: how many wanted Ritz values have converged.
    """

    phase: str
    num_hvps: int
    max_hvps: int | None
    max_residual: float | None = None
    num_converged: int | None = None


@dataclass
class HessianResult:
    """Eigenvalues (with residual bounds) and trace of the Hessian at θ*.

    Attributes:
        which: ``"top"``, ``"bottom"`` or ``"both"``.
        eigenvalues: ``(k,)`` float64, loss/θ² units. Top (descending) for ``top``/``both``;
            bottom (ascending) for ``bottom``.
        residuals: ``(k,)`` float64 residual norms: an eigenvalue of H lies within each.
        converged: ``(k,)`` bool, ``residual ≤ tol·max|θ|`` (max over all Ritz values, ≈ ‖H‖).
        bottom_eigenvalues, bottom_residuals, bottom_converged: the bottom end (ascending)
            for ``which="both"``, else None.
        eigenvectors: ``(P, k)`` unit Ritz vectors (problem dtype, CPU) when asked, else None.
        bottom_eigenvectors: the same for the bottom end of ``both``.
        trace, trace_stderr, trace_method: the trace estimate and its standard error, when asked.
        num_hvps: all HVPs spent by this call (Lanczos + trace + float64 checks).
        num_lanczos_hvps, num_trace_hvps, num_restarts: the split and Lanczos restarts.
        is_saddle: True if some Ritz value θ has ``θ + r < −saddle_floor``; False if the
            bottom end was computed and none has; None if only the top end was (unknown).
        saddle_floor: the rounding floor used for ``is_saddle`` (loss/θ² units).
        tol: the relative residual tolerance asked for.
        error_bounds, bottom_error_bounds: ``(k,)`` float64: an eigenvalue of the exact Hessian
            lies within each eigenvalue ± its bound, rounding of the HVPs included (module docstring).
        num_check_hvps: products spent on the bounds (rescaled or float64, one per Ritz vector).
    """

    which: str
    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    bottom_eigenvalues: torch.Tensor | None
    bottom_residuals: torch.Tensor | None
    bottom_converged: torch.Tensor | None
    eigenvectors: torch.Tensor | None
    bottom_eigenvectors: torch.Tensor | None
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
    error_bounds: torch.Tensor | None = None
    bottom_error_bounds: torch.Tensor | None = None
    num_check_hvps: int = 0

    @property
    def all_converged(self) -> bool:
        """Whether every wanted eigenvalue (both ends) converged."""
        ok = bool(self.converged.all())
        if self.bottom_converged is not None:
            ok = ok and bool(self.bottom_converged.all())
        return ok

    @property
    def num_converged(self) -> int:
        n = int(self.converged.sum())
        return n + (int(self.bottom_converged.sum()) if self.bottom_converged is not None else 0)

    @property
    def num_wanted(self) -> int:
        return int(self.converged.numel()) + (int(self.bottom_converged.numel()) if self.bottom_converged is not None else 0)

    @property
    def lambda_max(self) -> float | None:
        """The largest eigenvalue found (None if only the bottom end was computed)."""
        return float(self.eigenvalues[0]) if self.which != "bottom" and self.eigenvalues.numel() else None

    @property
    def lambda_min(self) -> float | None:
        """The smallest eigenvalue found (None if only the top end was computed)."""
        if self.which == "both" and self.bottom_eigenvalues is not None and self.bottom_eigenvalues.numel():
            return float(self.bottom_eigenvalues[0])
        if self.which == "bottom" and self.eigenvalues.numel():
            return float(self.eigenvalues[0])
        return None


def hessian_eigenvalues(
    problem: Any,
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
    callback: Callable[[HessianProgress], None] | None = None,
    bounds: str = "rescaled",
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
        bounds: how float32 error bounds measure rounding: ``rescaled`` or ``float64`` (module docstring).
        callback: called with a :class:`HessianProgress` as the work proceeds.

    Returns:
        A :class:`HessianResult`. Cost: ≤ ``max_hvps`` HVPs (+ ``trace_hvps`` with ``trace``).

    Raises:
        InputError: a bad ``k``, ``which``, ``tol``, ``block_size``, ``trace_method`` or budget.
    """
    from basins.linalg.lanczos import lanczos

    P = int(problem.num_params)
    if which not in WHICH:
        raise InputError(f"unknown --which {which!r}: use top, bottom or both")
    if not 1 <= k <= P:
        raise InputError(f"k (--top-k) must be between 1 and the number of parameters P = {P}, got {k}")
    if not (tol > 0 and math.isfinite(tol)):
        raise InputError(f"tol (--tol) must be a positive number, got {tol}")
    if block_size < 1:
        raise InputError(f"block_size (--block-size) must be ≥ 1, got {block_size}")
    if max_hvps is not None and max_hvps < 1:
        raise InputError(f"max_hvps (--max-hvps) must be ≥ 1, got {max_hvps}")
    if bounds not in BOUNDS:
        raise InputError(f"unknown bounds {bounds!r}: use rescaled or float64")
    if trace and trace_method not in TRACE_METHODS:
        raise InputError(f"unknown trace method {trace_method!r}: use hutch++ or hutchinson")
    least = 4 if trace_method == "hutch++" else 2
    if trace and trace_hvps < least:
        raise InputError(f"trace_hvps (--trace-hvps) must be ≥ {least} for {trace_method}, got {trace_hvps}")

    state: dict[str, Any] = {"phase": "lanczos", "base": 0, "lanczos_total": max_hvps}
    extra = trace_hvps if trace else 0

    def total() -> int | None:
        lt = state["lanczos_total"]
        return None if lt is None else int(lt) + extra

    def lanczos_progress(p: Any) -> None:
        if p.max_matvecs is not None:
            state["lanczos_total"] = int(p.max_matvecs)
        if callback is not None:
            callback(HessianProgress("lanczos", int(p.num_matvecs), total(), float(p.max_residual), int(p.num_converged)))

    options: dict[str, Any] = {"k": k, "which": which, "tol": tol, "max_matvecs": max_hvps, "block_size": block_size,
                               "dtype": problem.dtype, "device": problem.device, "seed": seed,
                               "return_eigenvectors": True, "callback": lanczos_progress}
    lres: Any = lanczos(problem.hvp, P, **options)  # LanczosResult, or LanczosBothEnds for "both"
    num_lanczos = int(lres.num_matvecs)
    if state["lanczos_total"] is None:
        state["lanczos_total"] = num_lanczos
    top, bottom = _split_ends(lres, which)

    tr = tr_se = None
    num_trace = 0
    if trace:
        from basins.linalg.trace import hutchinson, hutchpp

        done = [0]

        def counted(V: torch.Tensor) -> torch.Tensor:
            out = problem.hvp(V)
            done[0] += 1 if V.dim() == 1 else int(V.shape[1])
            if callback is not None:
                callback(HessianProgress("trace", num_lanczos + done[0], total()))
            return out

        estimator = hutchpp if trace_method == "hutch++" else hutchinson
        est = estimator(counted, P, num_matvecs=trace_hvps, dtype=problem.dtype, device=problem.device, seed=seed)
        tr, tr_se, num_trace = float(est.estimate), float(est.stderr), int(est.num_matvecs)

    scale = float((lres.top if which == "both" else lres).scale)  # max |Ritz value| of the run
    top, top_bounds = _bounded(problem, top, scale, eigenvectors, bounds)  # after the trace: the checks free the graph
    bottom_bounds = None
    if which == "bottom":
        bottom, bottom_bounds = top, top_bounds
    elif bottom is not None:
        bottom, bottom_bounds = _bounded(problem, bottom, scale, eigenvectors, bounds)
    num_check = 0 if problem.dtype == torch.float64 else k * (2 if which == "both" else 1)  # one per Ritz vector

    ritz = [top[0], top[1]] if which != "bottom" else []
    if bottom is not None:
        ritz += [bottom[0], bottom[1]]
    floor = SADDLE_FLOOR_EPS * torch.finfo(problem.dtype).eps * scale
    certified_negative = any(bool(((vals + res) < -floor).any()) for vals, res in zip(ritz[::2], ritz[1::2]))
    is_saddle: bool | None = True if certified_negative else (False if which != "top" else None)

    main = bottom if which == "bottom" else top
    assert main is not None
    return HessianResult(
        which=which,
        eigenvalues=main[0], residuals=main[1], converged=main[2],
        bottom_eigenvalues=bottom[0] if which == "both" and bottom is not None else None,
        bottom_residuals=bottom[1] if which == "both" and bottom is not None else None,
        bottom_converged=bottom[2] if which == "both" and bottom is not None else None,
        eigenvectors=main[3],
        bottom_eigenvectors=bottom[3] if which == "both" and bottom is not None else None,
        trace=tr, trace_stderr=tr_se, trace_method=trace_method if trace else None,
        num_hvps=num_lanczos + num_trace + num_check, num_lanczos_hvps=num_lanczos, num_trace_hvps=num_trace,
        num_restarts=int((lres.top if which == "both" else lres).num_restarts), is_saddle=is_saddle, saddle_floor=floor, tol=tol,
        error_bounds=bottom_bounds if which == "bottom" else top_bounds,
        bottom_error_bounds=bottom_bounds if which == "both" else None, num_check_hvps=num_check,
    )


def _bounded(problem: Any, end: _End, scale: float, keep_vectors: bool, how: str) -> tuple[_End, torch.Tensor]:
    """An end with its error bounds (module docstring); with ``how="float64"`` the values become
    float64 Rayleigh quotients."""
    vals, res, conv, vecs = end
    allowance = BOUND_EPS * torch.finfo(torch.float64).eps * scale
    if problem.dtype == torch.float64 or vecs is None:
        bounds = res + allowance
    elif how == "float64":
        vals, r64 = problem.check_eigenpairs(vecs)
        bounds = r64 + allowance
    else:
        bounds = res + ROUNDING_FACTOR * problem.rescaled_residuals(vecs, vals) + allowance
    return (vals, res, conv, vecs if keep_vectors else None), bounds


_End = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _split_ends(lres: Any, which: str) -> tuple[_End, _End | None]:
    """(top, bottom) ends of a Lanczos result as (values, residuals, converged, vectors) on the CPU."""

    def end(r: Any) -> _End:
        vecs = r.eigenvectors.cpu() if r.eigenvectors is not None else None
        return (r.eigenvalues.to("cpu", torch.float64), r.residuals.to("cpu", torch.float64),
                r.converged.to("cpu", torch.bool), vecs)

    if which == "both":
        return end(lres.top), end(lres.bottom)
    e = end(lres)
    return (e, None) if which == "top" else (e, e)
