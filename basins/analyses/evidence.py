"""Laplace log evidence (marginal likelihood) around θ* (MacKay 1992; Bishop PRML §3.5, §4.4;
Daxberger et al. 2021, "Laplace Redux").

    log p(D) ≈ log p(D | w*) + log p(w*) + (P/2)·log 2π − ½·log det Λ,   Λ = H_nll + δI,

H_nll the Hessian of the **summed** negative log-likelihood. basins' L is a mean over N
averaged terms (``problem.num_terms``: n·k entries for mse, n (·positions) for the
classification losses), so:

* mse, Gaussian noise σ (given, or the MLE σ² = L(w*), said so):
  NLL = N·L/(2σ²) + (N/2)·log 2πσ², H_nll = N/(2σ²)·H_L;
* cross-entropy / nll (categorical), bce (Bernoulli): NLL = N·L, H_nll = N·H_L.

Prior N(0, δ⁻¹I): log p(w*) = (P/2)·log(δ/2π) − (δ/2)‖w*‖². ``prior_precision="auto"``
maximises the evidence over δ (golden section on log δ; one eigen-decomposition or one SLQ
run serves every δ, as Krylov spaces are shift-invariant).

log det: ``exact`` (dense float64 curvature, P products, eigvalsh), ``slq`` (top ``deflate``
eigenpairs by Lanczos kept exactly, the rest by stochastic Lanczos quadrature with a 95%
Student-t interval over probes), ``auto`` = exact for P ≤ 3000. Curvature ``hessian``, or
``ggn`` (generalised Gauss–Newton JᵀH_outJ, PSD).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad, jvp, vjp, vmap

from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError
from basins.linalg.lanczos import lanczos
from basins.linalg.operator import Operator
from basins.linalg.slq import slq, student_t_quantile
from basins.progress import ProgressCallback
from basins.record import Array, Record

__all__ = ["EvidenceResult", "LogDet", "evidence", "logdet_slq", "logdet_exact", "laplace_log_evidence",
           "EXACT_MAX_PARAMS"]

EXACT_MAX_PARAMS = 3000
_LIKELIHOODS = {"mse": "gaussian", "cross-entropy": "categorical", "nll": "categorical", "bce": "bernoulli"}


@dataclass
class LogDet:
    """log det(s·A + δI) as a function of δ from one spectral summary of A.

    ``exact``: all eigenvalues. ``slq``: top eigenvalues ``top`` exactly plus ``dim`` times
    the per-probe quadrature ``Σ τ² f(θ)`` averaged over probes.
    """

    method: str
    scale: float
    top: torch.Tensor
    nodes: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    dim: int = 0
    num_matvecs: int = 0

    def lambda_min(self) -> float:
        vals = [self.top.min()] if self.top.numel() else []
        vals += [t.min() for t in self.nodes]
        return float(min(vals)) * self.scale

    def __call__(self, delta: float, coverage: float = 0.95) -> tuple[float, float, float]:
        """``(estimate, lower, upper)`` of log det(s·A + δI); exact gives lower = upper."""
        if self.lambda_min() + delta <= 0:
            raise ComputeError(f"H_nll + δI is not positive definite (smallest eigenvalue ≈ "
                               f"{self.lambda_min() + delta:.3g} at δ = {delta:.3g}): w* is not a minimum; "
                               "use curvature ggn or a larger prior_precision")
        head = float(torch.log(self.scale * self.top + delta).sum())
        if self.method == "exact":
            return head, head, head
        per = torch.stack([(w * torch.log((self.scale * t + delta).clamp(min=1e-300))).sum()
                           for t, w in zip(self.nodes, self.weights)])
        est = head + self.dim * float(per.mean())
        nv = per.numel()
        half = (student_t_quantile(0.5 + coverage / 2, nv - 1) * self.dim * float(per.std()) / math.sqrt(nv)
                if nv > 1 else math.inf)
        return est, est - half, est + half


def logdet_exact(A: torch.Tensor, scale: float = 1.0) -> LogDet:
    """:class:`LogDet` from a dense symmetric ``(P, P)`` matrix A (float64 eigvalsh)."""
    A = A.to(torch.float64)
    return LogDet("exact", scale, torch.linalg.eigvalsh((A + A.T) / 2))


def logdet_slq(operator: Operator | torch.Tensor, *, scale: float = 1.0, num_probes: int = 30, num_steps: int = 60,
               deflate: int = 20, seed: int = 0) -> LogDet:
    """:class:`LogDet` of an :class:`Operator` (or dense symmetric tensor) by SLQ; the top
    ``deflate`` pairs (Lanczos, tol 1e-6) are kept exactly and projected out of the probes.

    Cost: the Lanczos count plus ``num_probes × num_steps`` products.
    """
    op = operator if isinstance(operator, Operator) else Operator(lambda V: operator @ V, operator.shape[0])
    P = op.num_params
    k = min(deflate, P - 2) if P > 2 else 0
    top = torch.zeros(0, dtype=torch.float64)
    basis = None
    used = 0
    if k > 0:
        res = lanczos(op, k=k, which="top", tol=1e-6, dtype=torch.float64, seed=seed, return_eigenvectors=True)
        top, basis, used = res.eigenvalues.to(torch.float64), res.eigenvectors, int(res.num_matvecs)
        if basis is not None:
            basis = basis.to(torch.float64)
    r = slq(op, num_probes=num_probes, num_steps=num_steps, seed=seed, deflate=basis, dtype=torch.float64)
    return LogDet("slq", scale, top, r.nodes, r.weights, r.dim, used + r.num_matvecs)


def laplace_log_evidence(log_lik: float, theta_sq: float, num_params: int, logdet: LogDet, delta: float
                         ) -> dict[str, float]:
    """The pieces of the Laplace log evidence at prior precision δ (see the module docstring)."""
    P = num_params
    ld, lo, hi = logdet(delta)
    log_prior = 0.5 * P * math.log(delta / (2 * math.pi)) - 0.5 * delta * theta_sq
    occam = log_prior + 0.5 * P * math.log(2 * math.pi) - 0.5 * ld
    return {"log_evidence": log_lik + occam, "log_prior": log_prior, "log_occam": occam, "logdet": ld,
            "logdet_lower": lo, "logdet_upper": hi}


def _best_delta(f: Callable[[float], float], lo: float = -20.0, hi: float = 20.0) -> float:
    """argmax of f(δ) over log δ ∈ [lo, hi] (coarse grid, then golden section)."""
    grid = [lo + (hi - lo) * i / 80 for i in range(81)]
    vals = [f(math.exp(g)) for g in grid]
    i = max(range(len(grid)), key=vals.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b - phi * (b - a), a + phi * (b - a)
        if f(math.exp(c)) > f(math.exp(d)):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)


@dataclass
class EvidenceResult:
    """The Laplace evidence and its pieces (nats)."""

    log_evidence: float
    log_evidence_ci: tuple[float, float]
    log_likelihood: float
    log_prior: float
    log_occam: float
    logdet: float
    logdet_ci: tuple[float, float]
    method: str
    prior_precision: float
    prior_precision_rule: str
    noise_std: float | None
    noise_std_rule: str
    curvature: str
    likelihood: str
    num_terms: int
    num_matvecs: int
    eigenvalues: torch.Tensor | None
    notes: list[str] = field(default_factory=list)

    def record(self) -> Record:
        """The ``/evidence`` report group and ``--json`` keys."""
        attrs: dict[str, Any] = {
            "log_evidence": self.log_evidence, "log_evidence_ci": list(self.log_evidence_ci),
            "log_likelihood": self.log_likelihood, "log_prior": self.log_prior, "log_occam": self.log_occam,
            "logdet": self.logdet, "logdet_ci": list(self.logdet_ci), "method": self.method,
            "prior_precision": self.prior_precision, "prior_precision_rule": self.prior_precision_rule,
            "noise_std": self.noise_std, "noise_std_rule": self.noise_std_rule, "curvature": self.curvature,
            "likelihood": self.likelihood, "num_terms": self.num_terms, "num_hvps": self.num_matvecs,
            "units": "nats", "notes": self.notes,
        }
        arrays = {}
        if self.eigenvalues is not None:
            arrays["eigenvalues"] = Array(self.eigenvalues, "eigenvalues of H_nll (summed NLL), ascending", None)
        return Record(attrs, arrays)


def _ggn_matvec(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    """V ↦ G V, G = Σ_chunks w·Jᵀ H_out J (Hessian of the loss in the outputs), for ``(P, K)`` blocks."""
    space, buffers = problem.space, problem.buffers

    def one(v: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(v)
        for x, y, m, w in problem.chunks():
            def f(theta: torch.Tensor, x: Any = x, m: int = m) -> torch.Tensor:
                return problem.forward(space.unflatten(theta), x, buffers)[:m]

            def lo(o: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
                return problem.loss_value(o, y)

            theta0 = space.flatten(problem.params).detach()
            out, Jv = jvp(f, (theta0,), (v,))  # type: ignore[misc]
            _, Hout = jvp(grad(lo), (out,), (Jv,))  # type: ignore[misc]
            _, pull = vjp(f, theta0)  # type: ignore[misc]
            total = total + w * pull(Hout)[0]
        return total

    def mv(V: torch.Tensor) -> torch.Tensor:
        V = V.to(problem.dtype)
        single = V.dim() == 1
        W = V.reshape(problem.num_params, -1)
        out = vmap(one, in_dims=1, out_dims=1)(W)
        return out[:, 0] if single else out

    return mv


def evidence(problem: Problem, *, prior_precision: float | str = "auto", noise_std: float | None = None,
             curvature: str = "hessian", method: str = "auto", num_probes: int = 30, num_steps: int = 60,
             deflate: int = 20, seed: int = 0, callback: ProgressCallback | None = None) -> EvidenceResult:
    """Laplace log evidence of ``problem`` at θ* (module docstring).

    Cost: P curvature products (exact) or Lanczos + ``num_probes × num_steps`` (slq).

    Raises:
        InputError: a loss without a likelihood, bad parameters.
        ComputeError: H_nll + δI not positive definite.
    """
    name = problem.loss_name
    if name not in _LIKELIHOODS:
        raise InputError(f"loss {name!r} has no likelihood for the evidence: use one of {', '.join(_LIKELIHOODS)}")
    if curvature not in ("hessian", "ggn"):
        raise InputError(f"unknown curvature {curvature!r}: use hessian or ggn")
    if method not in ("auto", "exact", "slq"):
        raise InputError(f"unknown method {method!r}: use auto, exact or slq")
    if noise_std is not None and not (math.isfinite(noise_std) and noise_std > 0):
        raise InputError(f"noise_std must be a positive number, got {noise_std}")
    P, N = problem.num_params, problem.num_terms
    L = float(problem.loss_at_optimum)
    notes: list[str] = []
    sigma, sigma_rule = None, "not used"
    if name == "mse":
        if noise_std is None:
            if L <= 0:
                raise InputError("the residual is zero, so noise_std cannot be estimated: give noise_std")
            sigma, sigma_rule = math.sqrt(L), "estimated: MLE σ² = L(w*), the mean squared residual"
            notes.append(f"noise_std σ = {sigma:.6g} estimated from the residual (σ² = L(w*))")
        else:
            sigma, sigma_rule = float(noise_std), "given"
        scale = N / (2 * sigma**2)
        log_lik = -(N * L / (2 * sigma**2) + 0.5 * N * math.log(2 * math.pi * sigma**2))
    else:
        scale = float(N)
        log_lik = -N * L
    chosen = method if method != "auto" else ("exact" if P <= EXACT_MAX_PARAMS else "slq")
    if curvature == "hessian":
        mv: Callable[[torch.Tensor], torch.Tensor] = problem.hvp
    else:
        mv = _ggn_matvec(problem)
    if chosen == "exact":
        A = Operator(mv, P, problem.dtype, problem.device).materialise(dtype=torch.float64, block=64, symmetrise=True)
        ld = logdet_exact(A, scale)
        used = P
    else:
        ld = logdet_slq(Operator(mv, P, problem.dtype, problem.device), scale=scale, num_probes=num_probes,
                        num_steps=num_steps, deflate=deflate, seed=seed)
        used = ld.num_matvecs
    theta = problem.space.flatten(problem.params).detach().to(torch.float64)
    tsq = float(theta @ theta)
    if prior_precision == "auto":
        floor = max(0.0, -ld.lambda_min()) * (1 + 1e-9) + 1e-300

        def f(d: float) -> float:
            if d <= floor:
                return -math.inf
            return laplace_log_evidence(log_lik, tsq, P, ld, d)["log_evidence"]

        delta, delta_rule = _best_delta(f), "auto: maximises the Laplace evidence over δ"
    else:
        try:
            delta = float(prior_precision)
        except (TypeError, ValueError):
            raise InputError(f"prior_precision must be a positive number or 'auto', got {prior_precision!r}") from None
        if not (math.isfinite(delta) and delta > 0):
            raise InputError(f"prior_precision must be a positive number or 'auto', got {prior_precision!r}")
        delta_rule = "given"
    parts = laplace_log_evidence(log_lik, tsq, P, ld, delta)
    ev = parts["log_evidence"]
    if chosen == "slq":
        notes.append("slq: the interval covers the probes' spread, not the quadrature's error (small at "
                     f"{num_steps} steps for log)")
    return EvidenceResult(
        log_evidence=ev, log_evidence_ci=(ev - 0.5 * (parts["logdet_upper"] - parts["logdet"]),
                                          ev + 0.5 * (parts["logdet"] - parts["logdet_lower"])),
        log_likelihood=log_lik, log_prior=parts["log_prior"], log_occam=parts["log_occam"], logdet=parts["logdet"],
        logdet_ci=(parts["logdet_lower"], parts["logdet_upper"]), method=chosen, prior_precision=delta,
        prior_precision_rule=delta_rule, noise_std=sigma, noise_std_rule=sigma_rule, curvature=curvature,
        likelihood=_LIKELIHOODS[name], num_terms=N, num_matvecs=used,
        eigenvalues=(ld.top * scale) if chosen == "exact" else None, notes=notes,
    )
