"""LLC by SGLD against independent truths: P/2 for regular linear regression, Aoyagi &
Watanabe (2005) for reduced-rank regression, the γ-pull formula on a quadratic basin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from basins.analyses.llc import llc, quadratic_llc, split_rhat
from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError

F64 = torch.float64


def aoyagi(M: int, N: int, H: int, r: int) -> float:
    """Learning coefficient of reduced-rank regression (input M, output N, inner H, true rank r):
    Aoyagi & Watanabe 2005, Main Theorem (their cases, with the parity term of case 1)."""
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    if M + N < H + r:
        return M * N / 2
    s = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    return (s + (1 if (M + N + H + r) % 2 else 0)) / 8


def test_aoyagi_formula_regular_cases() -> None:
    # H = r = min(M, N): a regular model of full rank has λ = (M + N − r)·r/2 (dim of rank-r matrices / 2)
    assert aoyagi(1, 1, 1, 1) == 0.5
    assert aoyagi(3, 3, 3, 3) == 4.5
    assert aoyagi(2, 4, 2, 1) == 3.0  # case M + H < N + r


class RRR(nn.Module):
    def __init__(self, M: int, N: int, H: int) -> None:
        super().__init__()
        self.A = nn.Linear(M, H, bias=False, dtype=F64)
        self.B = nn.Linear(H, N, bias=False, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def _linreg(n: int = 1000, d: int = 6, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = X @ torch.randn(d, 1, generator=g, dtype=F64) + 0.5 * torch.randn(n, 1, generator=g, dtype=F64)
    m = nn.Linear(d, 1, dtype=F64)
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(n, 1, dtype=F64)], 1), Y).solution
    with torch.no_grad():
        m.weight.copy_(sol[:d].T)
        m.bias.copy_(sol[d])
    return Problem(m, X, Y, loss="mse")


def _rrr(M: int, N: int, H: int, r: int, seed: int, n: int = 2000) -> Problem:
    g = torch.Generator().manual_seed(100 + seed)
    m = RRR(M, N, H)
    with torch.no_grad():  # zero-padded true factors: the most singular point of the true set
        m.A.weight.zero_()
        m.B.weight.zero_()
        m.A.weight[:r] = torch.randn(r, M, generator=g, dtype=F64)
        m.B.weight[:, :r] = torch.randn(N, r, generator=g, dtype=F64)
        X = torch.randn(n, M, generator=g, dtype=F64)
        Y = m(X) + 0.1 * torch.randn(n, N, generator=g, dtype=F64)
    return Problem(m, X, Y, loss="mse")


@pytest.mark.slow
def test_regular_linear_regression_gives_half_p() -> None:
    p = _linreg()
    r = llc(p, num_chains=8, num_draws=4000, num_burnin=500, gamma=1e-3, step_size=None, batch_size=1000, seed=0)
    P = p.num_params
    assert r.gamma_bias is not None and abs(r.gamma_bias) < 1e-3
    assert abs(r.llc - P / 2) <= 0.05 * P / 2, (r.llc, r.llc_stderr)
    # the quadratic prediction with SGLD's discretisation (exact for this Gaussian posterior)
    assert r.llc_quadratic_sgld is not None
    assert abs(r.llc - r.llc_quadratic_sgld) <= 4 * r.llc_stderr, (r.llc, r.llc_stderr, r.llc_quadratic_sgld)
    assert r.rhat < 1.1 and r.acceptance > 0.9 and r.frac_below_init == 0.0


def test_minibatch_sgld_regular() -> None:
    p = _linreg(seed=1)
    r = llc(p, num_draws=1000, num_burnin=500, gamma=1e-3, batch_size=200, seed=3)
    assert abs(r.llc - p.num_params / 2) <= 0.15 * p.num_params / 2, (r.llc, r.llc_stderr)


def test_rmsprop_sgld_regular() -> None:
    """RMSProp-preconditioned SGLD with its step size set for the frozen preconditioner gives P/2
    on regular linear regression, as plain SGLD does (within the minibatch test's 15%)."""
    p = _linreg(seed=1)
    r = llc(p, num_chains=4, num_draws=1000, num_burnin=500, gamma=1e-3, batch_size=200, seed=3, sampler="rmsprop")
    assert abs(r.llc - p.num_params / 2) <= 0.15 * p.num_params / 2, (r.llc, r.llc_stderr)
    assert r.step_size_rule.startswith("auto, rmsprop") and r.sampler == "rmsprop"


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [(4, 2, 3, 1), (5, 5, 4, 2), (5, 3, 3, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reduced_rank_regression_matches_aoyagi(cfg: tuple[int, int, int, int], seed: int) -> None:
    p = _rrr(*cfg, seed=seed)
    r = llc(p, num_draws=2000, num_burnin=1500, gamma=1.0, batch_size=2000, seed=seed, gamma_bias=False)
    truth = aoyagi(*cfg)
    assert truth < p.num_params / 2  # singular: well below the regular P/2
    assert abs(r.llc - truth) <= 0.15 * truth, (cfg, seed, r.llc, r.llc_stderr, truth)


class Quadratic(nn.Module):
    """A model whose mse loss on one example with target 0 is ½·Σ hᵢ wᵢ² (mse of output √(h/2)·w)."""

    def __init__(self, h: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(h.numel(), dtype=F64))
        self.register_buffer("s", (h / 2).sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.s * self.w).expand(x.shape[0], -1)


def test_quadratic_basin_gamma_pull() -> None:
    h = torch.tensor([4.0, 1.0, 0.25, 0.01, 0.0], dtype=F64)
    m = Quadratic(h)
    n = 100
    X, Y = torch.ones(n, 1, dtype=F64), torch.zeros(n, h.numel(), dtype=F64)
    p = Problem(m, X, Y, loss="mse")  # L = mean over n·P entries of (√(h/2)w)² = Σ hw²/(2P)
    gamma = 5.0
    nb = 50.0
    r = llc(p, num_draws=4000, num_burnin=500, nbeta=nb, gamma=gamma, batch_size=n, seed=0, step_size=1e-3)
    hL = h / h.numel()  # the Hessian of L
    predicted = quadratic_llc(hL, nb, gamma)
    assert r.llc_quadratic == pytest.approx(predicted, rel=1e-9)
    assert predicted == pytest.approx(sum(0.5 * nb * x / (nb * x + gamma) for x in hL.tolist()), rel=1e-12)
    assert predicted < 0.7 * h.numel() / 2  # the pull is large here
    # SGLD discretisation inflates direction i by 1/(1 − εaᵢ/4) < 1.002 at this ε
    assert abs(r.llc - predicted) <= 4 * r.llc_stderr + 0.01 * predicted, (r.llc, r.llc_stderr, predicted)


def test_same_seed_identical_and_batched_equals_loop() -> None:
    p = _linreg(n=200, d=3)
    a = llc(p, num_draws=50, num_burnin=10, seed=7, batch_size=32, gamma_bias=False)
    b = llc(p, num_draws=50, num_burnin=10, seed=7, batch_size=32, gamma_bias=False)
    assert torch.equal(a.traces, b.traces) and a.llc == b.llc
    c = llc(p, num_draws=50, num_burnin=10, seed=7, batch_size=32, gamma_bias=False, batched=False)
    assert torch.allclose(a.traces, c.traces, rtol=1e-9, atol=1e-9)
    d = llc(p, num_draws=50, num_burnin=10, seed=8, batch_size=32, gamma_bias=False)
    assert not torch.equal(a.traces, d.traces)
    assert a.seeds == [7, 8, 9, 10] and a.num_grads == 4 * 60 + 4 * 6


def test_divergence_is_a_compute_error() -> None:
    p = _linreg(n=200, d=3)
    with pytest.raises(ComputeError, match="diverged"):
        llc(p, num_draws=200, num_burnin=0, step_size=50.0, gamma_bias=False)


def test_bad_input() -> None:
    p = _linreg(n=50, d=2)
    with pytest.raises(InputError, match="num_chains"):
        llc(p, num_chains=0)
    with pytest.raises(InputError, match="sampler"):
        llc(p, sampler="hmc")
    with pytest.raises(InputError, match="gamma"):
        llc(p, gamma=-1.0)


def test_split_rhat() -> None:
    g = torch.Generator().manual_seed(0)
    same = torch.randn(4, 2000, generator=g, dtype=F64)
    assert split_rhat(same) == pytest.approx(1.0, abs=0.01)
    shifted = same + torch.arange(4, dtype=F64)[:, None]
    assert split_rhat(shifted) > 1.5
