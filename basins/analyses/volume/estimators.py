"""Basin volume from ray radii, with an honest uncertainty; Gaussian prior mass; quadratic baseline.

For a star-shaped basin around θ* with boundary radius ``r(u)`` along the unit direction ``u``,
uniform on the unit sphere of a d-dimensional (sub)space,

.. math:: V = V_{ball}(d)\\,\\mathbb{E}_u[r(u)^d],\\qquad
          \\log \\hat V = \\log V_{ball}(d) + \\operatorname{logmeanexp}_i(d \\log r_i),

and its mass under a Gaussian prior ``N(0, σ² I)`` (Scherlis & Belrose 2024) is
``E_u[m(u)]`` with the exact one-dimensional radial integral ``m(u)`` (:func:`log_ray_prior_mass`).

Known limitation: in high dimension ``exp(d log rᵢ)`` is dominated by a few rays, so the sample
mean is a *stochastic lower bound* (``E[log mean] ≤ log E``, Jensen). :func:`estimate_log_mean`
reports the effective sample size ``ESS = exp(2·LSE(w) − LSE(2w))`` of the weights, the largest
weight's share, and a pair bootstrap CI only when ``ESS ≥ min_ess``; otherwise
``is_lower_bound = True``, no CI, and the Jensen bound ``mean(w) ± sd(w)/√N`` beside it.

All logarithms are natural (nats). Antithetic pairs ``(2j, 2j+1)`` are one sampling unit: the
ESS, the standard error and the bootstrap are over pairs (for a symmetric basin the two rays of
a pair are the same sample, so counting rays would overstate the certainty twofold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from basins.errors import InputError

__all__ = [
    "wall_exponent",
    "floor_ratio",
    "volume_slopes",
    "DEFAULT_QUANTILES",
    "VolumeEstimate",
    "QuadraticBaseline",
    "log_ball_volume",
    "logmeanexp",
    "estimate_log_mean",
    "log_ray_prior_mass",
    "quadratic_log_volume",
    "quantile_summary",
]

#: Quantile levels reported for radii, exponents, anharmonicity, asymmetry.
DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def log_ball_volume(dim: int) -> float:
    """``log V_ball(d) = (d/2) log π − log Γ(d/2 + 1)``, the unit d-ball's volume (``d = 0`` → 0)."""
    if dim < 0:
        raise InputError(f"dim must be ≥ 0, got {dim}", param="dim")
    return 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim + 1.0)


def _lse(w: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(w, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(w - m), axis=axis))


def logmeanexp(w: np.ndarray | Sequence[float]) -> float:
    """``log((1/N) Σ exp(wᵢ))`` computed stably (``-inf`` if every weight is ``-inf``)."""
    a = np.asarray(w, dtype=np.float64).reshape(-1)
    return float(_lse(a) - math.log(a.size))


@dataclass
class VolumeEstimate:
    """``log(prefactor · mean exp(wᵢ))`` with its uncertainty (all in nats).

    Attributes:
        log_value: the estimate. When ``is_lower_bound``, read it as a lower bound: in
            expectation it underestimates (Jensen), and censored rays only add to that.
        se: delta-method standard error of ``log_value`` over pairs (sampling only); None below
            ``min_ess``, where the estimate is only a lower bound.
        ess: effective sample size of the pair weights, ``exp(2·LSE(w) − LSE(2w))``.
        max_weight_share: the largest pair weight's share of the sum.
        is_lower_bound: ``ess < min_ess`` or some ray was censored.
        ci_lower, ci_upper: bootstrap percentile interval over pairs, widened on both sides
            by ``radius_error``; None when ``is_lower_bound``.
        level: the CI's coverage (0.95).
        jensen_bound: ``log prefactor + mean(wᵢ)`` ≤ the true value in expectation.
        jensen_se: its standard error ``sd(w)/√N`` (pairs).
        radius_error: first-order bound of the effect of the radii's tolerance, ``Σ w̃ᵢ·d·|δᵢ|``.
        num_units: pairs (or rays, when unpaired).
        num_censored: rays censored at the maximum radius.
    """

    log_value: float
    se: float | None
    ess: float
    max_weight_share: float
    is_lower_bound: bool
    ci_lower: float | None
    ci_upper: float | None
    level: float
    jensen_bound: float
    jensen_se: float | None
    radius_error: float
    num_units: int
    num_censored: int


def estimate_log_mean(
    log_weights: np.ndarray,
    *,
    log_prefactor: float = 0.0,
    paired: bool = True,
    log_errors: np.ndarray | None = None,
    num_censored: int = 0,
    min_ess: float = 30.0,
    num_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> VolumeEstimate:
    """Estimate ``log(prefactor · E[exp(w)])`` from samples ``wᵢ`` with an honest uncertainty.

    Args:
        log_weights: ``(N,)`` float64 log weights, e.g. ``d·log rᵢ``; with ``paired``, rays
            ``2j`` and ``2j+1`` are an antithetic pair (N even).
        log_prefactor: added to every log result, e.g. ``log V_ball(d)``.
        paired: treat consecutive rays as pairs (the sampling unit).
        log_errors: ``(N,)`` bound on each ``|Δwᵢ|`` from the radius tolerance (``d·δᵢ``);
            its weighted mean is added to the CI on both sides.
        num_censored: rays whose weight is only a lower bound (censored radius).
        min_ess: the ESS below which no CI is given and the result is a lower bound.
        num_bootstrap: bootstrap replicates (pairs resampled together).
        level: coverage of the CI.
        seed: the bootstrap's seed (numpy ``default_rng``).

    Returns:
        :class:`VolumeEstimate`. Cost: ``num_bootstrap × N`` flops; no loss evaluations.
    """
    w = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise InputError("no samples to estimate from")
    if np.isnan(w).any():
        raise InputError("log weights contain NaN")
    if paired and w.size % 2:
        raise InputError(f"paired samples need an even count, got {w.size}")
    units = (np.logaddexp(w[0::2], w[1::2]) - math.log(2.0)) if paired else w
    raw = (0.5 * (w[0::2] + w[1::2])) if paired else w
    M = units.size
    lse = float(_lse(units))
    log_value = log_prefactor + lse - math.log(M)
    if math.isfinite(lse):
        ess = float(math.exp(2.0 * lse - float(_lse(2.0 * units))))
        share = float(math.exp(float(np.max(units)) - lse))
        e = np.exp(units - np.max(units))
        se = float(np.std(e, ddof=1) / (math.sqrt(M) * np.mean(e))) if M > 1 else None
        norm = np.exp(w - float(_lse(w)))
        radius_error = float(np.sum(norm * np.abs(log_errors))) if log_errors is not None else 0.0
    else:
        ess, share, se, radius_error = 0.0, 1.0, None, 0.0
    finite = raw[np.isfinite(raw)]
    jensen = log_prefactor + float(np.mean(raw)) if finite.size == raw.size else -math.inf
    jensen_se = float(np.std(raw, ddof=1) / math.sqrt(M)) if M > 1 and finite.size == raw.size else None
    is_lower = ess < min_ess or num_censored > 0
    if ess < min_ess:  # a few rays carry the mean: the delta method's s.e. (→ 1 as ESS → 1) means nothing
        se = None
    ci_lo = ci_hi = None
    if not is_lower:
        rng = np.random.default_rng(seed)
        reps = np.empty(num_bootstrap)
        step = max(1, int(4_000_000 // max(M, 1)))
        for s in range(0, num_bootstrap, step):
            b = min(step, num_bootstrap - s)
            idx = rng.integers(0, M, size=(b, M))
            reps[s : s + b] = _lse(units[idx], axis=1) - math.log(M)
        alpha = 0.5 * (1.0 - level)
        ci_lo = log_prefactor + float(np.quantile(reps, alpha)) - radius_error
        ci_hi = log_prefactor + float(np.quantile(reps, 1.0 - alpha)) + radius_error
    return VolumeEstimate(
        log_value=log_value, se=se, ess=ess, max_weight_share=share, is_lower_bound=bool(is_lower),
        ci_lower=ci_lo, ci_upper=ci_hi, level=level, jensen_bound=jensen, jensen_se=jensen_se,
        radius_error=radius_error, num_units=M, num_censored=int(num_censored),
    )


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(256)


def _bisect(fun, lo: np.ndarray, hi: np.ndarray, iters: int = 60) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Vectorised bisection for ``fun(y) = 0`` with ``fun(lo) < 0 ≤ fun(hi)`` (lo may exceed hi)."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        neg = fun(mid) < 0
        lo = np.where(neg, mid, lo)
        hi = np.where(neg, hi, mid)
    return 0.5 * (lo + hi)


def log_ray_prior_mass(
    radii: np.ndarray, dots: np.ndarray, theta_sq_norm: float, sigma: float, dim: int, *, drop: float = 60.0
) -> np.ndarray:
    """Per-ray Gaussian prior mass of the star-shaped basin, ``log m(u)`` (its mean over u is the mass).

    With prior density ``p = N(0, σ² I_d)`` and the basin ``{θ* + s u : 0 ≤ s < r(u)}``,

    .. math:: m(u) = d\\,V_{ball}(d) \\int_0^{r(u)} p(θ^* + s u)\\, s^{d-1} ds
              = \\frac{2\\, e^{-‖θ^*‖^2/2σ^2}}{Γ(d/2)\\,2^{d/2}} \\int_0^{r/σ} x^{d-1}
                e^{-x^2/2 - (u·θ^*/σ)\\,x} dx,

    evaluated in log space by 256-point Gauss–Legendre quadrature in ``y = log x`` over the
    range where the integrand is within ``e^{-drop}`` of its maximum (the integrand is unimodal
    in ``y``). With θ* = 0 this is the χ²_d CDF at ``r²/σ²``.

    Args:
        radii: ``(N,)`` radii ``r(u)`` (parameter units).
        dots: ``(N,)`` ``u·θ*``.
        theta_sq_norm: ``‖θ*‖²``.
        sigma: prior standard deviation per parameter.
        dim: ``d`` (the dimension of the space the rays fill, P for isotropic rays).
        drop: nats below the maximum at which the integrand is cut.

    Returns:
        ``(N,)`` float64 ``log m(u)`` (``-inf`` for a zero radius).
    """
    if not sigma > 0:
        raise InputError(f"sigma (the prior's standard deviation) must be positive, got {sigma}", param="sigma")
    r = np.asarray(radii, dtype=np.float64).reshape(-1)
    beta = np.asarray(dots, dtype=np.float64).reshape(-1) / sigma
    d = float(dim)
    out = np.full(r.shape, -np.inf)
    ok = r > 0
    if not ok.any():
        return out
    r, beta = r[ok], beta[ok]
    Y = np.log(r / sigma)
    xs = 0.5 * (-beta + np.sqrt(beta * beta + 4.0 * d))
    ystar = np.log(xs)

    def g(y: np.ndarray, b: np.ndarray = beta) -> np.ndarray:
        ey = np.exp(y)
        return d * y - 0.5 * ey * ey - b * ey

    yp = np.minimum(Y, ystar)
    gp = g(yp)
    width = 1.0 / np.sqrt(xs * xs + d)
    span = drop / d + 12.0 * width
    for _ in range(64):  # widen until the left end is `drop` nats below the peak
        short = g(yp - span) > gp - drop
        if not short.any():
            break
        span = np.where(short, 2.0 * span, span)
    ylo = _bisect(lambda y: gp - drop - g(y), yp, yp - span)
    yhi = Y.copy()
    right = (Y > ystar) & (g(Y) < gp - drop)
    if right.any():
        yhi[right] = _bisect(lambda y: g(y, beta[right]) - (gp[right] - drop), Y[right], ystar[right])
    half = 0.5 * (yhi - ylo)
    nodes = 0.5 * (yhi + ylo)[:, None] + half[:, None] * _GL_NODES[None, :]
    log_int = _lse(g(nodes, beta[:, None]) + np.log(_GL_WEIGHTS)[None, :], axis=1) + np.log(half)
    const = math.log(2.0) - math.lgamma(0.5 * d) - 0.5 * d * math.log(2.0) - theta_sq_norm / (2.0 * sigma**2)
    out[ok] = const + log_int  # one ray's m(u) may exceed 1 off-centre; their mean over u cannot
    return out


@dataclass
class QuadraticBaseline:
    """The basin of the quadratic model ``½ δᵀHδ`` at each ε: an ellipsoid over the eigenvalues above the null threshold.

    Attributes:
        epsilons: the ε ladder (loss units).
        log_volume: per ε, ``log V_ball(dimension) + Σ_{λ>thr} ½ log(2ε/λ)`` (nats, in the
            ``dimension``-dimensional space of those eigenvectors; never a P-dim ball).
        dimension: number of eigenvalues above the threshold.
        num_null: ``N₀ = #{|λ| ≤ thr}`` (None when only the top of the spectrum is known).
        num_negative: ``#{λ < −thr}`` (None when unknown).
        threshold: ``null_rtol · λ_max``.
        null_rtol: the relative threshold.
        method: ``exact`` (dense spectrum) or ``lanczos`` (top-k only).
        complete: whether the whole spectrum was known.
        note: what is missing, in words.
    """

    epsilons: list[float]
    log_volume: list[float]
    dimension: int
    num_null: int | None
    num_negative: int | None
    threshold: float
    null_rtol: float
    method: str
    complete: bool
    note: str


def quadratic_log_volume(
    eigenvalues: np.ndarray | Sequence[float],
    epsilons: Sequence[float],
    num_params: int,
    *,
    null_rtol: float = 1e-6,
    complete: bool = True,
    method: str = "exact",
) -> QuadraticBaseline:
    """Volume of the quadratic basin ``{δ : ½ δᵀHδ < ε}`` restricted to the non-null eigendirections.

    Args:
        eigenvalues: the Hessian spectrum (all P values when ``complete``, else the top k).
        epsilons: ε values (loss units).
        num_params: ``P``.
        null_rtol: eigenvalues with ``|λ| ≤ null_rtol·λ_max`` count as null (N₀).
        complete: whether ``eigenvalues`` is the whole spectrum.
        method: recorded as is.

    Returns:
        :class:`QuadraticBaseline`. With the whole spectrum, the (P − N₀ − N₋)-dimensional
        ellipsoid; with the top k only, the k-dimensional section through the top eigenvectors
        (comparable with the ``top`` ray family), and ``note`` says so.
    """
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).reshape(-1))[::-1]
    if lam.size == 0 or not np.isfinite(lam).all():
        raise InputError("the quadratic baseline needs finite eigenvalues")
    lmax = float(np.max(np.abs(lam)))
    thr = null_rtol * lmax
    pos = lam[lam > thr]
    dim = int(pos.size)
    logs = [log_ball_volume(dim) + 0.5 * float(np.sum(np.log(2.0 * e / pos))) for e in epsilons]
    n0: int | None
    nneg: int | None
    if complete:
        n0, nneg = int(np.sum(np.abs(lam) <= thr)), int(np.sum(lam < -thr))
        note = (f"exact spectrum: {dim}-dimensional ellipsoid over the eigenvalues > {thr:.3g}; "
                f"{n0} null and {nneg} negative eigenvalues left out")
    else:
        n0 = nneg = None
        note = (f"only the top {lam.size} of {num_params} eigenvalues are known: this is the {dim}-dimensional "
                "section through the top eigenvectors (compare the 'top' ray family), not the whole basin; "
                "the full ellipsoid needs the whole spectrum")
    return QuadraticBaseline(
        epsilons=[float(e) for e in epsilons], log_volume=logs, dimension=dim, num_null=n0, num_negative=nneg,
        threshold=thr, null_rtol=null_rtol, method=method, complete=complete, note=note,
    )


def quantile_summary(values: np.ndarray, levels: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, float | int | None]:
    """``{"min", "q05", ..., "max", "count"}`` of the finite values (None when there are none)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    out: dict[str, float | int | None] = {"count": int(v.size)}
    out["min"] = float(v.min()) if v.size else None
    for q in levels:
        out[f"q{round(100 * q):02d}"] = float(np.quantile(v, q)) if v.size else None
    out["max"] = float(v.max()) if v.size else None
    return out


# ---------------------------------------------------------------------- wall statistics and slopes
def wall_exponent(t: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """Per ray the local exponent ``dlog C/dlog t`` at ``t = 1`` from the grid's neighbours of 1
    (2: a quadratic wall; > 2 degenerate; → 0 a plateau); NaN where ``C ≤ 0`` there or 1 is not
    inside the grid. ``t``: ``(T,)``; ``profile``: ``(N, T)`` values of ``C``. Returns ``(N,)``."""
    below, above = np.nonzero(t < 1.0)[0], np.nonzero(t > 1.0)[0]
    if not below.size or not above.size:
        return np.full(profile.shape[0], np.nan)
    a, b = below[np.argmax(t[below])], above[np.argmin(t[above])]
    ca, cb = profile[:, a], profile[:, b]
    ok = (ca > 0) & (cb > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (np.log(np.where(ok, cb, 1.0)) - np.log(np.where(ok, ca, 1.0))) / (math.log(t[b]) - math.log(t[a]))
    return np.where(ok, p, np.nan)


def floor_ratio(t: np.ndarray, profile: np.ndarray, level: float) -> np.ndarray:
    """Per ray ``r_floor / r``: going inwards from ``t = 1``, where ``C`` first falls to ``level``
    (log-log interpolation between grid points; linear where ``C ≤ 0``); NaN when it never does
    above ``t.min()``. Shapes as :func:`wall_exponent`."""
    inner = np.nonzero(t <= 1.0)[0]
    inner = inner[np.argsort(-t[inner])]  # descending t, starting at 1
    tt, cc = t[inner], profile[:, inner]
    hit = cc <= level
    hit[:, 0] = False
    first = np.argmax(hit, axis=1)
    has = hit.any(axis=1)
    out = np.full(profile.shape[0], np.nan)
    k = np.nonzero(has)[0]
    if k.size:
        j = first[k]
        t1, t0 = tt[j - 1], tt[j]
        c1, c0 = cc[k, j - 1], cc[k, j]
        with np.errstate(divide="ignore", invalid="ignore"):
            loglog = np.exp(np.log(t0) + (math.log(level) - np.log(c0)) * (np.log(t1) - np.log(t0)) / (np.log(c1) - np.log(c0)))
            lin = t0 + (level - c0) * (t1 - t0) / (c1 - c0)
        out[k] = np.where(c0 > 0, loglog, lin)
    return out


def volume_slopes(values: Sequence[float | None], ok: Sequence[bool], epsilons: Sequence[float]) -> list[float | None]:
    """Slopes ``d log V / d log ε`` between neighbouring rungs of the ε ladder.

    ``(values[j+1] − values[j]) / log(ε[j+1]/ε[j])`` where both rungs are usable (``ok`` and
    not None), else None; ``len(epsilons) − 1`` entries. For a quadratic basin in ``d``
    dimensions ``log V = (d/2) log ε + const``, so the slope estimates ``d/2`` (the basin's
    effective dimension over 2; README, "Architecture", and the paper's volume section).
    """
    E = len(epsilons)
    return [(values[j + 1] - values[j]) / math.log(epsilons[j + 1] / epsilons[j])  # type: ignore[operator]
            if ok[j] and ok[j + 1] and values[j] is not None and values[j + 1] is not None else None
            for j in range(E - 1)]
