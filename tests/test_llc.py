"""LLC by SGLD: the engine's minibatch losses against the Problem's exact ones, the statistics
against scipy and known processes, the sampler's rules (seeds, restarts, flags), the quadratic
basin λ formula. The analytic truths (Aoyagi, regular, w^k) are in tests/test_llc_analytic.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from basins.analyses import llc as llc_module
from basins.analyses.llc import llc, llc_per_block, quadratic_llc, split_rhat
from basins.analyses.llc import sampler as sampler_module
from basins.analyses.llc.stats import chain_mean, ess, t_quantile, trend_z
from basins.engine.minibatch import MinibatchLoss, share_of_minibatch
from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError
from tests.test_llc_analytic import linear, power, rrr

F64 = torch.float64


def linreg(n: int = 200, d: int = 3, seed: int = 0, noise: float = 0.5) -> Problem:
    """Linear regression at its least-squares fit (an exact critical point)."""
    return linear(d, seed, n=n, noise=noise)


# ---------------------------------------------------------------------- statistics
def test_t_quantile_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 3, 7, 30, 79, 1000):
        for p in (0.6, 0.975, 0.995):
            assert t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-9)
    assert t_quantile(0.975, math.inf) == pytest.approx(stats.norm.ppf(0.975), rel=1e-12)
    assert t_quantile(0.975, 3) == pytest.approx(3.182446, rel=1e-6)


def _ar1(C: int, D: int, rho: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(C, D, generator=g, dtype=F64)
    x = torch.zeros(C, D, dtype=F64)
    x[:, 0] = e[:, 0] / math.sqrt(1 - rho**2)
    for t in range(1, D):
        x[:, t] = rho * x[:, t - 1] + e[:, t]
    return x


def test_ess_and_standard_error_of_ar1() -> None:
    """AR(1) with ρ = 0.8: τ = (1 + ρ)/(1 − ρ) = 9, Var(x) = 1/(1 − ρ²); the ESS and the s.e. of the
    grand mean match those within sampling error; the interval covers 0 at about its rate."""
    rho, C, D = 0.8, 4, 4000
    x = _ar1(C, D, rho, 0)
    tau = (1 + rho) / (1 - rho)
    assert ess(x) == pytest.approx(C * D / tau, rel=0.2)
    se_true = math.sqrt(tau / (1 - rho**2) / (C * D))
    est = chain_mean(x)
    assert est.stderr == pytest.approx(se_true, rel=0.3)
    covered = 0
    for s in range(40):
        e = chain_mean(_ar1(4, 800, rho, 100 + s))
        lo, hi = e.interval(0.95)
        covered += lo <= 0 <= hi
    assert covered >= 34, covered  # nominal 38/40


def test_chain_mean_uses_between_chain_spread_when_chains_disagree() -> None:
    x = _ar1(4, 1000, 0.5, 1) + torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)[:, None]
    e = chain_mean(x)
    assert e.dof == 3 and e.stderr >= float(x.mean(1).std()) / 2 * (1 - 1e-12)
    lo, hi = e.interval()
    assert hi - lo == pytest.approx(2 * t_quantile(0.975, 3) * e.stderr, rel=1e-12)


def test_split_rhat_and_trend() -> None:
    g = torch.Generator().manual_seed(0)
    same = torch.randn(4, 2000, generator=g, dtype=F64)
    assert split_rhat(same) == pytest.approx(1.0, abs=0.01)
    assert abs(trend_z(same)) < 3
    assert split_rhat(same + torch.arange(4, dtype=F64)[:, None]) > 1.5
    drifting = same + torch.linspace(0, 1, 2000, dtype=F64)
    assert trend_z(drifting) < -3  # the first part lies below the last


# ---------------------------------------------------------------------- the engine's minibatch losses
def test_minibatch_estimate_is_unbiased_and_exact_on_full_batch() -> None:
    p = linreg(n=30, d=2)
    mb = MinibatchLoss(p, 30)
    theta = p.theta0 + 0.1
    full = mb.batch_at(torch.arange(30)[None])
    v, g = mb.value_and_grad(theta[None], full)
    assert float(v[0]) == pytest.approx(float(p.loss(theta)), rel=1e-13)
    assert torch.allclose(g[0], p.grad(theta), rtol=1e-12, atol=1e-14)
    one = MinibatchLoss(p, 1)  # L̂ of each single example: their mean is L exactly
    vals = one.value(theta.expand(30, -1), one.batch_at(torch.arange(30)[:, None]))
    assert float(vals.mean()) == pytest.approx(float(p.loss(theta)), rel=1e-13)


@pytest.mark.parametrize("loss", ["mse", "cross-entropy"])
def test_value_at_a_fixed_point_from_kept_example_sums_equals_the_batch_value(loss: str) -> None:
    """SGLD's L̂_B(w*) from per-example sums kept after their first use equals a fresh batch
    evaluation, on new and on already-seen examples, and on the whole data as the batch."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3, generator=g, dtype=F64)
    Y = torch.randn(40, 2, generator=g, dtype=F64) if loss == "mse" else torch.randint(0, 4, (40,), generator=g)
    p = Problem(nn.Linear(3, 2 if loss == "mse" else 4, dtype=F64), X, Y, loss=loss)
    theta = p.theta0
    for size in (7, 40):
        mb = MinibatchLoss(p, size)
        gens = [torch.Generator().manual_seed(c) for c in range(3)]
        for _ in range(12):
            batch = mb.draw(gens)
            fresh = mb.value(theta.expand(3, -1), batch)
            assert torch.allclose(mb.value_fixed(theta, batch), fresh, rtol=1e-12, atol=0), size
    assert bool(mb._fixed is not None and mb._whole is not None)  # noqa: SLF001 - the cache was used


def test_share_of_minibatch() -> None:
    assert share_of_minibatch(256, [1000]) == [256]
    assert share_of_minibatch(2000, [1000]) == [1000]
    assert share_of_minibatch(10, [5, 5, 4]) == [4, 3, 3] or sum(share_of_minibatch(10, [5, 5, 4])) == 10
    assert all(k >= 1 for k in share_of_minibatch(2, [100, 100, 100]))


class OnlyFour(nn.Module):
    """A model exported for batches of exactly 4 (as a fixed-batch ``.pt2`` is)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 4:
            raise RuntimeError(f"expected a batch of 4, got {x.shape[0]}")
        return self.lin(x)


def test_fixed_batch_model_gets_padded_pieces() -> None:
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(10, 2, generator=g, dtype=F64), torch.randn(10, 1, generator=g, dtype=F64)
    p = Problem(OnlyFour(), X, Y, loss="mse", fixed_batch_size=4)
    mb = MinibatchLoss(p, 10)
    v = mb.value(p.theta0[None], mb.batch_at(torch.arange(10)[None]))
    assert float(v[0]) == pytest.approx(p.loss_at_optimum, rel=1e-13)
    r = llc(p, num_draws=30, num_burnin=10, quadratic=False, minibatch=3)
    assert math.isfinite(r.llc)


# ---------------------------------------------------------------------- the sampler
def test_same_seed_identical_batched_equals_loop_and_seeds_never_overlap() -> None:
    p = linreg(n=100, d=2)
    kw = dict(num_draws=40, num_burnin=10, minibatch=16, quadratic=False)
    a = llc(p, seed=7, **kw)
    b = llc(p, seed=7, **kw)
    assert torch.equal(a.traces, b.traces) and a.llc == b.llc
    c = llc(p, seed=7, batched=False, **kw)
    assert torch.allclose(a.traces, c.traces, rtol=1e-9, atol=1e-9)
    d = llc(p, seed=8, **kw)
    # seed s and s + 1 share no chain (the old rule ran chains s..s+3)
    for i in range(4):
        for j in range(4):
            assert not torch.allclose(a.traces[i], d.traces[j])
    assert a.num_chains == 4 and a.num_grads > 4 * 50


def test_given_step_size_divergence_is_a_compute_error() -> None:
    p = linreg(n=100, d=2)
    with pytest.raises(ComputeError, match="diverged"):
        llc(p, num_draws=200, num_burnin=0, step_size=50.0, quadratic=False)


def test_divergence_in_burnin_halves_step_and_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """An auto step 500× too large at the start: chains diverge, each divergence halves ε and
    restarts the chain (recorded), and the run ends with finite draws."""
    monkeypatch.setattr(sampler_module, "STEP_FACTOR", 50.0)
    monkeypatch.setattr(sampler_module, "CHECKPOINTS", 1)
    p = linreg(n=100, d=2)
    r = llc(p, num_draws=200, num_burnin=300, quadratic=False, seed=1)
    assert r.restarts and r.restarts[0].phase == "burn-in"
    assert all(x.step_size < r.step_size_initial for x in r.restarts) and r.step_size < r.step_size_initial
    assert math.isfinite(r.llc) and bool(torch.isfinite(r.traces).all())
    assert any("restart" in w for w in r.warnings)


def test_step_size_shrinks_to_the_curvature_met_at_a_singular_point() -> None:
    """y = w²·x at w* = 0: H = 0 there, so the first ε is STEP_FACTOR/γ; the chains meet curvature away
    from 0 and ε shrinks, and no chain diverges."""
    p = power(2, 0, n=2000)
    r = llc(p, num_draws=200, num_burnin=200, quadratic=False)
    assert r.step_size_initial == pytest.approx(sampler_module.STEP_FACTOR / 1.0, rel=0.1)  # H(0) = −4·mean(xy) ≈ 0
    assert r.step_size < r.step_size_initial / 5
    assert not r.restarts


def test_too_short_run_is_flagged() -> None:
    """Rank-0 reduced-rank regression, no burn-in and 60 draws: the chains are still relaxing (split
    R-hat 1.19 at this seed; with the Leimkuhler–Matthews steps at 0.5/a, 200 draws already pass)."""
    p = rrr(5, 3, 3, 0, 0)
    r = llc(p, num_draws=60, num_burnin=0, quadratic=False, seed=5)
    assert r.converged is False
    assert any("not converged" in w for w in r.warnings)


def test_critical_point_test_uses_sampling_noise() -> None:
    p = linreg(n=400, d=3)  # the exact least-squares fit
    r = llc(p, num_draws=20, num_burnin=5, quadratic=False)
    assert r.grad_norm < r.grad_noise and not any("critical" in w for w in r.warnings)
    moved = linreg(n=400, d=3)
    with torch.no_grad():
        moved.module.bias += 1.0
    q = Problem(moved.module, moved.inputs, moved.targets, loss="mse")
    r = llc(q, num_draws=20, num_burnin=5, quadratic=False)
    assert r.grad_norm > 5 * r.grad_noise and any("not a critical point" in w for w in r.warnings)


def test_bad_input() -> None:
    p = linreg(n=50, d=2)
    with pytest.raises(InputError, match="num_chains"):
        llc(p, num_chains=0)
    with pytest.raises(InputError, match="sampler"):
        llc(p, sampler="hmc")
    with pytest.raises(InputError, match="gamma"):
        llc(p, gamma=-1.0)
    with pytest.raises(InputError, match="num_draws"):
        llc(p, num_draws="many")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="mask"):
        llc(p, mask=torch.zeros(p.num_params))


# ---------------------------------------------------------------------- quadratic basin, refined LLC
class Quadratic(nn.Module):
    """A model whose mse loss on one example with target 0 is ½·Σ hᵢ wᵢ² (mse of output √(h/2)·w)."""

    def __init__(self, h: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(h.numel(), dtype=F64))
        self.register_buffer("s", (h / 2).sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.s * self.w).expand(x.shape[0], -1)


@pytest.mark.slow
def test_quadratic_basin_gamma_pull() -> None:
    """On an exactly quadratic loss, SGLD's λ̂ is the quadratic-basin formula (γ pulls it below P/2)."""
    h = torch.tensor([4.0, 1.0, 0.25, 0.01, 0.0], dtype=F64)
    n = 100
    p = Problem(Quadratic(h), torch.ones(n, 1, dtype=F64), torch.zeros(n, h.numel(), dtype=F64), loss="mse")
    gamma, nb = 5.0, 50.0
    r = llc(p, num_draws=4000, num_burnin=500, nbeta=nb, gamma=gamma, seed=0)
    hL = h / h.numel()  # the Hessian of L
    predicted = quadratic_llc(hL, nb, gamma)
    assert r.llc_quadratic == pytest.approx(predicted, rel=1e-9)
    assert predicted == pytest.approx(sum(0.5 * nb * x / (nb * x + gamma) for x in hL.tolist()), rel=1e-12)
    assert predicted < 0.7 * h.numel() / 2
    assert r.llc_ci[0] - 0.02 * predicted <= predicted <= r.llc_ci[1] + 0.02 * predicted, (r.llc, r.llc_ci)


@pytest.mark.slow
def test_refined_llc_per_block_of_a_regular_model() -> None:
    """At a regular minimum the weight-refined LLC of a block is its P_B/2 (γ's pull is < 1% here)."""
    p = linreg(n=2000, d=4, noise=0.1)
    weight, bias = llc_per_block(p, [("weight", ["weight"]), ("bias", ["bias"])], quadratic=False, seed=2,
                                 num_draws=1000, num_burnin=300)
    assert weight.block_num_params == 4 and bias.block_num_params == 1
    assert abs(weight.llc - 2.0) <= max(3 * weight.llc_stderr, 0.1), (weight.llc, weight.llc_stderr)
    assert abs(bias.llc - 0.5) <= max(3 * bias.llc_stderr, 0.05), (bias.llc, bias.llc_stderr)
    assert np.isclose(weight.nbeta, bias.nbeta)


def test_module_exports() -> None:
    assert llc_module.STEP_RULE.startswith("auto: ε = 1/a")


def test_process_shard_pairs_the_global_n_with_the_global_data() -> None:
    """As under torchrun with two identical shards (reduce doubles, gather repeats): each process draws
    its stratified share of every minibatch from its shard, the sums are reduced, and nβ uses the
    global N, so the estimates equal those of one process holding both shards."""
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(20, 2, generator=g, dtype=F64), torch.randn(20, 1, generator=g, dtype=F64)
    model = nn.Linear(2, 1, dtype=F64)
    shard = Problem(model, X, Y, loss="mse", total_examples=40, reduce=lambda t: 2 * t, gather=lambda o: [o, o])
    whole = Problem(model, torch.cat([X, X]), torch.cat([Y, Y]), loss="mse")
    mb = MinibatchLoss(shard, 40)
    assert mb.local_size == 20 and MinibatchLoss(shard, 10).local_size == 5
    theta = shard.theta0 + 0.3
    v, grad = mb.value_and_grad(theta[None], mb.batch_at(torch.arange(20)[None]))
    assert float(v[0]) == pytest.approx(float(whole.loss(theta)), rel=1e-13)
    assert torch.allclose(grad[0], whole.grad(theta), rtol=1e-12, atol=1e-15)
    r = llc(shard, num_draws=20, num_burnin=5, quadratic=False)
    assert r.num_terms == 40 and r.nbeta == pytest.approx(40 / math.log(40), rel=1e-12)


@pytest.mark.slow
def test_auto_draws_and_burnin_extend_within_the_budget() -> None:
    """A case whose 1000 + 1000 steps fail the diagnostics (split R-hat 1.07 at seed 0): ``auto`` extends
    the run (draws that drift become burn-in, or the draws double) and stops at the budget, the total
    never above it."""
    p = rrr(10, 8, 6, 3, 0)
    r = llc(p, num_draws="auto", num_burnin="auto", max_steps=3500, quadratic=False, seed=0)
    assert 2000 < r.num_burnin + r.num_draws <= 3500, (r.num_burnin, r.num_draws)
    assert r.traces.shape == (4, r.num_draws)
    fixed = llc(p, num_draws=1000, num_burnin=1000, quadratic=False, seed=0)
    assert fixed.converged is False  # the reason auto extended


# ---------------------------------------------------------------------- memory: the chains' plan
def _mlp_problem(width: int, n: int = 64, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=F64)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2)).to(F64)
    Y = model(X).detach() + 0.1 * torch.randn(n, 2, generator=g, dtype=F64)
    return Problem(model, X, Y, loss="mse")


def test_chains_are_planned_and_refused_when_they_do_not_fit() -> None:
    from basins.engine.memory import SGLD_VECTORS, MemoryPlan, plan_sgld

    base = MemoryPlan(budget=1 << 30, given=True, device="cpu", resident=0, per_example=1000, route="graph",
                      graph=0, piece_rows=None, piece_block=16, hvp=0)
    P = 10**6
    plan = plan_sgld(base, P, 4, chains=3, rows=8)
    assert plan.sgld == (SGLD_VECTORS * 3 * 4 + 16) * P + 1000 * 3 * 8 and plan.sgld_chains == 3
    assert plan.total == plan.sgld and "SGLD 3 chains" in plan.describe()
    with pytest.raises(InputError, match="lower num_chains or minibatch") as err:
        plan_sgld(base, P, 4, chains=30, rows=8)  # 30 · 11 · 4 MB > 1 GiB
    assert err.value.param == "memory_bytes"
    p = _mlp_problem(8)
    planned = llc_module.plan_llc(p, num_chains=2)
    assert planned.sgld_chains == 2 and planned.basis_storage == "memory" and planned.notes[-1].startswith(
        "llc_quadratic in pieces of")
    r = llc(p, num_chains=2, num_draws=50, num_burnin=20, seed=1)
    assert r.memory_plan is not None and r.record().attrs["memory_plan"] == r.memory_plan.describe()


def test_quadratic_llc_in_pieces_matches_dense_float64_and_is_skipped_when_it_does_not_fit() -> None:
    """llc_quadratic by columns of H in pieces equals Σ ½·nβh/(nβh + γ) over the eigenvalues of the
    float64 Hessian formed by autograd; with a budget that holds the chains but not its vectors, it
    is not computed and a note says so."""
    from torch.autograd.functional import hessian as dense_hessian

    p = _mlp_problem(6)
    theta = p.theta0.detach().clone()

    def loss(t: torch.Tensor) -> torch.Tensor:
        out = p.forward(p.space.unflatten(t), p.inputs)
        return ((out - p.targets) ** 2).mean()

    ev = torch.linalg.eigvalsh(dense_hessian(loss, theta))
    nb, gamma = 30.0, 2.0
    truth = float((0.5 * nb * ev.clamp(min=0) / (nb * ev.clamp(min=0) + gamma)).sum())
    for block in (p.num_params, 16, 1):
        got, method = llc_module._quadratic(p, None, nb, gamma, 0, block, F64)
        assert got == pytest.approx(truth, rel=1e-10), block
        assert method.startswith("exact")
    plan = llc_module.plan_llc(p, num_chains=2, quadratic=False)
    from dataclasses import replace

    tight = replace(plan, budget=plan.resident + plan.graph + plan.hvp + plan.checks + 4 * p.num_params)
    assert llc_module._quadratic_plan(p, None, tight) is None  # 4·P bytes left beside the HVPs
    r = llc(p, num_chains=2, num_draws=50, num_burnin=20, seed=1, memory_plan=tight)
    assert r.llc_quadratic is None and "do not fit" in r.llc_quadratic_method
    assert any("llc_quadratic not computed" in w for w in r.warnings)


def test_gradient_noise_in_chunks_matches_per_example_gradients() -> None:
    """The critical-point test's noise √(n·tr Cov(hᵢ))/N from per-example gradients taken a few at a
    time equals the same from a plain autograd loop over the examples."""
    p = _mlp_problem(5, n=40)
    mb = MinibatchLoss(p, 8)
    got = [llc_module._grad_noise(p, mb, None, 3, chunk) for chunk in (1, 3, 64)]
    h = []
    for i in range(p.num_examples):
        t = p.theta0.detach().clone().requires_grad_(True)
        out = p.forward(p.space.unflatten(t), p.inputs[i : i + 1])
        (g,) = torch.autograd.grad(((out - p.targets[i : i + 1]) ** 2).sum(), t)
        h.append(g)
    H = torch.stack(h)  # all 40 examples are the sample (NOISE_SAMPLE ≥ n)
    tr = float(H.var(dim=0, unbiased=True).sum())
    ref = math.sqrt(p.num_examples * tr) / p.num_terms
    for v in got:
        assert v == pytest.approx(ref, rel=1e-10)
