"""The feature Gram matrix against dense float64 references: H at zero residual, G = JᵀH_ℓJ in general."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from basins import InputError, Problem
from basins.analyses.features import feature_gram

TOL = 1e-8  # × λ_max, float64




def mlp(d: int, h: int, k: int, seed: int = 0, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, k)).double()


def inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def zero_residual(model: nn.Module, x: torch.Tensor) -> Problem:
    """mse with targets := f(x; θ*): an exact minimum where H = (2/N) JᵀJ."""
    with torch.no_grad():
        y = model(x)
    return Problem(model, x, y, "mse", hvp_route="rev-rev")


def dense_G(p: Problem, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """G = Jᵀ ∇²_o L J from torch.func on the whole batch (independent of the per-example code)."""
    def outputs(theta: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p.space.unflatten(theta), (x,))

    o = outputs(p.theta0)
    J = jacrev(lambda t: outputs(t).reshape(-1))(p.theta0)
    Ho = hessian(lambda flat: p.loss_fn(flat.reshape(o.shape), y))(o.reshape(-1))
    return J.T @ Ho @ J


@pytest.mark.parametrize("k", [1, 3])
def test_eigenvalues_equal_the_nonzero_hessian_eigenvalues_at_zero_residual(k):
    model, x = mlp(3, 8, k), inputs(9, 3)
    p = zero_residual(model, x)
    fg = feature_gram(p)
    H = p.dense_hessian()
    ev = torch.linalg.eigvalsh(H).flip(0)
    lam = float(ev[0])
    assert fg.num_outputs == 9 * k and fg.outputs_per_example == k and fg.scale == pytest.approx(2 / (9 * k))
    r = fg.rank
    assert r == int((ev > 1e-10 * lam).sum())  # same rank as H
    torch.testing.assert_close(fg.eigenvalues[:r], ev[:r], atol=TOL * lam, rtol=0)
    assert fg.gn_residual is not None and fg.gn_residual < 1e-10


@pytest.mark.parametrize("loss", ["cross-entropy", "bce"])
def test_eigenvalues_equal_those_of_dense_G_for_other_losses(loss):
    model, x = mlp(3, 6, 4), inputs(10, 3)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (10,), generator=g) if loss == "cross-entropy" else torch.rand(10, 4, generator=g, dtype=torch.float64)
    p = Problem(model, x, y, loss, hvp_route="rev-rev")
    fg = feature_gram(p)
    evG = torch.linalg.eigvalsh(dense_G(p, model, x, y)).flip(0)
    r = fg.rank
    torch.testing.assert_close(fg.eigenvalues[:r], evG[:r], atol=TOL * float(evG[0]), rtol=0)
    if loss == "cross-entropy":
        assert r == 10 * (4 - 1)  # diag(p) − ppᵀ has rank k − 1 per example
    assert fg.gn_residual is not None and fg.gn_residual > 1e-3  # not a zero-residual point: H ≠ G


def test_routes_and_jacobian_modes_agree():
    model, x = mlp(2, 5, 2), inputs(16, 2)
    p = zero_residual(model, x)
    assert p.num_params < 16 * 2  # outputs > P: auto takes the P×P route
    ref = feature_gram(p, route="gram", jacobian="per-example", top_vectors=2)
    assert feature_gram(p).route == "outer"
    for route, mode in [("outer", "per-example"), ("gram", "batch"), ("outer", "batch")]:
        fg = feature_gram(p, route=route, jacobian=mode, top_vectors=2)
        assert fg.route == route and fg.jacobian_mode == mode
        torch.testing.assert_close(fg.eigenvalues, ref.eigenvalues, atol=TOL * ref.lambda_max, rtol=0)
        overlap = (fg.eigenvectors.T @ ref.eigenvectors).abs().diagonal()  # same vectors up to sign
        torch.testing.assert_close(overlap, torch.ones(2, dtype=torch.float64), atol=1e-8, rtol=0)


def test_linear_regression_rank_and_participation_ratio():
    n, d, k = 5, 9, 2
    x = inputs(n, d, seed=4)
    model = nn.Linear(d, k).double()
    p = zero_residual(model, x)
    fg = feature_gram(p)
    rank_x1 = int(torch.linalg.matrix_rank(torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)))
    assert fg.rank == k * rank_x1 == 10
    # K = (2/N)(I_k ⊗ [X 1][X 1]ᵀ): each eigenvalue of [X 1][X 1]ᵀ twice
    x1 = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    mu = torch.linalg.eigvalsh(x1 @ x1.T).repeat_interleave(k).flip(0) * 2 / (n * k)
    torch.testing.assert_close(fg.eigenvalues, mu, atol=TOL * float(mu[0]), rtol=0)
    assert fg.participation_ratio == pytest.approx(float(mu.sum() ** 2 / (mu**2).sum()))


def test_eigenvectors_and_loadings():
    model, x = mlp(3, 7, 3), inputs(6, 3)
    p = zero_residual(model, x)
    fg = feature_gram(p, top_vectors=3)
    U = fg.eigenvectors
    assert U is not None and U.shape == (18, 3)
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    J = jacrev(lambda t: functional_call(model, p.space.unflatten(t), (x,)).reshape(-1))(p.theta0)
    K = (2 / 18) * J @ J.T
    torch.testing.assert_close(K @ U, U * fg.eigenvalues[:3], atol=TOL * fg.lambda_max, rtol=0)
    per_output, per_example = fg.loadings(0)
    assert per_output.shape == (3,) and per_example.shape == (6,)
    assert float(per_output.sum()) == pytest.approx(1.0) and float(per_example.sum()) == pytest.approx(1.0)
    with pytest.raises(InputError, match="not computed"):
        fg.loadings(5)


def test_rank_at_brackets_the_count():
    model, x = mlp(3, 8, 1), inputs(9, 3)
    fg = feature_gram(zero_residual(model, x))
    for rel in (1e-12, 1e-6, 1e-2):
        rank, lo, hi = fg.rank_at(rel * fg.lambda_max)
        assert lo <= rank <= hi


def test_refuses_when_it_would_not_fit_memory():
    model, x = mlp(3, 8, 2), inputs(9, 3)
    p = zero_residual(model, x)
    with pytest.raises(InputError, match="raise memory_bytes, or use the nullity method .slq."):
        feature_gram(p, memory_bytes=1000)


def test_refuses_a_loss_that_is_not_a_mean_over_examples():
    def summed(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((o - t) ** 2).sum()

    model, x = mlp(3, 4, 1), inputs(6, 3)
    with torch.no_grad():
        y = model(x) + 0.1
    p = Problem(model, x, y, summed, hvp_route="rev-rev")
    with pytest.raises(InputError, match="per-example"):
        feature_gram(p)


def test_bad_options():
    p = zero_residual(mlp(2, 3, 1), inputs(4, 2))
    with pytest.raises(InputError, match="route"):
        feature_gram(p, route="diagonal")
    with pytest.raises(InputError, match="jacobian mode"):
        feature_gram(p, jacobian="forward")


def test_sharded_data_needs_the_outer_route_and_no_loadings() -> None:
    """Under torchrun each process holds a shard: only G = JᵀH_ℓJ (all-reduced) can be formed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    shard = Problem(model, x[:6], y[:6], "mse", total_examples=10, reduce=lambda t: t, check_determinism=False)
    for kwargs in ({"route": "gram"}, {"top_vectors": 2}):
        with pytest.raises(InputError, match="split across processes"):
            feature_gram(shard, **kwargs)
    assert feature_gram(shard, gn_probes=0).num_examples == 10
