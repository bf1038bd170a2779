"""Statistics of MCMC traces: split R-hat, effective sample size, batch-means standard error
with between-chain spread, a first-vs-last trend test, and Student-t quantiles.

All take ``(C, D)`` traces (C chains, D draws) and work in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["split_rhat", "ess", "MeanEstimate", "chain_mean", "trend_z", "t_quantile", "NUM_BATCHES"]

#: batches per chain for the batch-means standard error
NUM_BATCHES = 10


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


def _autocov(x: torch.Tensor) -> torch.Tensor:
    """Per-chain autocovariance ``(C, D)`` (biased, lag 0 = variance with 1/D) by FFT."""
    D = x.shape[1]
    z = x - x.mean(dim=1, keepdim=True)
    f = torch.fft.rfft(z, n=2 * D)
    return torch.fft.irfft(f * f.conj(), n=2 * D)[:, :D] / D


def ess(x: torch.Tensor) -> float:
    """Effective sample size of the mean of ``(C, D)`` traces: the multi-chain estimator of
    Vehtari et al. (2021, eq. 10–11) with Geyer's initial monotone positive sequence. NaN when D < 4."""
    x = x.to(torch.float64)
    C, D = x.shape
    if D < 4:
        return math.nan
    acov = _autocov(x)
    w = acov[:, 0].mean() * D / (D - 1)
    var_plus = w * (D - 1) / D + (x.mean(dim=1).var() if C > 1 else 0.0)
    if float(var_plus) <= 0:
        return float(C * D)
    rho = 1 - (w - acov.mean(dim=0)) / var_plus
    rho[0] = 1.0
    total, prev = 0.0, math.inf
    for k in range(0, D - 1, 2):
        p = float(rho[k] + rho[k + 1])
        if p <= 0:
            break
        p = min(p, prev)
        total += p
        prev = p
    tau = max(-1 + 2 * total, 1.0 / math.log10(max(C * D, 10)))
    return float(C * D / tau)


@dataclass
class MeanEstimate:
    """The grand mean of ``(C, D)`` traces with its standard error and t degrees of freedom.

    ``stderr² = max(pooled, within, spectral, between)/C``, each an estimate of a chain mean's
    variance: ``pooled`` from the batch means of all chains (``NUM_BATCHES`` per chain),
    ``within`` from each chain's own effective sample size (var/ESS; both guard against the other's
    failure when batches are shorter than the autocorrelation time), ``spectral`` from the
    multi-chain ESS (Stan's MCSE² = var⁺/ESS, :func:`ess`), ``between`` the sample variance of the
    C chain means. Degrees of freedom: ``C·K − 1``, or ``C − 1`` when the chain means spread more
    than ``pooled``/``within`` allow (the chains disagree) and the spread decides.
    So chains that disagree more than their own noise allows widen the interval with the few
    degrees of freedom of C chains, and chains that agree get the batch means' many."""

    mean: float
    stderr: float
    dof: int
    pooled: float
    between: float
    spectral: float = math.nan

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        if not math.isfinite(self.stderr):
            return (math.nan, math.nan)
        q = t_quantile(0.5 + level / 2, self.dof)
        return (self.mean - q * self.stderr, self.mean + q * self.stderr)


def chain_mean(x: torch.Tensor, num_batches: int = NUM_BATCHES) -> MeanEstimate:
    """:class:`MeanEstimate` of ``(C, D)`` traces (D ≥ 2 per batch; fewer draws: fewer batches)."""
    x = x.to(torch.float64)
    C, D = x.shape
    K = max(1, min(num_batches, D // 2))
    L = D // K
    means = x.mean(dim=1)
    est = float(means.mean())
    bm = x[:, D - K * L :].reshape(C, K, L).mean(dim=2)  # drop the first D mod K draws
    pooled = float(bm.var(dim=1).sum() / C / K) if K > 1 else math.nan  # Var(chain mean) from batch means
    between = float(means.var()) if C > 1 else math.nan
    per = [ess(x[c : c + 1]) for c in range(C)]  # within each chain: Var(chain mean) = var/ESS
    within = (sum(float(x[c].var()) / e for c, e in enumerate(per)) / C
              if all(math.isfinite(e) and e > 0 for e in per) else math.nan)
    n_eff = ess(x)  # Stan's MCSE² = var⁺/ESS, as a chain mean's variance: C·var⁺/ESS
    var_plus = float(x.var(dim=1).mean() + (means.var() if C > 1 else 0.0))
    spectral = C * var_plus / n_eff if math.isfinite(n_eff) and n_eff > 0 else math.nan
    inside = max((v for v in (pooled, within) if math.isfinite(v)), default=math.nan)
    disagree = C > 1 and math.isfinite(between) and not between <= inside
    many = C * K - 1 if K > 1 else 0
    cands = [(pooled, many), (within, many), (spectral, C - 1 if disagree else many), (between, C - 1)]
    ok = [(v, d) for v, d in cands if math.isfinite(v) and d >= 1]
    if not ok:
        return MeanEstimate(est, math.nan, 0, pooled, between, spectral)
    v, d = max(ok)
    return MeanEstimate(est, math.sqrt(max(v, 0.0) / C), int(d), pooled, between, spectral)


def trend_z(x: torch.Tensor, first: float = 0.2, last: float = 0.5) -> float:
    """Geweke-type trend statistic of ``(C, D)`` traces: per chain, the mean of the first
    ``first`` of the draws minus that of the last ``last``, over its standard error (each part's
    variance from its batch means, 5 batches); the C chains' z combined as ``Σz/√C``. About
    N(0, 1) for stationary chains; large |z| means the chains are still drifting. NaN when D < 20."""
    x = x.to(torch.float64)
    C, D = x.shape
    if D < 20:
        return math.nan
    a, b = x[:, : int(first * D)], x[:, D - int(last * D) :]

    def mean_var(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K = 5
        L = s.shape[1] // K
        bm = s[:, : K * L].reshape(C, K, L).mean(dim=2)
        return s.mean(dim=1), bm.var(dim=1) / K

    ma, va = mean_var(a)
    mb, vb = mean_var(b)
    v = (va + vb).clamp_min(1e-300)
    z = (ma - mb) / v.sqrt()
    return float(z.sum() / math.sqrt(C))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1 - x) / b


def _t_cdf(t: float, dof: float) -> float:
    tail = 0.5 * _betainc(dof / 2, 0.5, dof / (dof + t * t))
    return 1 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (bisection on the CDF,
    to 1e-12); the normal quantile for ``dof = inf``."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if math.isinf(dof):
        return math.sqrt(2) * float(torch.special.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)))
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)
