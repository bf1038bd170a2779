"""Near-zero eigenvalue counts against analytic truths (linear regression, symmetries) and known spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dense import symmetric_with_spectrum
from torch import nn

from basins import InputError, Problem
from basins.analyses.nullity import (
    count_eigenvalues,
    nullity,
    nullity_exact,
    nullity_slq,
    quadrature_mass,
)
from basins.linalg.operator import Operator
from basins.linalg.slq import slq


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- analytic truths
@pytest.fixture(scope="module")
def linear_regression() -> tuple[Problem, int]:
    """Overparametrised (P = 82 > n = 12), k = 2 outputs with bias, a duplicated input column; any targets."""
    n, d, k = 12, 40, 2
    x = torch.randn(n, d, generator=gen(0), dtype=torch.float64)
    x[:, 7] = x[:, 3]  # duplicated feature: no change here (rank is n-limited) but harmless
    y = torch.randn(n, k, generator=gen(1), dtype=torch.float64)
    torch.manual_seed(0)
    p = Problem(nn.Linear(d, k).double(), x, y, "mse", hvp_route="rev-rev")
    x1 = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    return p, p.num_params - k * int(torch.linalg.matrix_rank(x1))


@pytest.mark.parametrize("method", ["exact", "features"])
def test_linear_regression_nullity_is_P_minus_k_rank(linear_regression, method):
    p, truth = linear_regression
    assert truth == 82 - 2 * 12
    r = nullity(p, method=method)
    assert r.method == method and r.num_params == 82
    for c in r.counts:
        assert c.count == c.count_lower == c.count_upper == truth, c


def test_linear_regression_slq_interval_contains_the_truth(linear_regression):
    p, truth = linear_regression
    r = nullity(p, method="slq", num_probes=10, num_steps=40, deflate=5)
    assert r.method == "slq" and r.num_deflated == 5
    for c in r.counts:
        assert c.count_lower <= truth <= c.count_upper, c
    assert any("estimate" in n for n in r.notes)


def test_duplicated_inputs_with_few_examples_linear():
    """Fewer examples than features, with columns duplicated: rank([X 1]) counts them once."""
    n, d, k = 30, 6, 3
    x = torch.randn(n, d, generator=gen(2), dtype=torch.float64)
    x[:, 4], x[:, 5] = x[:, 0], x[:, 1]  # two duplicated features: rank [X 1] = 5
    torch.manual_seed(1)
    p = Problem(nn.Linear(d, k).double(), x, torch.randn(n, k, generator=gen(3), dtype=torch.float64), "mse",
                hvp_route="rev-rev")
    truth = p.num_params - k * 5
    assert truth == 6
    for method in ("exact", "features"):
        assert [c.count for c in nullity(p, method=method).counts] == [truth] * 3


def relu_net(d: int, h: int, k: int, n: int, *, duplicate: bool, dead: bool) -> Problem:
    """A ReLU MLP at an exact zero-residual minimum (targets := f(x; θ*)), float64."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k)).double()
    x = torch.randn(n, d, generator=gen(4), dtype=torch.float64)
    if duplicate:
        x[:, 1] = x[:, 0]
    with torch.no_grad():
        if dead:  # unit h−1 never fires on the data
            model[0].weight[h - 1] = -torch.ones(d, dtype=torch.float64)
            model[0].bias[h - 1] = -100.0
        y = model(x)
    return Problem(model, x, y, "mse", hvp_route="rev-rev")


def test_duplicated_inputs_and_a_dead_relu_unit_add_their_flat_directions():
    d, h, k, n = 4, 6, 2, 40  # P = 44, n·k = 80: the Jacobian has full rank up to the symmetries
    base = relu_net(d, h, k, n, duplicate=False, dead=False)
    both = relu_net(d, h, k, n, duplicate=True, dead=True)
    # base: one rescaling direction per hidden unit. Duplicated input: w_{j,0} − w_{j,1} for each live unit j.
    # Dead unit: its d + 1 incoming and k outgoing weights (its own rescaling and duplicate included).
    expected_base = h
    expected = 2 * (h - 1) + d + 1 + k
    for method in ("exact", "features"):
        for p, truth in ((base, expected_base), (both, expected)):
            counts = nullity(p, method=method, rtols=(1e-8, 1e-6)).counts
            assert [c.count for c in counts] == [truth, truth], (method, truth, counts)


def test_relu_rescaling_symmetries_at_an_exact_critical_point():
    h = 5
    p = relu_net(3, h, 2, 25, duplicate=False, dead=False)
    assert p.grad_norm <= 1e-10 and p.loss_at_optimum == 0.0
    r = nullity(p, method="exact", rtols=(1e-6,))
    assert r.counts[0].count >= h


def test_float32_hvps_widen_the_exact_interval_around_the_float64_count():
    p64 = relu_net(3, 5, 2, 25, duplicate=True, dead=False)
    p32 = Problem(p64.module.float(), p64.inputs.float(), p64.targets.float(), "mse", hvp_route="rev-rev")
    r64, r32 = nullity(p64, method="exact"), nullity(p32, method="exact")
    assert r32.eigenvalue_error > 100 * r64.eigenvalue_error > 0
    for c64, c32 in zip(r64.counts, r32.counts):
        assert c32.count_lower <= c64.count <= c32.count_upper


# ---------------------------------------------------------------------- plain matrices
def test_count_eigenvalues_ladder_and_error():
    ev = torch.tensor([-1e-9, 0.0, 9e-7, 1e-5, 1e-3, 0.5, 1.0], dtype=torch.float64)
    counts = count_eigenvalues(ev, 1.0, (1e-6, 1e-4, 1e-2), atol=0.0, error=2e-7)
    assert [c.count for c in counts] == [3, 4, 5]
    assert [(c.count_lower, c.count_upper) for c in counts] == [(2, 3), (4, 4), (5, 5)]
    assert counts[0].threshold == 1e-6 and counts[0].method == "exact"


def test_exact_on_a_matrix_with_known_spectrum_and_block_calls():
    ev = torch.cat([torch.zeros(30), torch.logspace(-5, 0, 70, dtype=torch.float64)])
    A = symmetric_with_spectrum(ev)
    calls = []
    r = nullity_exact(Operator(lambda V: calls.append(V.shape[1]) or A @ V, 100), block=32)
    assert calls == [32, 32, 32, 4] and r.num_hvps == 100
    assert r.lambda_max == pytest.approx(1.0)
    assert [c.count for c in r.counts] == [int((ev <= t).sum()) for t in (1e-6, 1e-4, 1e-2)]


def test_quadrature_mass_brackets_its_estimate():
    A = symmetric_with_spectrum(torch.cat([torch.zeros(50), torch.linspace(0.1, 1, 150, dtype=torch.float64)]))
    r = slq(A, num_probes=4, num_steps=25, seed=0)
    est, lo, hi = quadrature_mass(r, 1e-3)
    assert bool((lo <= est).all()) and bool((est <= hi).all())
    assert float(est.mean()) == pytest.approx(0.25, abs=0.1)  # 50 of 200


def test_slq_interval_admits_what_the_quadrature_cannot_resolve():
    """Eigenvalues in every decade from 1e-12 to 1 (as near interpolating minima): no confident 0 at 1e-6."""
    P = 1000
    ev = torch.logspace(-12, 0, P, dtype=torch.float64)
    A = symmetric_with_spectrum(ev)
    r = nullity_slq(A, rtols=(1e-9, 1e-6, 1e-1), deflate=5, num_probes=8, num_steps=30, seed=0)
    for c in r.counts:
        truth = int((ev <= c.threshold).sum())
        assert c.count_lower <= truth <= c.count_upper, (truth, c)
    assert r.counts[1].count_upper - r.counts[1].count_lower > 0.5 * P  # says it cannot see there
    assert any("cannot resolve" in n for n in r.notes)


@pytest.mark.slow
def test_slq_interval_is_calibrated_across_seeds():
    """95% intervals on a known spectrum: they contain the truth in ≥ 34 of 40 seeds, and are not vacuous:
    mean half-width ≤ 2 × the across-seed spread of the estimates (half the central 95% range)."""
    zeros = 120
    ev = torch.cat([torch.zeros(zeros), torch.linspace(0.05, 1, 275, dtype=torch.float64),
                    torch.tensor([5.0, 8.0, 12.0, 16.0, 20.0], dtype=torch.float64)])
    A = symmetric_with_spectrum(ev)
    rows = []
    for seed in range(40):
        c = nullity_slq(A, rtols=(1e-3,), deflate=10, num_probes=10, num_steps=40, seed=seed).counts[0]
        rows.append((c.count, c.count_lower, c.count_upper))
    est, lo, hi = np.array(rows).T
    assert int(((lo <= zeros) & (zeros <= hi)).sum()) >= 34
    spread = (np.percentile(est, 97.5) - np.percentile(est, 2.5)) / 2
    assert float(((hi - lo) / 2).mean()) <= 2 * spread
    assert abs(est.mean() - zeros) < 3 * est.std() / np.sqrt(40)  # unbiased


# ---------------------------------------------------------------------- dispatch and errors
def test_auto_picks_exact_for_small_P_and_features_above_the_limit(linear_regression):
    p, truth = linear_regression
    r = nullity(p)
    assert r.method == "exact" and "P = 82" in r.notes[0]
    r = nullity(p, exact_max_params=10)
    assert r.method == "features" and r.counts[0].count == truth
    r = nullity(p, exact_max_params=10, memory_bytes=20_000)  # neither dense route fits: slq
    assert r.method == "slq"


def test_errors(linear_regression):
    p, _ = linear_regression
    with pytest.raises(InputError, match="^unknown method='svd'"):
        nullity(p, method="svd")
    with pytest.raises(InputError, match="method 'features'.*'slq'"):
        nullity(p, method="exact", memory_bytes=1000)
    with pytest.raises(InputError, match="^rtols must be non-negative"):
        nullity(p, rtols=(-1.0,))
    with pytest.raises(InputError, match="^rtols must hold"):
        nullity(p, rtols=())
    with pytest.raises(InputError, match="^num_probes must be ≥ 2"):
        nullity(p, method="slq", num_probes=1)
    with pytest.raises(InputError, match="^deflate must be"):
        nullity_slq(Operator(lambda V: V, 10), deflate=10)
