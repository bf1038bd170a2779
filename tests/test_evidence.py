"""Laplace evidence against independent truths: Bishop PRML eq. 3.86, a dense float64
torch.func Hessian of the summed NLL, the exact log det for SLQ's interval, laplace-torch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from basins.analyses.evidence import evidence, logdet_slq
from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError

F64 = torch.float64


def _blr(n: int = 50, M: int = 5, seed: int = 0, alpha: float = 2.0, noise: float = 0.3
         ) -> tuple[Problem, float, float, float]:
    g = torch.Generator().manual_seed(seed)
    Phi = torch.randn(n, M, generator=g, dtype=F64)
    t = Phi @ torch.randn(M, 1, generator=g, dtype=F64) + noise * torch.randn(n, 1, generator=g, dtype=F64)
    beta = 1 / noise**2
    A = alpha * torch.eye(M, dtype=F64) + beta * Phi.T @ Phi
    mN = beta * torch.linalg.solve(A, Phi.T @ t)
    E = beta / 2 * ((t - Phi @ mN) ** 2).sum() + alpha / 2 * (mN**2).sum()
    # Bishop PRML eq. 3.86
    ref = M / 2 * math.log(alpha) + n / 2 * math.log(beta) - E - 0.5 * torch.logdet(A) - n / 2 * math.log(2 * math.pi)
    m = nn.Linear(M, 1, bias=False, dtype=F64)
    with torch.no_grad():
        m.weight.copy_(mN.T)
    return Problem(m, Phi, t, loss="mse"), float(ref), alpha, noise


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bayesian_linear_regression_matches_bishop_3_86(curvature: str, seed: int) -> None:
    p, ref, alpha, noise = _blr(seed=seed)
    r = evidence(p, prior_precision=alpha, noise_std=noise, curvature=curvature, method="exact")
    assert r.log_evidence == pytest.approx(ref, rel=1e-8)
    assert r.log_occam == pytest.approx(r.log_evidence - r.log_likelihood, rel=1e-12)
    assert r.noise_std_rule == "given" and r.prior_precision == alpha


def test_auto_prior_precision_is_the_maximiser() -> None:
    p, _, _, noise = _blr(n=80, M=6, seed=2)
    r = evidence(p, prior_precision="auto", noise_std=noise)
    d = r.prior_precision
    for f in (0.9, 1.1):
        assert evidence(p, prior_precision=d * f, noise_std=noise).log_evidence < r.log_evidence
    # MacKay's fixed point at the optimum: δ = γ_eff / ‖w‖², γ_eff = Σ s/(s + δ) over eigenvalues s of H_nll
    assert r.eigenvalues is not None
    w2 = float((p.space.flatten(p.params).to(F64) ** 2).sum())
    gam = float((r.eigenvalues / (r.eigenvalues + d)).sum())
    assert d == pytest.approx(gam / w2, rel=1e-4)


def test_noise_estimated_from_residual_and_said_so() -> None:
    p, _, _, _ = _blr()
    r = evidence(p, prior_precision=1.0)
    assert r.noise_std == pytest.approx(math.sqrt(float(p.loss_at_optimum)), rel=1e-12)
    assert "estimated" in r.noise_std_rule and any("estimated" in n for n in r.notes)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _trained_classifier(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    X = torch.randn(120, 3, dtype=F64)
    y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()
    m = MLP().to(F64)
    opt = torch.optim.LBFGS(m.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")
    wd = 0.05  # a weight decay so a finite minimum exists (the prior's mode, roughly)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(X), y) + wd * sum((q**2).sum() for q in m.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return m, X, y


def test_classifier_against_dense_float64_hessian_of_summed_nll() -> None:
    m, X, y = _trained_classifier()
    p = Problem(m, X, y, loss="cross-entropy")
    delta = 2 * 0.05 * 120  # w* is the MAP of this Gaussian prior: Λ is positive definite
    r = evidence(p, prior_precision=delta, method="exact")
    names = [k for k, _ in m.named_parameters()]
    theta = torch.cat([q.detach().reshape(-1) for q in m.parameters()])
    shapes = [q.shape for q in m.parameters()]

    def nll(t: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            parts[k] = t[i : i + s.numel()].reshape(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(m, parts, (X,)), y, reduction="sum")

    H = hessian(nll)(theta)
    P = theta.numel()
    lam = H + delta * torch.eye(P, dtype=F64)
    ref = (-float(nll(theta)) + 0.5 * P * math.log(delta / (2 * math.pi)) - 0.5 * delta * float(theta @ theta)
           + 0.5 * P * math.log(2 * math.pi) - 0.5 * float(torch.linalg.slogdet(lam)[1]))
    assert r.log_evidence == pytest.approx(ref, rel=1e-9)
    assert r.log_likelihood == pytest.approx(-float(nll(theta)), rel=1e-12)
    slq_r = evidence(p, prior_precision=delta, method="slq", num_probes=20, num_steps=40, deflate=10)
    assert slq_r.logdet_ci[0] - 1e-6 <= float(torch.linalg.slogdet(lam)[1]) <= slq_r.logdet_ci[1] + 1e-6


def _spd(P: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=F64))
    ev = torch.logspace(-3, 2, P, dtype=F64)
    ev[-5:] *= torch.tensor([10.0, 20, 40, 80, 160], dtype=F64)  # a few outliers for deflation to take
    return (Q * ev) @ Q.T, ev


@pytest.mark.slow
def test_slq_logdet_interval_covers_exact_in_38_of_40_seeds() -> None:
    A, ev = _spd(2000, 0)
    delta = 1.0
    exact = float(torch.log(ev + delta).sum())
    covered = 0
    for seed in range(40):
        ld = logdet_slq(A, num_probes=20, num_steps=60, deflate=10, seed=seed)
        est, lo, hi = ld(delta)
        covered += lo <= exact <= hi
        assert abs(est - exact) < 0.03 * abs(exact)
    assert covered >= 38, covered


def test_not_positive_definite_and_bad_input() -> None:
    m, X, y = _trained_classifier()
    p = Problem(m, X, y, loss="cross-entropy")
    with pytest.raises(InputError, match="curvature"):
        evidence(p, curvature="kfac")
    with pytest.raises(InputError, match="prior_precision"):
        evidence(p, prior_precision=-1.0)
    A = -torch.eye(4, dtype=F64)
    ld = logdet_slq(A, num_probes=4, num_steps=4, deflate=0)
    with pytest.raises(ComputeError, match="positive definite"):
        ld(0.5)


def test_laplace_torch_full_hessian_agrees() -> None:
    try:
        import laplace
    except Exception as exc:  # noqa: BLE001 - e.g. a torchvision built for another torch
        pytest.skip(f"laplace-torch cannot be imported: {type(exc).__name__}: {exc}")
    m, X, y = _trained_classifier()
    delta = 2 * 0.05 * 120  # w* is the MAP of this Gaussian prior: Λ is positive definite
    p = Problem(m, X, y, loss="cross-entropy")
    ours = evidence(p, prior_precision=delta, method="exact", curvature="ggn")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=40)
    la = laplace.Laplace(m, "classification", subset_of_weights="all", hessian_structure="full",
                         prior_precision=delta)
    la.fit(loader)
    theirs = float(la.log_marginal_likelihood())
    assert ours.log_evidence == pytest.approx(theirs, rel=1e-6)
