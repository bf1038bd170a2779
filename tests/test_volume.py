"""Estimators of basins.analyses.volume.estimators against closed forms: ball volumes, χ² prior mass, ellipsoids."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from basins.analyses.volume.estimators import (
    estimate_log_mean,
    log_ball_volume,
    log_ray_prior_mass,
    logmeanexp,
    quadratic_log_volume,
    quantile_summary,
)
from basins.errors import InputError


@pytest.mark.parametrize("d, expected", [(0, 0.0), (1, math.log(2.0)), (2, math.log(math.pi)),
                                         (3, math.log(4 * math.pi / 3)), (4, math.log(math.pi**2 / 2))])
def test_log_ball_volume(d: int, expected: float) -> None:
    assert log_ball_volume(d) == pytest.approx(expected, abs=1e-12)


def test_logmeanexp_is_stable() -> None:
    assert logmeanexp([1000.0, 1000.0]) == pytest.approx(1000.0)
    assert logmeanexp([-1e4, -1e4 + math.log(3.0)]) == pytest.approx(-1e4 + math.log(2.0))
    assert logmeanexp([-math.inf, -math.inf]) == -math.inf


def test_equal_weights_give_full_ess_counted_in_pairs() -> None:
    w = np.full(200, 3.0)
    v = estimate_log_mean(w, log_prefactor=1.0, seed=0)
    assert v.log_value == pytest.approx(4.0)
    assert v.ess == pytest.approx(100.0)  # 200 rays = 100 antithetic pairs
    assert v.max_weight_share == pytest.approx(0.01)
    assert not v.is_lower_bound
    assert v.ci_lower == pytest.approx(4.0) and v.ci_upper == pytest.approx(4.0)
    assert v.jensen_bound == pytest.approx(4.0)
    unpaired = estimate_log_mean(w, paired=False)
    assert unpaired.ess == pytest.approx(200.0)


def test_dominated_weights_are_a_lower_bound_without_ci() -> None:
    rng = np.random.default_rng(0)
    w = 500.0 * rng.standard_normal(400)  # exp(w) dominated by one sample
    v = estimate_log_mean(w, seed=1)
    assert v.ess < 30 and v.is_lower_bound
    assert v.ci_lower is None and v.ci_upper is None
    assert v.jensen_bound <= v.log_value
    assert v.max_weight_share > 0.5


def test_censored_rays_make_a_lower_bound() -> None:
    v = estimate_log_mean(np.zeros(100), num_censored=1)
    assert v.is_lower_bound and v.ci_lower is None and v.num_censored == 1


def test_radius_error_widens_the_ci() -> None:
    rng = np.random.default_rng(1)
    w = 0.1 * rng.standard_normal(400)
    a = estimate_log_mean(w, seed=3)
    b = estimate_log_mean(w, seed=3, log_errors=np.full(400, 0.05))
    assert b.radius_error == pytest.approx(0.05)
    assert b.ci_lower == pytest.approx(a.ci_lower - 0.05) and b.ci_upper == pytest.approx(a.ci_upper + 0.05)


def test_bad_weights_are_rejected() -> None:
    with pytest.raises(InputError, match="even count"):
        estimate_log_mean(np.zeros(3))
    with pytest.raises(InputError, match="NaN"):
        estimate_log_mean(np.array([0.0, np.nan]))
    with pytest.raises(InputError, match="no samples"):
        estimate_log_mean(np.zeros(0))


@pytest.mark.parametrize("d", [1, 2, 5, 100, 10_000])
def test_prior_mass_at_zero_is_the_chi2_cdf(d: int) -> None:
    sigma = 0.7
    q = np.array([1e-6, 0.01, 0.3, 0.9, 0.999999]) if d < 100 else np.array([1e-12, 1e-3, 0.5, 0.99])
    radii = sigma * np.sqrt(stats.chi2.ppf(q, d))  # r²/σ² at the chosen quantiles
    got = log_ray_prior_mass(radii, np.zeros_like(radii), 0.0, sigma, d)
    np.testing.assert_allclose(got, np.log(q), rtol=1e-8, atol=1e-9)


def test_prior_mass_far_in_the_tail() -> None:
    d, sigma, r = 4000, 1.0, 1e-3  # mass ~ 1e-13000: only its log is representable
    got = log_ray_prior_mass(np.array([r]), np.zeros(1), 0.0, sigma, d)[0]
    a, x = d / 2, r**2 / 2  # series of the lower incomplete gamma: P(a, x) ≈ xᵃe⁻ˣ/Γ(a+1)·(1 + x/(a+1))
    expected = a * math.log(x) - x - math.lgamma(a + 1) + math.log1p(x / (a + 1))
    assert got == pytest.approx(expected, rel=1e-10)


def test_prior_mass_off_centre_matches_quadrature() -> None:
    d, sigma = 3, 0.8
    theta = np.array([0.3, -0.2, 0.5])
    rng = np.random.default_rng(0)
    u = rng.standard_normal((6, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    radii = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 0.05])
    got = log_ray_prior_mass(radii, u @ theta, float(theta @ theta), sigma, d)
    area = 2 * math.pi ** (d / 2) / math.gamma(d / 2)  # surface of the unit sphere = d·V_ball(d)
    for i in range(6):
        def density(s: float, i: int = i) -> float:
            x = theta + s * u[i]
            return float(np.exp(-x @ x / (2 * sigma**2)) / (2 * math.pi * sigma**2) ** (d / 2) * s ** (d - 1))

        exact = area * integrate.quad(density, 0.0, radii[i], epsabs=0, epsrel=1e-12)[0]
        assert got[i] == pytest.approx(math.log(exact), abs=1e-9)


def test_prior_mass_needs_positive_sigma() -> None:
    with pytest.raises(InputError, match="sigma"):
        log_ray_prior_mass(np.ones(1), np.zeros(1), 0.0, 0.0, 3)


def test_quadratic_baseline_exact_spectrum() -> None:
    lam = np.array([4.0, 2.0, 1.0, 1e-12, 0.0, -0.5])
    q = quadratic_log_volume(lam, [1e-2, 1e-1], 6, null_rtol=1e-6)
    assert q.dimension == 3 and q.num_null == 2 and q.num_negative == 1 and q.complete
    for e, lv in zip([1e-2, 1e-1], q.log_volume):
        assert lv == pytest.approx(log_ball_volume(3) + 0.5 * sum(math.log(2 * e / x) for x in (4.0, 2.0, 1.0)))
    assert q.threshold == pytest.approx(4e-6)


def test_quadratic_baseline_top_k_is_a_section() -> None:
    q = quadratic_log_volume([9.0, 4.0], [0.1], 1000, complete=False, method="lanczos")
    assert q.num_null is None and q.num_negative is None and not q.complete
    assert "section" in q.note and q.dimension == 2


def test_quantile_summary_ignores_nan() -> None:
    s = quantile_summary(np.array([1.0, 2.0, np.nan, 3.0]))
    assert s["count"] == 3 and s["min"] == 1.0 and s["q50"] == 2.0 and s["max"] == 3.0
    empty = quantile_summary(np.array([np.nan]))
    assert empty["count"] == 0 and empty["q50"] is None


def test_a_lower_bound_has_no_standard_error() -> None:
    """One ray carrying the mean (ESS ≈ 1): the delta method's s.e. would read 1.0 whatever the data;
    the estimate is a lower bound, with neither s.e. nor CI."""
    w = np.full(64, -50.0)
    w[0] = 0.0
    est = estimate_log_mean(w, min_ess=30.0)
    assert est.ess < 2 and est.is_lower_bound
    assert est.se is None and est.ci_lower is None and est.ci_upper is None
    ok = estimate_log_mean(np.random.default_rng(0).normal(size=64) * 0.1, min_ess=30.0)
    assert not ok.is_lower_bound and ok.se is not None and 0 < ok.se < 0.1
