"""Random probing against ground truth: quadratics, quartic/mixed walls, cubic asymmetry, censoring.

The search and the estimators run on closed-form batched criteria (no neural net); one
end-to-end test goes through a :class:`basins.Problem` whose model holds θ as one parameter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from basins import Problem
from basins.analyses.volume.criterion import ProblemCriterion
from basins.analyses.volume.directions import DirectionSampler, filter_groups, ray_seed
from basins.analyses.volume.estimators import log_ball_volume
from basins.analyses.volume.probe import probe_basin, probe_problem
from basins.analyses.volume.radii import CENSORED, CROSSED, default_radius_rtol, find_radii
from basins.errors import InputError

F64 = torch.float64


def spd(P: int, lam: np.ndarray, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with eigenvalues ``lam`` and random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=F64))
    return (Q * torch.as_tensor(lam, dtype=F64)) @ Q.T


def quadratic(A: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda X: 0.5 * ((X @ A) * X).sum(1)


def true_log_volume(lam: np.ndarray, eps: float) -> float:
    return log_ball_volume(lam.size) + 0.5 * float(np.sum(np.log(2 * eps / lam)))


def ray_dirs(res_family, sampler: DirectionSampler) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(N, P) ray directions ±u_j of a family result, regenerated from the pair seeds."""
    U = sampler.pairs(list(range(res_family.num_rays // 2)))
    return torch.repeat_interleave(U, 2, dim=0) * torch.tensor([1.0, -1.0], dtype=F64).repeat(U.shape[0])[:, None]


# ---------------------------------------------------------------------- directions
def test_ray_seeds_are_stable_and_distinct() -> None:
    seeds = {ray_seed(0, "isotropic", i) for i in range(1000)}
    assert len(seeds) == 1000
    assert ray_seed(0, "isotropic", 5) == ray_seed(0, "isotropic", 5) != ray_seed(1, "isotropic", 5)
    assert ray_seed(0, "isotropic", 5) != ray_seed(0, "floor", 5)
    assert all(0 <= s < 2**63 for s in seeds)


def test_directions_are_unit_reproducible_and_in_their_subspace() -> None:
    P, k = 30, 4
    basis = torch.linalg.qr(torch.randn(P, k, generator=torch.Generator().manual_seed(1), dtype=F64))[0]
    iso = DirectionSampler(P, seed=3)
    U = iso.pairs(list(range(50)))
    assert torch.allclose(U.norm(dim=1), torch.ones(50, dtype=F64))
    assert torch.equal(U[7], iso.direction(7))
    top = DirectionSampler(P, family="top", basis=basis, seed=3).pairs(list(range(20)))
    floor = DirectionSampler(P, family="floor", basis=basis, seed=3).pairs(list(range(20)))
    assert torch.allclose(top @ basis @ basis.T, top, atol=1e-12)  # in the span
    assert float((floor @ basis).abs().max()) < 1e-12  # orthogonal to it
    assert DirectionSampler(P, family="top", basis=basis).dimension == k
    assert DirectionSampler(P, family="floor", basis=basis).dimension == P - k


def test_filter_normalisation_matches_filter_norms() -> None:
    shapes = [(3, 4), (3,), (2, 3)]
    groups = filter_groups(shapes)
    assert groups == [(0, 4), (4, 8), (8, 12), (12, 15), (15, 18), (18, 21)]
    theta = torch.arange(1.0, 22.0, dtype=F64)
    u = DirectionSampler(21, normalisation="filter", theta0=theta, groups=groups, seed=0).direction(0)
    ratios = [float(u[a:b].norm() / theta[a:b].norm()) for a, b in groups]
    assert np.allclose(ratios, ratios[0]) and float(u.norm()) == pytest.approx(1.0)


def test_sampler_errors() -> None:
    with pytest.raises(InputError, match="family"):
        DirectionSampler(5, family="sideways")
    with pytest.raises(InputError, match="eigenvectors"):
        DirectionSampler(5, family="top")
    with pytest.raises(InputError, match="θ\\*"):
        DirectionSampler(5, normalisation="filter")


# ---------------------------------------------------------------------- quadratics
@pytest.mark.parametrize("P, lam", [(2, np.array([1.0, 10.0])), (5, np.linspace(1.0, 10.0, 5)),
                                    (20, np.linspace(1.0, 3.0, 20))], ids=["P2", "P5", "P20"])
def test_quadratic_volume_and_radii(P: int, lam: np.ndarray) -> None:
    A = spd(P, lam, seed=P)
    res = probe_basin(quadratic(A), torch.zeros(P, dtype=F64), 2000, seed=P, sigma=1.0)
    fam = res.primary
    U = ray_dirs(fam, DirectionSampler(P, seed=P))
    uau = ((U @ A) * U).sum(1).numpy()
    assert res.radius_rtol == default_radius_rtol(P) == 1e-3
    for j, eps in enumerate(res.epsilons):
        exact = np.sqrt(2 * eps / uau)
        assert np.all(np.abs(np.log(fam.radii[:, j] / exact)) <= math.log1p(res.radius_rtol))
        v = fam.volume[j]
        assert v is not None and not v.is_lower_bound and v.ci_lower is not None
        truth = true_log_volume(lam, eps)
        assert abs(v.log_value - truth) <= 3 * v.se, (v.log_value, truth, v.se)
        assert fam.num_evals[:, j].mean() <= 15
    assert int((fam.status == CROSSED).sum()) == fam.radii.size


def test_prior_mass_of_isotropic_quadratic_is_chi2() -> None:
    P, lam, sigma = 6, 2.5, 0.3
    A = lam * torch.eye(P, dtype=F64)
    res = probe_basin(quadratic(A), torch.zeros(P, dtype=F64), 50, epsilons=[1e-3, 1e-2, 0.1], sigma=sigma)
    for j, eps in enumerate(res.epsilons):
        pm = res.primary.prior_mass[j]
        assert pm is not None
        expected = stats.chi2.logcdf(2 * eps / (lam * sigma**2), P)
        assert pm.log_value == pytest.approx(expected, abs=P * res.radius_rtol)


def test_high_dimensional_quadratic_is_a_lower_bound() -> None:
    P = 10_000
    lam = torch.logspace(-2, 2, P, dtype=F64)
    res = probe_basin(lambda X: 0.5 * (X * X * lam).sum(1), torch.zeros(P, dtype=F64), 100, epsilons=[1e-2])
    v = res.primary.volume[0]
    truth = true_log_volume(lam.numpy(), 1e-2)
    assert v is not None and v.is_lower_bound
    assert v.ci_lower is None and v.ci_upper is None
    assert v.jensen_bound + 3 * v.jensen_se <= truth
    assert v.log_value <= truth
    assert res.radius_rtol == pytest.approx(1e-5)


# ---------------------------------------------------------------------- walls
def test_quartic_floor_and_quadratic_top_exponents() -> None:
    P, quad = 8, [0, 1, 2]
    a = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 0.5, 3.0, 1.5], dtype=F64)
    b = torch.tensor([1.0, 4.0, 2.0, 0, 0, 0, 0, 0], dtype=F64)

    def crit(X: torch.Tensor) -> torch.Tensor:
        return (a * X**4).sum(1) + (b * X**2).sum(1)

    basis = torch.eye(P, dtype=F64)[:, quad]  # the deflation spans every quadratic coordinate
    H = torch.diag(2 * b)
    res = probe_basin(crit, torch.zeros(P, dtype=F64), 40, families=["top", "floor", "isotropic"], basis=basis,
                      walls=True, hvp=lambda V: H @ V, sigma=1.0)
    top, floor, iso = (res.families[f].walls for f in ("top", "floor", "isotropic"))
    assert top is not None and floor is not None and iso is not None
    np.testing.assert_allclose(top.exponent, 2.0, atol=1e-6)
    np.testing.assert_allclose(floor.exponent, 4.0, atol=1e-6)
    tol = res.radius_rtol  # the ratio is relative to a radius known to ±rtol/2
    np.testing.assert_allclose(floor.floor_ratio, 0.01**0.25, rtol=tol)
    np.testing.assert_allclose(top.floor_ratio, 0.1, rtol=tol)
    assert top.anharmonicity is not None and np.nanmax(np.abs(top.anharmonicity)) < 1e-3
    assert floor.anharmonicity is not None and np.isnan(floor.anharmonicity).all()  # uᵀHu = 0: no r_quad
    assert np.all((iso.exponent > 2.0 - 1e-9) & (iso.exponent < 4.0 + 1e-9))
    assert res.families["floor"].dimension == P - 3 and res.families["top"].dimension == 3
    assert top.summary["exponent"]["q50"] == pytest.approx(2.0)
    assert res.num_hvps == 3 * 40  # one HVP per pair and family


def test_cubic_asymmetry_matches_analytic_roots() -> None:
    P, c = 3, 0.8

    def crit(X: torch.Tensor) -> torch.Tensor:
        return (X**2).sum(1) + c * X[:, 0] ** 3

    res = probe_basin(crit, torch.zeros(P, dtype=F64), 30, epsilons=[0.01, 0.05], walls=True, sigma=1.0)
    fam = res.primary
    U = ray_dirs(fam, DirectionSampler(P, seed=0)).numpy()

    def first_root(u1: float, eps: float) -> float:  # smallest positive root of c·u1³·r³ + r² − ε
        roots = np.roots([c * u1**3, 1.0, 0.0, -eps])
        return float(min(r.real for r in roots if abs(r.imag) < 1e-12 and r.real > 0))

    walls = fam.walls
    assert walls is not None
    for j, eps in enumerate(res.epsilons):
        exact = np.array([first_root(u[0], eps) for u in U])
        assert np.all(np.abs(np.log(fam.radii[:, j] / exact)) <= math.log1p(res.radius_rtol))
        np.testing.assert_allclose(walls.asymmetry[:, j], np.log(exact[0::2] / exact[1::2]),
                                   atol=2 * math.log1p(res.radius_rtol))


# ---------------------------------------------------------------------- censoring, batching, seeds
def test_flat_half_space_is_censored_not_crossing() -> None:
    def crit(X: torch.Tensor) -> torch.Tensor:  # exactly flat for θ₁ ≤ 0
        return torch.clamp(X[:, 0], min=0.0) ** 2

    res = probe_basin(crit, torch.zeros(2, dtype=F64), 25, epsilons=[1e-2], max_radius=5.0, sigma=1.0)
    fam = res.primary
    U = ray_dirs(fam, DirectionSampler(2, seed=0))
    flat = U[:, 0].numpy() < 0
    assert np.all(fam.status[flat, 0] == CENSORED) and np.all(fam.status[~flat, 0] == CROSSED)
    assert np.all(fam.radii[flat, 0] == 5.0)
    v = fam.volume[0]
    assert v is not None and v.num_censored == 25 and v.is_lower_bound and v.ci_lower is None


def test_batched_search_equals_one_ray_at_a_time() -> None:
    P = 12
    A = spd(P, np.linspace(1, 5, P), seed=2)

    def crit(X: torch.Tensor) -> torch.Tensor:
        q = 0.5 * ((X @ A) * X).sum(1)
        return q + q**2 * 3.0  # anharmonic: not a power law

    U = DirectionSampler(P, seed=4).pairs(list(range(30)))
    eps = [1e-3, 1e-2, 1e-1]
    rtol = 1e-6
    batched = find_radii(crit, torch.zeros(P, dtype=F64), U, eps, rtol=rtol, max_radius=10.0)
    for i in range(U.shape[0]):
        one = find_radii(crit, torch.zeros(P, dtype=F64), U[i : i + 1], eps, rtol=rtol, max_radius=10.0,
                         log_guess=0.0)
        assert np.all(np.abs(np.log(one.radii[0] / batched.radii[i])) <= math.log1p(rtol))
    assert batched.num_evals.mean() <= 15


def test_same_seed_same_result_other_seed_other_rays() -> None:
    A = spd(4, np.array([1.0, 2.0, 3.0, 4.0]))
    runs = [probe_basin(quadratic(A), torch.zeros(4, dtype=F64), 20, seed=s, walls=True, sigma=1.0)
            for s in (7, 7, 8)]
    a, b, c = (r.primary for r in runs)
    assert np.array_equal(a.radii, b.radii) and np.array_equal(a.pair_seeds, b.pair_seeds)
    assert a.volume[0].log_value == b.volume[0].log_value  # type: ignore[union-attr]
    assert a.walls is not None and b.walls is not None and np.array_equal(a.walls.profile, b.walls.profile)
    assert not np.array_equal(a.pair_seeds, c.pair_seeds)


def test_probe_errors() -> None:
    crit = quadratic(torch.eye(3, dtype=F64))
    z = torch.zeros(3, dtype=F64)
    with pytest.raises(InputError, match="epsilons") as exc:
        probe_basin(crit, z, 4, epsilons=[0.1, -1.0])
    assert exc.value.param == "epsilons"
    with pytest.raises(InputError, match="families") as exc:
        probe_basin(crit, z, 4, families=["diagonal"])
    assert exc.value.param == "families"
    with pytest.raises(InputError, match="radius_rtol") as exc:
        probe_basin(crit, z, 4, radius_rtol=2.0)
    assert exc.value.param == "radius_rtol"
    with pytest.raises(InputError, match="eigenvectors"):
        probe_basin(crit, z, 4, families=["top"])
    with pytest.raises(InputError, match="walls_epsilon") as exc:
        probe_basin(crit, z, 4, walls=True, walls_epsilon=0.5)
    assert exc.value.param == "walls_epsilon"
    with pytest.raises(InputError, match="criterion"):
        probe_basin(lambda X: X, z, 4)


def test_filter_directions_give_no_volume() -> None:
    theta = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    res = probe_basin(lambda X: ((X - theta) ** 2).sum(1), theta, 10, normalisation="filter",
                      groups=filter_groups([(2, 2)]))
    assert all(v is None for v in res.primary.volume)
    assert any("filter" in n for n in res.notes)
    assert np.all(res.primary.status == CROSSED)


# ---------------------------------------------------------------------- through a Problem
class _Quadratic(torch.nn.Module):
    """θ as one parameter; the output is ½ θᵀAθ for every example (loss = its mean)."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(A.shape[0], dtype=F64))
        self.register_buffer("A", A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = 0.5 * self.theta @ (self.A @ self.theta)
        return q * torch.ones(x.shape[0], dtype=x.dtype)


def _mean_output(out: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
    return out.mean()


def quadratic_problem(A: torch.Tensor) -> Problem:
    x = torch.zeros(4, 1, dtype=F64)
    return Problem(_Quadratic(A), x, torch.zeros(4, dtype=F64), _mean_output, dtype="float64")


def test_problem_end_to_end_with_walls_and_quadratic_baseline() -> None:
    lam = np.array([0.5, 1.0, 2.0, 4.0, 0.0])
    A = spd(5, lam, seed=1)
    p = quadratic_problem(A)
    evals0, hvps0 = p.counters.num_loss_evals, p.counters.num_hvps
    res = probe_problem(p, 30, epsilons=[1e-2, 1e-1], families=["isotropic", "floor"], top_k=4, walls=True,
                        compare_quadratic=True, sigma=1.0, max_radius=50.0)
    assert res.num_loss_evals == p.counters.num_loss_evals - evals0
    assert res.num_hvps == p.counters.num_hvps - hvps0 >= 5 + 2 * 30  # dense Hessian + uᵀHu per pair
    q = res.quadratic
    assert q is not None and q.complete and q.dimension == 4 and q.num_null == 1 and q.num_negative == 0
    assert q.log_volume[0] == pytest.approx(true_log_volume(lam[:4], 1e-2), rel=1e-8)
    iso = res.families["isotropic"]
    U = ray_dirs(iso, DirectionSampler(5, seed=0))
    uau = ((U @ A) * U).sum(1).numpy()
    for j, eps in enumerate(res.epsilons):
        assert np.all(np.abs(np.log(iso.radii[:, j] / np.sqrt(2 * eps / uau))) <= 2 * math.log1p(res.radius_rtol))
    floor = res.families["floor"]  # deflated against the 4 non-null eigenvectors: the exactly flat direction
    assert np.all(floor.status == CENSORED) and floor.volume[0] is not None and floor.volume[0].is_lower_bound
    assert iso.walls is not None and np.allclose(iso.walls.exponent, 2.0, atol=1e-6)
    assert res.loss_route is not None and res.loss_route["route"] in ("vmap", "loop")


def test_problem_criterion_routes_agree() -> None:
    p = quadratic_problem(spd(3, np.array([1.0, 2.0, 3.0])))
    pts = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    loop = ProblemCriterion(p, route="loop")(pts)
    vm = ProblemCriterion(p, route="vmap", chunk=3)(pts)
    auto = ProblemCriterion(p)
    assert torch.allclose(loop, vm, rtol=1e-12) and torch.allclose(auto(pts), loop, rtol=1e-12)
    assert set(auto.timings) >= {"loop", "vmap4"}
    with pytest.raises(InputError, match="route"):
        ProblemCriterion(p, route="fast")
