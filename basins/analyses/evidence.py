"""Laplace log evidence (marginal likelihood) around θ* (MacKay 1992; Bishop PRML §3.5, §4.4;
Daxberger et al. 2021, "Laplace Redux").

    log p(D) ≈ log p(D | w*) + log p(w*) + (P/2)·log 2π − ½·log det Λ,   Λ = H_nll + δI,

H_nll the Hessian of the **summed** negative log-likelihood. basins' L is a mean over N
averaged terms (``problem.num_terms``: n·k entries for mse, n (·positions) for the
classification losses), so:

* mse, Gaussian noise σ (given, or the MLE σ² = L(w*), said so):
  NLL = N·L/(2σ²) + (N/2)·log 2πσ², H_nll = N/(2σ²)·H_L;
* cross-entropy / nll (categorical), bce (Bernoulli): NLL = N·L, H_nll = N·H_L;
* causal-lm / token-cross-entropy (categorical per token): the token NLL summed over the N valid
  tokens, NLL = N·L, H_nll = N·H_L.

Prior N(0, δ⁻¹I): log p(w*) = (P/2)·log(δ/2π) − (δ/2)‖w*‖². ``prior_precision="auto"``
maximises the evidence over δ (golden section on log δ; one eigen-decomposition or one SLQ
run serves every δ, as Krylov spaces are shift-invariant).

log det: ``exact`` (dense float64 curvature, P products, eigvalsh: no interval, said ``exact``),
``slq`` (:func:`basins.analyses.eigen.deflated_slq`: top ``deflate`` eigenpairs by Lanczos kept
exactly, the rest by stochastic Lanczos quadrature with a 95% Student-t interval over probes,
never of zero width), ``auto`` = the one dense-or-iterative rule
(:func:`basins.analyses.eigen.dense_fits`). Curvature ``hessian``, ``ggn`` (generalised
Gauss–Newton JᵀH_outJ, PSD; :class:`basins.engine.curvature.GGNOperator`, through the problem's
data loop, process reduction and counters), or ``both``: the two evidences and their difference
``log p_H − log p_G``, a model-error term of the Laplace approximation (how much the choice of
curvature alone moves the answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from basins.analyses.eigen import deflated_slq, dense_fits, dense_reason
from basins.engine.curvature import curvature_operator
from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError
from basins.linalg.operator import Operator, as_operator
from basins.linalg.slq import student_t_quantile
from basins.progress import ProgressCallback
from basins.record import Array, Record

__all__ = ["EvidenceResult", "LogDet", "evidence", "logdet_slq", "logdet_exact", "laplace_log_evidence",
           "LIKELIHOODS", "EVIDENCE_CURVATURES"]

#: The likelihood behind each loss with one (the token losses: categorical per valid token).
LIKELIHOODS = {"mse": "gaussian", "cross-entropy": "categorical", "nll": "categorical", "bce": "bernoulli",
               "causal-lm": "categorical (per token)", "token-cross-entropy": "categorical (per token)"}
_LIKELIHOODS = LIKELIHOODS
#: ``both``: the Hessian and GGN evidences and their difference.
EVIDENCE_CURVATURES = ("hessian", "ggn", "both")


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

    def clamp_rounding(self, tol: float) -> int:
        """Eigenvalues (and nodes) of A in ``[−tol, 0)``, rounding of a PSD curvature, set to 0;
        returns how many of the exact ones were (nodes are not counted)."""
        n = int(((self.top < 0) & (self.top >= -tol)).sum())
        self.top = torch.where((self.top < 0) & (self.top >= -tol), torch.zeros_like(self.top), self.top)
        self.nodes = [torch.where((t < 0) & (t >= -tol), torch.zeros_like(t), t) for t in self.nodes]
        return n

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
        if half == 0 and self.dim > 0:  # every probe gave the same quadrature: fall back on the nodes' range
            logs = torch.cat([torch.log((self.scale * t + delta).clamp(min=1e-300)) for t in self.nodes])
            half = self.dim * float(logs.max() - logs.min()) / 2 or self.dim * 1e-12 * max(1.0, abs(est) / self.dim)
        return est, est - half, est + half


def logdet_exact(A: torch.Tensor, scale: float = 1.0) -> LogDet:
    """:class:`LogDet` from a dense symmetric ``(P, P)`` matrix A (float64 eigvalsh)."""
    A = A.to(torch.float64)
    return LogDet("exact", scale, torch.linalg.eigvalsh((A + A.T) / 2))


def logdet_slq(operator: Operator | torch.Tensor, *, scale: float = 1.0, num_probes: int = 30, num_steps: int = 60,
               deflate: int = 20, seed: int = 0) -> LogDet:
    """:class:`LogDet` of an :class:`Operator` (or dense symmetric tensor) by the one deflated SLQ
    (:func:`basins.analyses.eigen.deflated_slq`): the top ``deflate`` pairs (Lanczos, tol 1e-6)
    are kept exactly and projected out of the probes.

    Cost: the Lanczos count plus ``num_probes × num_steps`` products.
    """
    op = as_operator(operator)
    P = op.num_params
    k = min(deflate, P - 2) if P > 2 else 0
    run = deflated_slq(op, deflate=k, num_probes=num_probes, num_steps=num_steps, seed=seed)
    r = run.slq
    return LogDet("slq", scale, run.top, r.nodes, r.weights, r.dim, run.num_matvecs)


def laplace_log_evidence(log_lik: float, theta_sq: float, num_params: int, logdet: LogDet, delta: float
                         ) -> dict[str, float]:
    """The pieces of the Laplace log evidence at prior precision δ (see the module docstring)."""
    P = num_params
    ld, lo, hi = logdet(delta)
    log_prior = 0.5 * P * math.log(delta / (2 * math.pi)) - 0.5 * delta * theta_sq
    occam = log_prior + 0.5 * P * math.log(2 * math.pi) - 0.5 * ld
    return {"log_evidence": log_lik + occam, "log_prior": log_prior, "log_occam": occam, "logdet": ld,
            "logdet_lower": lo, "logdet_upper": hi}


#: The range of log δ that ``prior_precision="auto"`` searches.
_LOG_DELTA_RANGE = (-20.0, 20.0)


def _best_delta(f: Callable[[float], float], lo: float = _LOG_DELTA_RANGE[0], hi: float = _LOG_DELTA_RANGE[1]
                ) -> float:
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
    """The Laplace evidence and its pieces (nats).

    ``log_evidence_ci`` is the interval of a stochastic (slq) log det, never of zero width; for
    ``method == "exact"`` it is the estimate twice and :attr:`interval` says ``exact``. With
    ``curvature == "both"`` the fields are the Hessian's, :attr:`other` is the GGN's result and
    :attr:`model_error` the difference ``log p_H − log p_G`` with its interval (either may be
    None with a note when the Hessian's Λ is not positive definite).
    """

    log_evidence: float | None
    log_evidence_ci: tuple[float, float] | None
    log_likelihood: float
    log_prior: float | None
    log_occam: float | None
    logdet: float | None
    logdet_ci: tuple[float, float] | None
    method: str
    prior_precision: float | None
    prior_precision_rule: str
    noise_std: float | None
    noise_std_rule: str
    curvature: str
    likelihood: str
    num_terms: int
    num_matvecs: int
    eigenvalues: torch.Tensor | None
    notes: list[str] = field(default_factory=list)
    other: EvidenceResult | None = None
    model_error: tuple[float, float, float] | None = None
    num_hvps: int = 0
    num_ggn_products: int = 0

    @property
    def interval(self) -> str:
        """How :attr:`log_evidence_ci` was found: ``exact`` (dense, rounding only) or a 95% slq interval."""
        return "exact (dense eigendecomposition)" if self.method == "exact" else "95% over SLQ probes"

    def record(self) -> Record:
        """The ``/evidence`` report group and ``--json`` keys."""
        attrs: dict[str, Any] = {
            "log_evidence": self.log_evidence,
            "log_evidence_ci": None if self.log_evidence_ci is None else list(self.log_evidence_ci),
            "interval": self.interval,
            "log_likelihood": self.log_likelihood, "log_prior": self.log_prior, "log_occam": self.log_occam,
            "logdet": self.logdet, "logdet_ci": None if self.logdet_ci is None else list(self.logdet_ci),
            "method": self.method,
            "prior_precision": self.prior_precision, "prior_precision_rule": self.prior_precision_rule,
            "noise_std": self.noise_std, "noise_std_rule": self.noise_std_rule, "curvature": self.curvature,
            "likelihood": self.likelihood, "num_terms": self.num_terms, "num_hvps": self.num_hvps,
            "num_ggn_products": self.num_ggn_products, "num_curvature_products": self.num_matvecs,
            "units": "nats", "notes": self.notes,
        }
        if self.other is not None:
            o = self.other
            attrs.update({
                "ggn_log_evidence": o.log_evidence, "ggn_log_evidence_ci": list(o.log_evidence_ci or ()),
                "ggn_logdet": o.logdet, "ggn_prior_precision": o.prior_precision, "ggn_method": o.method,
                "model_error": None if self.model_error is None else self.model_error[0],
                "model_error_ci": None if self.model_error is None else list(self.model_error[1:]),
            })
        arrays = {}
        if self.eigenvalues is not None:
            arrays["eigenvalues"] = Array(self.eigenvalues, "eigenvalues of H_nll (summed NLL), ascending", None)
        if self.other is not None and self.other.eigenvalues is not None:
            arrays["ggn_eigenvalues"] = Array(self.other.eigenvalues, "eigenvalues of the GGN of the summed NLL, "
                                              "ascending", None)
        return Record(attrs, arrays)


def evidence(problem: Problem, *, prior_precision: float | str = "auto", noise_std: float | None = None,
             curvature: str = "hessian", method: str = "auto", num_probes: int = 30, num_steps: int = 60,
             deflate: int = 20, seed: int = 0, memory_bytes: int | None = None,
             callback: ProgressCallback | None = None) -> EvidenceResult:
    """Laplace log evidence of ``problem`` at θ* (module docstring).

    Args:
        curvature: one of :data:`EVIDENCE_CURVATURES`.
        method: ``auto`` (the one dense rule, :func:`~basins.analyses.eigen.dense_fits`), ``exact`` or ``slq``.
        memory_bytes: the dense rule's budget (default a quarter of physical memory).

    Cost: P curvature products (exact) or Lanczos + ``num_probes × num_steps`` (slq); twice for ``both``.

    Raises:
        InputError: a loss without a likelihood, bad parameters.
        InputError: also ``prior_precision="auto"`` with an indefinite curvature (θ* not a minimum:
            the evidence grows without bound as δ ↓ −λ_min); ``both`` reports it as a note.
        ComputeError: H_nll + δI not positive definite (curvature ``hessian``; ``both`` reports it as a note).
    """
    if curvature not in EVIDENCE_CURVATURES:
        raise InputError(f"unknown curvature {curvature!r}: use one of {', '.join(EVIDENCE_CURVATURES)}",
                         param="curvature")
    kw: dict[str, Any] = {"prior_precision": prior_precision, "noise_std": noise_std, "method": method,
                          "num_probes": num_probes, "num_steps": num_steps, "deflate": deflate, "seed": seed,
                          "memory_bytes": memory_bytes, "callback": callback}
    if curvature != "both":
        return _evidence(problem, curvature, **kw)
    before = problem.counters.as_dict()
    g = _evidence(problem, "ggn", **kw)
    try:
        h = _evidence(problem, "hessian", **kw)
    except (ComputeError, InputError) as exc:
        note = f"curvature both: the Hessian evidence is undefined ({exc}); only the GGN's is reported"
        hvps = problem.counters.num_hvps - before["num_hvps"]  # the work done before the refusal counts too
        return replace(g, log_evidence=None, log_evidence_ci=None, log_prior=None, log_occam=None, logdet=None,
                       logdet_ci=None, prior_precision=None, eigenvalues=None, other=g, curvature="both",
                       notes=[*g.notes, note], num_hvps=hvps, num_matvecs=g.num_matvecs + hvps)
    assert h.log_evidence is not None and g.log_evidence is not None
    lo_h, hi_h = h.log_evidence_ci or (h.log_evidence, h.log_evidence)
    lo_g, hi_g = g.log_evidence_ci or (g.log_evidence, g.log_evidence)
    gap = h.log_evidence - g.log_evidence
    err = (gap, gap - (h.log_evidence - lo_h) - (hi_g - g.log_evidence),
           gap + (hi_h - h.log_evidence) + (g.log_evidence - lo_g))
    notes = h.notes + [n for n in g.notes if n not in h.notes]
    notes.append(f"curvature both: log p_H − log p_G = {gap:.4g} nats, the model error of the Laplace "
                 "approximation from the choice of curvature alone (H includes the residual term G omits)")
    return replace(h, curvature="both", other=g, model_error=err, notes=notes,
                   num_matvecs=h.num_matvecs + g.num_matvecs, num_ggn_products=g.num_ggn_products)


def _evidence(problem: Problem, curvature: str, *, prior_precision: float | str, noise_std: float | None,
              method: str, num_probes: int, num_steps: int, deflate: int, seed: int, memory_bytes: int | None,
              callback: ProgressCallback | None) -> EvidenceResult:
    """The evidence with one curvature (``hessian`` or ``ggn``)."""
    name = problem.loss_name
    if name not in LIKELIHOODS or problem.pair_loss:
        raise InputError(f"loss {name!r} has no likelihood for the evidence: use one of {', '.join(LIKELIHOODS)}",
                         param="loss")
    if method not in ("auto", "exact", "slq"):
        raise InputError(f"unknown method {method!r}: use auto, exact or slq", param="method")
    if noise_std is not None and not (math.isfinite(noise_std) and noise_std > 0):
        raise InputError(f"noise_std must be a positive number, got {noise_std}", param="noise_std")
    P, N = problem.num_params, problem.num_terms
    L = float(problem.loss_at_optimum)
    notes: list[str] = []
    sigma, sigma_rule = None, "not used"
    if name == "mse":
        if noise_std is None:
            if L <= 0:
                raise InputError("the residual is zero, so noise_std cannot be estimated: give noise_std",
                                 param="noise_std")
            sigma, sigma_rule = math.sqrt(L), "estimated: MLE σ² = L(w*), the mean squared residual"
            notes.append(f"noise_std σ = {sigma:.6g} estimated from the residual (σ² = L(w*))")
        else:
            sigma, sigma_rule = float(noise_std), "given"
        scale = N / (2 * sigma**2)
        log_lik = -(N * L / (2 * sigma**2) + 0.5 * N * math.log(2 * math.pi * sigma**2))
    else:
        scale = float(N)
        log_lik = -N * L
        if name in ("causal-lm", "token-cross-entropy"):
            notes.append(f"likelihood: the token NLL summed over the N = {N:,} valid tokens")
    if method == "auto":
        dense = dense_fits(P, memory_bytes=memory_bytes)
        chosen = "exact" if dense else "slq"
        notes.append(f"auto: {chosen} because {dense_reason(P, memory_bytes=memory_bytes)}")
    else:
        chosen = method
    op = curvature_operator(problem, curvature)
    before = problem.counters.as_dict()
    if chosen == "exact":
        ld = logdet_exact(op.materialise(dtype=torch.float64, block=64, symmetrise=True), scale)
    else:
        ld = logdet_slq(op, scale=scale, num_probes=num_probes, num_steps=num_steps, deflate=deflate, seed=seed)
    after = problem.counters.as_dict()
    hvps = after["num_hvps"] - before["num_hvps"]
    ggns = after["num_ggn_products"] - before["num_ggn_products"]
    sizes = ([float(ld.top.abs().max())] if ld.top.numel() else []) + [float(t.abs().max()) for t in ld.nodes if t.numel()]
    biggest = max(sizes, default=0.0)
    rounding = 1e3 * torch.finfo(problem.dtype).eps * biggest
    if curvature == "ggn":  # JᵀH_outJ with a likelihood convex in the outputs: PSD, a negative λ is rounding
        lowest = ld.lambda_min() / ld.scale
        clamped = ld.clamp_rounding(max(rounding, -lowest))
        why = f"the GGN is positive semi-definite (every likelihood here is convex in the outputs); its lowest " \
              f"computed eigenvalue {lowest:.3g} is rounding"
    else:
        clamped = ld.clamp_rounding(rounding)
        why = f"rounding level (10³·eps·|λ|max in {str(problem.dtype).replace('torch.', '')})"
    if clamped:
        notes.append(f"{clamped} negative eigenvalue(s) of the {curvature} taken as 0: {why}")
    theta = problem.theta0.to(torch.float64)
    tsq = float(theta @ theta)
    if prior_precision == "auto":
        floor = max(0.0, -ld.lambda_min()) * (1 + 1e-9) + 1e-300
        if floor > math.exp(_LOG_DELTA_RANGE[0]):
            # log det(H_nll + δI) → −∞ as δ ↓ −λ_min: the "maximiser" would be that boundary, not an answer
            raise InputError(
                f"prior_precision 'auto' needs a positive semi-definite curvature, but the {curvature} of the NLL "
                f"has an eigenvalue {ld.lambda_min():.3g} < 0 (θ* is not a minimum), where the evidence grows "
                "without bound; use curvature 'ggn' (positive semi-definite) or give a prior_precision above "
                f"{floor:.3g}", param="prior_precision"
            )

        def f(d: float) -> float:
            if d <= floor:
                return -math.inf
            return laplace_log_evidence(log_lik, tsq, P, ld, d)["log_evidence"]

        delta, delta_rule = _best_delta(f), "auto: maximises the Laplace evidence over δ"
    else:
        try:
            delta = float(prior_precision)
        except (TypeError, ValueError):
            raise InputError(f"prior_precision must be a positive number or 'auto', got {prior_precision!r}",
                             param="prior_precision") from None
        if not (math.isfinite(delta) and delta > 0):
            raise InputError(f"prior_precision must be a positive number or 'auto', got {prior_precision!r}",
                             param="prior_precision")
        delta_rule = "given"
    parts = laplace_log_evidence(log_lik, tsq, P, ld, delta)
    ev = parts["log_evidence"]
    if chosen == "slq":
        notes.append("slq: the interval covers the probes' spread, not the quadrature's error (small at "
                     f"{num_steps} steps for log)")
    else:
        notes.append("exact: a dense eigendecomposition, so the evidence has no stochastic error (no interval)")
    return EvidenceResult(
        log_evidence=ev, log_evidence_ci=(ev - 0.5 * (parts["logdet_upper"] - parts["logdet"]),
                                          ev + 0.5 * (parts["logdet"] - parts["logdet_lower"])),
        log_likelihood=log_lik, log_prior=parts["log_prior"], log_occam=parts["log_occam"], logdet=parts["logdet"],
        logdet_ci=(parts["logdet_lower"], parts["logdet_upper"]), method=chosen, prior_precision=delta,
        prior_precision_rule=delta_rule, noise_std=sigma, noise_std_rule=sigma_rule, curvature=curvature,
        likelihood=LIKELIHOODS[name], num_terms=N, num_matvecs=hvps + ggns,
        eigenvalues=(ld.top * scale) if chosen == "exact" else None, notes=notes, num_hvps=hvps,
        num_ggn_products=ggns,
    )
