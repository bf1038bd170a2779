"""Stochastic Lanczos quadrature against matrices with known spectra and a dense float64 Hessian."""

from __future__ import annotations

import math

import pytest
import torch
from dense import random_orthogonal, symmetric_with_spectrum
from torch import nn

from basins import ComputeError, InputError, Problem
from basins.analyses.spectrum import hessian_slq
from basins.linalg.operator import Operator
from basins.linalg.slq import SLQResult, slq, spectral_density, student_t_quantile

F64_EPS = torch.finfo(torch.float64).eps




@pytest.fixture(scope="module")
def bulk() -> tuple[torch.Tensor, torch.Tensor]:
    """P = 300: 100 zeros and 200 eigenvalues spread over [0.1, 1]."""
    ev = torch.cat([torch.zeros(100), torch.linspace(0.1, 1.0, 200)]).double()
    return ev, symmetric_with_spectrum(ev, seed=3)


def test_weights_of_each_probe_sum_to_one_without_renormalisation(bulk):
    _, A = bulk
    r = slq(A, num_probes=6, num_steps=40, seed=1)
    for w in r.weights:
        assert abs(float(w.sum()) - 1.0) < 100 * F64_EPS
        assert bool((w >= 0).all())
    assert r.num_matvecs == 6 * 40 and r.num_probes == 6 and r.dim == 300


def test_nodes_lie_in_the_spectrum_and_extremes_converge(bulk):
    ev, A = bulk
    r = slq(A, num_probes=4, num_steps=40, seed=2)
    for theta, res in zip(r.nodes, r.residuals):
        assert float(theta.min()) >= -1e-12 and float(theta.max()) <= 1 + 1e-12
        assert abs(float(theta.max()) - 1.0) <= float(res[-1]) + 1e-12  # residual bound holds at the top
        assert float(theta.min()) < 1e-10  # the null space is found exactly (one node at 0)


def test_invariant_krylov_space_stops_early_and_the_rule_is_exact():
    ev = torch.tensor([0.0] * 150 + [1.0] * 100 + [2.5] * 50, dtype=torch.float64)
    Q = random_orthogonal(300, 0)
    A = (Q * ev) @ Q.T
    r = slq(A, num_probes=3, num_steps=50, seed=5)
    assert r.num_matvecs == 3 * 3  # three distinct eigenvalues: three steps per probe
    v = torch.randint(0, 2, (3, 300), generator=torch.Generator().manual_seed(5)).double() * 2 - 1
    v = v / v.norm(dim=1, keepdim=True)
    for i, (theta, w) in enumerate(zip(r.nodes, r.weights)):
        torch.testing.assert_close(theta, torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64), atol=1e-12, rtol=0)
        proj = (Q.T @ v[i]) ** 2  # the probe's exact spectral measure
        expected = torch.stack([proj[:150].sum(), proj[150:250].sum(), proj[250:].sum()])
        torch.testing.assert_close(w, expected, atol=1e-12, rtol=0)


def test_probes_in_one_block_equal_probes_one_at_a_time(bulk):
    _, A = bulk
    a = slq(A, num_probes=5, num_steps=30, seed=7)
    b = slq(A, num_probes=5, num_steps=30, seed=7, block_size=1)
    calls = []
    slq(Operator(lambda V: calls.append(V.shape[1]) or A @ V, 300), num_probes=5, num_steps=30, seed=7)
    assert set(calls) == {5} and len(calls) == 30  # one block matvec per step
    for x, y in zip(a.nodes, b.nodes):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=0)


def test_density_integrates_to_one_and_its_mean_is_the_trace_over_P(bulk):
    ev, A = bulk
    r = slq(A, num_probes=10, num_steps=40, seed=11)
    d = spectral_density(r.nodes, r.weights)
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-6
    first = float(torch.trapezoid(d.density * d.grid, d.grid))
    se = float(r.quadratic_forms.std()) / math.sqrt(r.num_probes)
    true = float(ev.sum()) / 300
    assert abs(first - true) <= 3 * se, (first, true, se)
    assert abs(r.trace - float(ev.sum())) <= 3 * r.trace_stderr
    assert bool((d.density_lower <= d.density + 1e-15).all()) and bool((d.density <= d.density_upper + 1e-15).all())
    per_probe_mass = torch.trapezoid(d.per_probe, d.grid)
    torch.testing.assert_close(per_probe_mass, torch.ones(10, dtype=torch.float64), atol=1e-6, rtol=0)


def test_log_density_integrates_to_one_per_decade_and_re_smooths_from_padded_rules(bulk):
    _, A = bulk
    r = slq(A, num_probes=4, num_steps=20, seed=1)
    d = spectral_density(r.nodes, r.weights, scale="log")
    assert d.scale == "log" and d.floor == pytest.approx(1e-12 * r.lambda_max)
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-6
    nodes, weights, _ = r.padded()
    again = spectral_density(nodes.numpy(), weights.numpy(), scale="log")
    torch.testing.assert_close(again.density, d.density)


def test_padded_rules_mark_missing_nodes():
    t = torch.tensor
    r = SLQResult(nodes=[t([0.0, 1.0, 2.0]), t([1.0])], weights=[t([0.2, 0.3, 0.5]), t([1.0])],
                  residuals=[t([0.0, 0.0, 0.0]), t([0.0])], quadratic_forms=t([1.3, 1.0]), num_params=3, dim=3,
                  num_probes=2, num_steps=3, num_matvecs=4, seed=0, probe="rademacher")
    nodes, weights, residuals = r.padded()
    assert nodes.shape == weights.shape == residuals.shape == (2, 3)
    assert bool(torch.isnan(nodes[1, 1:]).all()) and weights[1, 1:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(spectral_density(nodes, weights).density, spectral_density(r.nodes, r.weights).density)


def test_deflation_removes_the_top_eigenvalues():
    ev = torch.linspace(0.0, 1.0, 200, dtype=torch.float64)
    ev[-3:] = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    Q = random_orthogonal(200, 0)
    A = (Q * ev) @ Q.T
    r = slq(A, num_probes=3, num_steps=30, seed=0, deflate=Q[:, -3:])
    assert r.dim == 197 and r.num_deflated == 3 and r.probe == "gaussian"
    assert r.lambda_max <= 1.0 + 1e-10


def test_hessian_slq_on_a_problem_equals_slq_on_its_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (17,), generator=g)
    p = Problem(model, x, y, "cross-entropy")
    H = p.dense_hessian()
    before = p.counters.num_hvps
    a = hessian_slq(p, num_probes=3, num_steps=12, seed=4)
    assert p.counters.num_hvps - before == a.num_matvecs == 36
    b = slq(H, num_probes=3, num_steps=12, seed=4)
    for x1, x2 in zip(a.nodes, b.nodes):
        torch.testing.assert_close(x1, x2, atol=1e-9 * float(H.abs().max()), rtol=0)


def test_student_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 4, 9, 30, 200):
        for p in (0.9, 0.975, 0.995, 0.025):
            assert student_t_quantile(p, dof) == pytest.approx(float(stats.t.ppf(p, dof)), abs=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_probes": 0}, "num_probes must"), ({"num_steps": 0}, "num_steps must"), ({"probe": "sobol"}, "probe"),
     ({"deflate": torch.zeros(7, 2)}, "deflate")],
)
def test_bad_arguments_are_input_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        slq(Operator(lambda V: V, 10), **kwargs)


def test_non_finite_operator_is_a_compute_error():
    with pytest.raises(ComputeError, match="non-finite"):
        slq(Operator(lambda V: V * math.nan, 10), num_probes=2, num_steps=3)


def test_density_errors():
    with pytest.raises(InputError, match="scale"):
        spectral_density([[1.0]], [[1.0]], scale="cubic")
    with pytest.raises(InputError, match="no quadrature nodes"):
        spectral_density([[math.nan]], [[0.0]])
    with pytest.raises(InputError, match="zero"):
        spectral_density([[0.0]], [[1.0]], scale="log")
