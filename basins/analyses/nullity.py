"""Near-zero Hessian eigenvalues: how many directions leave the loss (nearly) unchanged.

For a ladder of thresholds, ``count = #{i : |λᵢ| ≤ rtol·λ_max + atol}`` (λ_max: the largest
eigenvalue; at a minimum ``‖H‖₂``), each with the method that produced it and an interval:

* ``exact``: the dense Hessian from P HVPs (in blocks), ``eigvalsh`` in float64. Interval:
  eigenvalues within ``δ`` of the threshold are uncertain, ``δ = ‖(H̃ − H̃ᵀ)/2‖₂ +
  10·√P·ε₆₄·λ_max``: the asymmetry of the computed ``H̃`` measures the HVPs' rounding
  error (its symmetric part is of the same size), plus the eigensolver's. Memory ``24·P²``
  bytes; ``auto`` takes it when ``P ≤ 4096``.
* ``features``: ``P − rank`` of the feature Gram matrix (:mod:`basins.analyses.features`): the count
  of flat directions of the Gauss–Newton part ``G`` (= H at a zero-residual mse optimum;
  ``‖Hv − Gv‖/‖Hv‖`` is reported so the user sees whether H ≈ G). Interval from the
  Jacobian's rounding (:class:`basins.analyses.features.FeatureGram`).
* ``slq`` (an estimate): deflate the top ``k`` eigenpairs found by Lanczos, then
  ``(P − k) × (SLQ mass of [−t, t])`` on the deflated operator. Per probe the mass is
  bracketed by (i) the Chebyshev–Markov–Stieltjes inequalities for Gauss quadrature (rigorous
  for the probe's measure: ``Σ_{j<p} τⱼ² ≤ μ((−∞, θ_p))``, ``μ((−∞, θ_p]) ≤ Σ_{j≤p} τⱼ²``;
  Golub & Meurant 2010, Thm 6.4; Szegő) and (ii) the nodes' residuals (a node counts as
  surely inside only if ``|θ| + 3r ≤ t``, as possibly inside if ``|θ| − 3r ≤ t``); the
  bracket's ends are then averaged over probes with a Student-t margin. So the interval
  covers both the probe spread and the quadrature's resolution limit: where ~100 nodes cannot
  resolve eigenvalues near t (a 26k-parameter classifier below ~1e-6·λ_max) it widens,
  up to ``[0, P − k]``, instead of printing a confident 0.

Known limitations: near an interpolating minimum eigenvalues fill every decade down to
rounding level, so a count means something only with its threshold; read the whole ladder
(Sagun et al. 2017; the paper's section on nullity).

Length: about 520 lines, over the house's 450, on purpose: the three routes share the threshold
ladder, the count type and the result (with its record), and ``auto`` chooses among them; split
apart, one decision would be spread over three files. The dense/Lanczos machinery itself lives in
:mod:`basins.analyses.eigen`, the Gram matrix in :mod:`basins.analyses.features`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from basins.analyses.eigen import (
    DENSE_MAX_PARAMS,
    deflated_slq,
    dense_fits,
    dense_hessian,
    dense_memory_bytes,
    dense_reason,
    hessian_operator,
    top_eigenpairs,
)
from basins.analyses.features import (
    FeatureGram,
    feature_gram,
    features_memory_bytes,
    outputs_per_example,
)
from basins.engine.memory import memory_budget
from basins.engine.problem import Problem, counted
from basins.errors import InputError
from basins.linalg.operator import Operator, as_operator
from basins.linalg.slq import DEFAULT_PROBES, DEFAULT_STEPS, SLQResult, student_t_quantile
from basins.progress import Progress, ProgressCallback
from basins.record import EIGEN_UNITS, Array, Record

__all__ = [
    "NULLITY_METHODS",
    "DEFAULT_RTOLS",
    "EXACT_MAX_PARAMS",
    "DEFAULT_DEFLATE",
    "RESIDUAL_FACTOR",
    "NullityCount",
    "NullityResult",
    "nullity",
    "nullity_exact",
    "nullity_features",
    "nullity_slq",
    "count_eigenvalues",
    "quadrature_mass",
    "exact_memory_bytes",
    "features_refusal",
]

NULLITY_METHODS = ("auto", "exact", "features", "slq")
#: The default threshold ladder, relative to λ_max.
DEFAULT_RTOLS = (1e-6, 1e-4, 1e-2)
#: ``auto`` takes the dense route up to this many parameters (the one rule: :data:`basins.analyses.eigen.DENSE_MAX_PARAMS`).
EXACT_MAX_PARAMS = DENSE_MAX_PARAMS
#: ``auto`` keeps a features count only where G is H: ``‖Hv − Gv‖/‖Hv‖`` at most this.
GN_EXACT_TOL = 1e-6
#: Top eigenpairs deflated before SLQ (they would otherwise take nodes from the bulk).
DEFAULT_DEFLATE = 20
#: A node is surely inside ``[−t, t]`` when ``|θ| + RESIDUAL_FACTOR·r ≤ t``: a unit Ritz
#: vector with residual r has at most ``1/RESIDUAL_FACTOR²`` of its spectral mass farther
#: than ``RESIDUAL_FACTOR·r`` from θ.
RESIDUAL_FACTOR = 3.0


@dataclass
class NullityCount:
    """One rung of the ladder: eigenvalues with ``|λ| ≤ threshold = rtol·λ_max + atol``.

    ``count`` is an integer for ``exact``/``features`` and a real-valued estimate for ``slq``;
    ``[count_lower, count_upper]`` is the interval (exact: rounding; slq: 95% by default).
    """

    rtol: float
    atol: float
    threshold: float
    count: float
    count_lower: float
    count_upper: float
    method: str


@dataclass
class NullityResult:
    """Counts of near-zero Hessian eigenvalues for a ladder of thresholds.

    Attributes:
        num_params: P.
        lambda_max: the largest eigenvalue of H (dense, or Lanczos for features/slq).
        method: ``exact``, ``features`` or ``slq``.
        counts: one :class:`NullityCount` per (rtol, atol).
        num_hvps: HVPs used.
        eigenvalues: exact: all P eigenvalues (ascending, float64); features: K's
            eigenvalues (descending); slq: None.
        eigenvalue_error: exact only: δ (see the module docstring).
        gn_residual: features only: ``max ‖Hv − Gv‖/‖Hv‖``.
        num_deflated: slq only: k.
        slq: slq only: the raw quadrature (nodes, weights, residuals).
        features: features only: the :class:`FeatureGram`.
        coverage: nominal coverage of the slq intervals.
        notes: remarks (why this method, resolution limits, H ≠ G, ...).
        seed: the seed used.
        method_asked: the method the caller asked for (``auto`` included).
        rtols, atol: the threshold ladder.
        hvp_route: the problem's HVP route (None for a bare operator).
        work: what ``problem.counters`` counted during the call (:func:`basins.engine.problem.counted`).
    """

    num_params: int
    lambda_max: float
    method: str
    counts: list[NullityCount]
    num_hvps: int
    eigenvalues: torch.Tensor | None = None
    eigenvalue_error: float | None = None
    gn_residual: float | None = None
    num_deflated: int = 0
    slq: SLQResult | None = None
    features: FeatureGram | None = None
    coverage: float | None = None
    notes: list[str] = field(default_factory=list)
    seed: int = 0
    method_asked: str = ""
    rtols: list[float] = field(default_factory=list)
    atol: float = 0.0
    hvp_route: str | None = None
    work: dict[str, int] = field(default_factory=dict)

    def record(self) -> Record:
        """The report group ``/nullity`` and the ``--json`` keys (README, "Architecture")."""
        slq_run = self.slq if self.method == "slq" else None
        attrs: dict[str, Any] = {
            "method": self.method, "method_asked": self.method_asked or self.method, "lambda_max": self.lambda_max,
            "rtols": list(self.rtols) or [c.rtol for c in self.counts], "atol": self.atol,
            "counts": [asdict(c) for c in self.counts], "notes": list(self.notes),
            "eigenvalue_error": self.eigenvalue_error, "gn_residual": self.gn_residual,
            "num_deflated": self.num_deflated if slq_run is not None else None,
            "num_probes": slq_run.num_probes if slq_run is not None else None,
            "num_steps": slq_run.num_steps if slq_run is not None else None,
            "coverage": self.coverage, "seed": self.seed,
            "num_hvps": self.num_hvps, "hvp_route": self.hvp_route,
            **self.work,
        }
        if self.features is not None:
            fg = self.features
            attrs.update({"num_outputs": fg.num_outputs, "gram_rank": fg.rank, "gram_cutoff": fg.cutoff,
                          "num_vjps": fg.num_vjps, "gn_residuals": list(fg.gn_residuals)})
        cs = self.counts
        arrays = {
            "rtol": Array([c.rtol for c in cs], "relative thresholds (× λ_max)", None),
            "threshold": Array([c.threshold for c in cs], "thresholds t = rtol·λ_max + atol", EIGEN_UNITS),
            "count": Array([float(c.count) for c in cs], "#{|λ| ≤ t} (slq: an estimate)", "eigenvalues"),
            "count_lower": Array([float(c.count_lower) for c in cs], "lower end of the count's interval", "eigenvalues"),
            "count_upper": Array([float(c.count_upper) for c in cs], "upper end of the count's interval", "eigenvalues"),
        }
        if self.method == "exact" and self.eigenvalues is not None:
            arrays["eigenvalues"] = Array(self.eigenvalues, "all Hessian eigenvalues, ascending (dense eigvalsh)",
                                          EIGEN_UNITS)
        if self.method == "features" and self.eigenvalues is not None:
            arrays["gram_eigenvalues"] = Array(self.eigenvalues, "feature Gram eigenvalues = nonzero spectrum of G, "
                                               "descending", EIGEN_UNITS)
        if self.slq is not None:
            nodes, weights, residuals = self.slq.padded()
            arrays["slq_nodes"] = Array(nodes, "SLQ nodes on the deflated Hessian, one row per probe, NaN-padded",
                                        EIGEN_UNITS, json_values=self.slq.nodes)
            arrays["slq_weights"] = Array(weights, "SLQ weights, rows sum to 1, 0-padded", None,
                                          json_values=self.slq.weights)
            arrays["slq_residuals"] = Array(residuals, "SLQ node residuals, NaN-padded", EIGEN_UNITS,
                                            json_values=self.slq.residuals)
        return Record(attrs, arrays)


def _check_probes(num_probes: object) -> None:
    if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < 2:
        raise InputError(f"num_probes must be ≥ 2 for a count with an interval, got {num_probes!r}",
                         param="num_probes")


def _thresholds(lambda_max: float, rtols: Sequence[float], atol: float) -> list[tuple[float, float]]:
    if not rtols:
        raise InputError("rtols must hold at least one threshold", param="rtols")
    for r in rtols:
        if not (r >= 0 and math.isfinite(r)):
            raise InputError(f"rtols must be non-negative numbers, got {r}", param="rtols")
    if not (atol >= 0 and math.isfinite(atol)):
        raise InputError(f"atol must be a non-negative number, got {atol}", param="atol")
    return [(float(r), float(r) * lambda_max + float(atol)) for r in rtols]


def count_eigenvalues(
    eigenvalues: torch.Tensor,
    lambda_max: float,
    rtols: Sequence[float] = DEFAULT_RTOLS,
    atol: float = 0.0,
    *,
    error: float = 0.0,
    method: str = "exact",
) -> list[NullityCount]:
    """Counts ``#{|λ| ≤ t}`` of known eigenvalues, with ``[#{|λ| ≤ t − error}, #{|λ| ≤ t + error}]``."""
    a = eigenvalues.abs()
    out = []
    for r, t in _thresholds(lambda_max, rtols, atol):
        out.append(NullityCount(
            r, float(atol), t, int((a <= t).sum()), int((a <= t - error).sum()), int((a <= t + error).sum()), method,
        ))
    return out


exact_memory_bytes = dense_memory_bytes
"""Peak bytes of the exact route (:func:`basins.analyses.eigen.dense_memory_bytes`)."""


def nullity_exact(
    operator: Operator | torch.Tensor,
    *,
    rtols: Sequence[float] = DEFAULT_RTOLS,
    atol: float = 0.0,
    block: int = 64,
    memory_bytes: int | None = None,
    seed: int = 0,
    callback: ProgressCallback | None = None,
) -> NullityResult:
    """Exact counts from the dense operator (P matvecs in blocks of ``block``, ``eigvalsh`` in float64).

    Args:
        operator: the symmetric operator (an :class:`~basins.linalg.operator.Operator`, e.g.
            :func:`basins.analyses.eigen.hessian_operator`, or a dense tensor); it receives
            float64 identity columns.
        rtols, atol: the threshold ladder.
        block: columns per matvec call.
        memory_bytes: budget (default a quarter of physical memory); needs ``24·P²``.
        seed: seeds the power iteration that sizes the asymmetry.
        callback: :class:`~basins.progress.Progress` after every block (phase ``hessian``),
            then once for ``eigh``.

    Returns:
        A :class:`NullityResult` with all P eigenvalues. Cost: P matvecs.

    Raises:
        InputError: the dense matrix would not fit the memory budget.
    """
    op = as_operator(operator)
    P = op.num_params
    need, budget = exact_memory_bytes(P), memory_budget(memory_bytes, op.device)
    if need > budget:
        raise InputError(
            f"method 'exact' needs the dense {P:,}×{P:,} Hessian: {need / 2**30:.1f} GiB, more than the "
            f"{budget / 2**30:.1f} GiB memory budget; use method 'features' (the Gauss–Newton view) or "
            "'slq' (an estimate)", param="method"
        )
    _thresholds(0.0, rtols, atol)
    H = dense_hessian(op, block=block, callback=callback, symmetrise=False)
    skew = _skew_norm(H, seed)
    H = (H + H.T) / 2
    if callback is not None:
        callback(Progress("eigh", 0, None, ""))
    eig = torch.linalg.eigvalsh(H).cpu()
    del H
    lam_max = float(eig[-1]) if float(eig[-1]) > 0 else float(eig.abs().max())
    delta = skew + 10 * math.sqrt(P) * torch.finfo(torch.float64).eps * abs(lam_max)
    return NullityResult(
        num_params=P, lambda_max=lam_max, method="exact",
        counts=count_eigenvalues(eig, lam_max, rtols, atol, error=delta, method="exact"),
        num_hvps=P, eigenvalues=eig, eigenvalue_error=delta, seed=seed,
    )


def _skew_norm(H: torch.Tensor, seed: int, iters: int = 30) -> float:
    """``‖(H − Hᵀ)/2‖₂`` by power iteration on ``SᵀS`` (no extra P×P matrix)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(H.shape[0], generator=gen, dtype=torch.float64).to(H.device)
    x /= x.norm()
    est = 0.0
    for _ in range(iters):
        y = (H @ x - H.T @ x) / 2
        z = -(H @ y - H.T @ y) / 2  # SᵀS x = −S(Sx)
        nz = float(z.norm())
        if nz == 0:
            return 0.0
        est = math.sqrt(nz)
        x = z / nz
    return est


def quadrature_mass(
    result: SLQResult, threshold: float, *, residual_factor: float = RESIDUAL_FACTOR
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per probe: the quadrature's mass of ``[−t, t]`` and a bracket ``(lo, hi)`` around the true mass.

    ``est = Σ_{|θⱼ| ≤ t} τⱼ²``; ``[lo, hi]`` intersects the Chebyshev–Markov–Stieltjes bounds
    with the residual bounds (module docstring). Returns three ``(num_probes,)`` float64 tensors.
    """
    t = float(threshold)
    est, lo, hi = [], [], []
    for theta, w, r in zip(result.nodes, result.weights, result.residuals):
        a = theta.abs()
        est.append(float(w[a <= t].sum()))
        lo_r = float(w[a + residual_factor * r <= t].sum())
        hi_r = float(w[a - residual_factor * r <= t].sum())
        W = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])  # W[i] = Σ_{j<i} w_j
        n = w.numel()
        kk = int((theta <= t).sum())  # nodes ≤ t
        kl = int((theta < -t).sum())  # nodes < −t
        f_lo, f_hi = float(W[max(kk - 1, 0)]), float(W[min(kk + 1, n)])  # F(t)
        g_lo, g_hi = float(W[max(kl - 1, 0)]), float(W[min(kl + 1, n)])  # F(−t − 0)
        lo.append(max(lo_r, f_lo - g_hi, 0.0))
        hi.append(min(hi_r, f_hi - g_lo, 1.0))
    return (torch.tensor(est, dtype=torch.float64), torch.tensor(lo, dtype=torch.float64),
            torch.tensor(hi, dtype=torch.float64))


def nullity_slq(
    operator: Operator | torch.Tensor,
    *,
    rtols: Sequence[float] = DEFAULT_RTOLS,
    atol: float = 0.0,
    deflate: int = DEFAULT_DEFLATE,
    num_probes: int = DEFAULT_PROBES,
    num_steps: int = DEFAULT_STEPS,
    coverage: float = 0.95,
    seed: int = 0,
    memory_bytes: int | None = None,
    callback: ProgressCallback | None = None,
) -> NullityResult:
    """Estimated counts by deflated stochastic Lanczos quadrature
    (:func:`basins.analyses.eigen.deflated_slq`), with intervals.

    Args:
        operator: the symmetric operator (:class:`~basins.linalg.operator.Operator` or a dense tensor).
        rtols, atol: the threshold ladder.
        deflate: top eigenpairs removed first (0: none; λ_max is then the largest node).
        num_probes: SLQ probes (≥ 2: the interval needs a spread).
        num_steps: Lanczos steps per probe.
        coverage: nominal coverage of each interval (Student t over probes).
        seed: seeds Lanczos (``seed``) and the probes (``seed + 1``).
        memory_bytes: budget of the stored Lanczos vectors (:func:`~basins.analyses.eigen.deflated_slq`).
        callback: :class:`~basins.progress.Progress` (phases ``lanczos``, ``slq``; HVPs).

    Returns:
        A :class:`NullityResult` (method ``slq``; counts are real-valued estimates).
        Cost: the Lanczos HVPs (≈ 100–300 for k = 20) + ``num_probes·num_steps``.
    """
    op = as_operator(operator)
    P = op.num_params
    _check_probes(num_probes)
    if not 0 < coverage < 1:
        raise InputError(f"coverage must be in (0, 1), got {coverage}", param="coverage")
    _thresholds(0.0, rtols, atol)
    run = deflated_slq(op, deflate=deflate, num_probes=num_probes,
                       num_steps=num_steps, seed=seed, probe_seed=seed + 1, memory_bytes=memory_bytes,
                       callback=callback)
    top, top_res, res, num_hvps = run.top, run.top_residuals, run.slq, run.num_matvecs
    lam_max = float(top[0]) if deflate else max(res.lambda_max, abs(res.lambda_min))
    tq = student_t_quantile(0.5 + coverage / 2, num_probes - 1)
    counts = []
    notes = [f"slq: an estimate from {num_probes} probes × {res.num_steps} Lanczos steps after deflating the top {deflate} "
             f"eigenpairs; intervals are {coverage:.0%} (probe spread and quadrature resolution)"]
    for r, t in _thresholds(lam_max, rtols, atol):
        ta = top.abs()
        top_in = int((ta <= t).sum())
        top_lo, top_hi = int((ta + top_res <= t).sum()), int((ta - top_res <= t).sum())
        est, lo, hi = quadrature_mass(res, t)
        margin = tq / math.sqrt(num_probes)
        count = top_in + res.dim * float(est.mean())
        lower = top_lo + res.dim * max(0.0, float(lo.mean()) - margin * float(lo.std()))
        upper = top_hi + res.dim * min(1.0, float(hi.mean()) + margin * float(hi.std()))
        counts.append(NullityCount(r, float(atol), t, count, min(lower, count), max(upper, count), "slq"))
        if float(hi.mean()) - float(lo.mean()) > 0.5 * max(float(est.mean()), 1.0 / res.dim):
            notes.append(
                f"rtol {r:g}: the quadrature cannot resolve eigenvalues near {t:.3g} (nodes there are not converged), "
                "so the interval is wide; use method exact or features where they fit"
            )
    return NullityResult(
        num_params=P, lambda_max=lam_max, method="slq", counts=counts, num_hvps=num_hvps, num_deflated=deflate,
        slq=res, coverage=coverage, notes=notes, seed=seed,
    )


# ---------------------------------------------------------------------- problem-level
def nullity_features(
    problem: Problem,
    *,
    rtols: Sequence[float] = DEFAULT_RTOLS,
    atol: float = 0.0,
    seed: int = 0,
    memory_bytes: int | None = None,
    callback: ProgressCallback | None = None,
) -> NullityResult:
    """Counts ``P − rank`` of the feature Gram matrix (flat directions of G), thresholds relative to λ_max(H).

    λ_max(H) comes from a short top-1 Lanczos run (tol 1e-6). Cost: that run (≈ 20–60 HVPs),
    ``n·k`` VJPs, 3 HVPs for the check ``‖Hv − Gv‖/‖Hv‖``, one eigendecomposition.
    """
    _thresholds(0.0, rtols, atol)
    P = int(problem.num_params)
    pairs = top_eigenpairs(hessian_operator(problem), 1, tol=1e-6, seed=seed, vectors=False, callback=callback)
    lam_max, num_hvps = abs(float(pairs.eigenvalues[0])), pairs.num_hvps

    fg = feature_gram(problem, seed=seed, memory_bytes=memory_bytes, callback=callback)
    counts = []
    for r, t in _thresholds(lam_max, rtols, atol):
        rank, certain, possible = fg.rank_at(t)
        counts.append(NullityCount(r, float(atol), t, P - rank, P - possible, P - certain, "features"))
    notes = [f"features: counts are P − rank of the feature Gram matrix, i.e. flat directions of the Gauss–Newton "
             f"part G (n·k = {fg.num_outputs:,} outputs, {fg.loss_name})"] + fg.notes
    gn = fg.gn_residual
    if gn is not None and gn > 1e-2:
        notes.append(f"H differs from G here (‖Hv − Gv‖/‖Hv‖ = {gn:.2g}): the counts are G's, not H's "
                     "(not a zero-residual optimum); use method exact or slq for H itself")
    elif fg.residual_scale is not None:
        below = [c.rtol for c in counts if c.threshold < fg.residual_scale]
        if below:
            notes.append(f"at rtol {', '.join(f'{r:g}' for r in below)} the threshold is below ‖(H − G)v‖/‖v‖ ≈ "
                         f"{fg.residual_scale:.2g}: H's count there may differ from G's")
    return NullityResult(
        num_params=P, lambda_max=lam_max, method="features", counts=counts, num_hvps=num_hvps + fg.num_hvps,
        eigenvalues=fg.eigenvalues, gn_residual=gn, features=fg, notes=notes, seed=seed,
    )


def features_refusal(problem: Problem, memory_bytes: int | None = None) -> str | None:
    """Why ``features`` would not give H's exact counts for ``problem`` (None: it may, when G = H).

    Features counts the flat directions of the Gauss–Newton part G, which is H only at a
    zero-residual optimum of a loss whose curvature in the outputs is its whole curvature: mse.
    It also needs the Gram matrix (or G) to fit ``memory_bytes``."""
    if problem.loss_name != "mse" or problem.pair_loss:
        return (f"the loss {problem.loss_name!r} has a residual part, so G ≠ H (features counts G's "
                "flat directions; ask for it with method 'features')")
    try:
        M = int(problem.num_examples) * outputs_per_example(problem)
        need = features_memory_bytes(M, int(problem.num_params))[1]
    except Exception as exc:  # noqa: BLE001 - any trouble sizing it: say so and fall through to slq
        return f"the outputs could not be sized ({type(exc).__name__})"
    budget = memory_budget(memory_bytes, problem.device)
    if need > budget:
        return f"the Gram matrix needs {need / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB budget"
    return None


@counted
def nullity(
    problem: Problem,
    *,
    method: str = "auto",
    rtols: Sequence[float] = DEFAULT_RTOLS,
    atol: float = 0.0,
    seed: int = 0,
    exact_max_params: int = EXACT_MAX_PARAMS,
    memory_bytes: int | None = None,
    num_probes: int = DEFAULT_PROBES,
    num_steps: int = DEFAULT_STEPS,
    deflate: int = DEFAULT_DEFLATE,
    callback: ProgressCallback | None = None,
) -> NullityResult:
    """Count near-zero Hessian eigenvalues of ``problem`` at θ* for a ladder of thresholds.

    Args:
        problem: a :class:`basins.Problem`.
        method: ``auto`` (exact when the dense Hessian is allowed by the one rule,
            :func:`basins.analyses.eigen.dense_fits`; else features where it is exact: an mse loss,
            the Gram matrix fits, and the measured ``‖Hv − Gv‖/‖Hv‖`` is at rounding level; else
            slq), ``exact``, ``features`` or ``slq``.
        rtols: relative thresholds (× λ_max); atol: absolute part.
        seed: seeds every random choice.
        exact_max_params: ``auto``'s limit for the dense route.
        memory_bytes: budget of the dense routes (default a quarter of physical memory).
        num_probes, num_steps, deflate: slq settings.
        callback: :class:`~basins.progress.Progress` (phases ``hessian``, ``eigh``, ``lanczos``,
            ``slq``, ``jacobian``, ...).

    Returns:
        A :class:`NullityResult`; ``notes`` say why ``auto`` chose its method.

    Raises:
        InputError: a bad option, or a dense method asked for that does not fit in memory.
    """
    method_asked = method
    if method not in NULLITY_METHODS:
        raise InputError(f"unknown method={method!r}: use one of {', '.join(NULLITY_METHODS)}", param="method")
    _thresholds(0.0, rtols, atol)
    _check_probes(num_probes)  # before any work, whichever method auto picks
    P = int(problem.num_params)
    budget = memory_budget(memory_bytes, problem.device)
    why = ""
    res: NullityResult | None = None

    def run_slq() -> NullityResult:
        return nullity_slq(hessian_operator(problem), rtols=rtols, atol=atol, deflate=min(deflate, P - 1),
                           num_probes=num_probes, num_steps=num_steps, seed=seed, memory_bytes=memory_bytes,
                           callback=callback)

    if method == "auto":
        dense = dense_reason(P, max_params=exact_max_params, memory_bytes=budget)
        if dense_fits(P, max_params=exact_max_params, memory_bytes=budget):
            method, why = "exact", f"auto: exact because {dense}"
        else:
            refusal = features_refusal(problem, budget)
            if refusal is None:
                res = nullity_features(problem, rtols=rtols, atol=atol, seed=seed, memory_bytes=budget,
                                       callback=callback)
                tol = max(GN_EXACT_TOL, 1e3 * torch.finfo(problem.dtype).eps)
                if res.gn_residual is not None and res.gn_residual <= tol:
                    method, why = "features", (f"auto: features because {dense}, and H = G here "
                                               f"(‖Hv − Gv‖/‖Hv‖ = {res.gn_residual:.2g})")
                else:
                    gn = "unmeasured" if res.gn_residual is None else f"{res.gn_residual:.2g}"
                    method, why = "slq", (f"auto: slq because {dense}, and features would count G's flat "
                                          f"directions, not H's (‖Hv − Gv‖/‖Hv‖ = {gn})")
                    res = None
            else:
                method, why = "slq", f"auto: slq because {dense}, and features is not exact here: {refusal}"
    if res is None and method == "exact":
        res = nullity_exact(hessian_operator(problem), rtols=rtols, atol=atol, memory_bytes=budget, seed=seed,
                            callback=callback)
    elif res is None and method == "features":
        res = nullity_features(problem, rtols=rtols, atol=atol, seed=seed, memory_bytes=budget, callback=callback)
    elif res is None:
        res = run_slq()
    if why:
        res.notes.insert(0, why)
    res.method_asked, res.rtols, res.atol = method_asked, [float(r) for r in rtols], float(atol)
    res.hvp_route = getattr(problem, "hvp_route", None)
    return res

