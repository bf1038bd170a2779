"""``llc`` at its default options against analytic learning coefficients.

Truths:
- reduced-rank regression y = BAx + noise, A: M→H, B: H→N, true rank r, at the true parameters
  padded with zeros (the most singular point of the true set): Aoyagi & Watanabe (2005), "Stochastic
  complexities of reduced rank regression in Bayesian estimation", Neural Networks 18(7), 924–933,
  Main Theorem (:func:`aoyagi`);
- a regular linear regression with d weights and a bias at its least-squares fit: λ = (d + 1)/2;
- y = w^k·x + noise at w* = 0: K(w) ∝ w^{2k}, so λ = 1/(2k).

The cases are not those of the issue that measured the old defaults.

Which truth. ``llc`` estimates nβ·(E_w[L(w)] − L(w*)) under p(w) ∝ exp(−nβL(w) − γ‖w − w*‖²/2)
for this data set: at finite n that expectation is not λ. It is computed here exactly, by methods
that share nothing with the SGLD chains (:func:`finite_n_truth`): in closed form for the linear
regression (a Gaussian posterior), by quadrature for y = w^k·x (scipy), and for reduced-rank
regression by a blocked Gibbs sampler that is exact (B | A and A | B are Gaussian: the model is
linear in each factor) with the inner expectation over B in closed form (:func:`gibbs_rrr`; it
equals a quadrature on a grid over A where H·M ≤ 3, a test below). At data seeds 0–4 the finite-n
value sits below λ by 2–3% (rank ≥ 1, linear, w²·x), 5–6% (rrr(3, 2, 1, 0), w³·x) and 7–8% (the
rank-0 cases (5, 3, 3, 0) and (4, 4, 2, 0)); long SGLD runs agree with it (rrr(5, 3, 3, 0): 4.14 ±
0.06 against 4.138), and for the rank-0 cases it approaches λ only logarithmically in nβ (−5% at
n = 8,000), so no affordable n makes λ the truth. The accuracy test therefore holds λ̂ against
the finite-n value of its own data; the offsets to λ are printed by scripts/bench_llc.py.

Cost: the default run is 4 chains × (1000 burn-in + auto draws: 1000, doubled until R-hat, the
trend test and s.e. ≤ 4% of λ̂ pass; the small-λ cases take 4,000–15,000 draws); the coverage
test runs the 20 seeds' chains of a case as one vmapped run of 80 chains and forms each seed's
interval from its 4 (what the library computes for a run of 4 chains; only ε, frozen at the
smallest over the chains of a run, is shared).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from basins.analyses.llc import llc
from basins.analyses.llc.stats import chain_mean
from basins.engine.problem import Problem

F64 = torch.float64


def aoyagi(M: int, N: int, H: int, r: int) -> float:
    """Learning coefficient of reduced-rank regression with input M, output N, inner H and true rank r
    (Aoyagi & Watanabe 2005, Main Theorem): the cases M + H < N + r, N + H < M + r, M + N < H + r,
    else [2(H + r)(M + N) − (M − N)² − (H + r)² + (1 if M + N + H + r is odd)]/8."""
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    if M + N < H + r:
        return M * N / 2
    s = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    return (s + (1 if (M + N + H + r) % 2 else 0)) / 8


def test_aoyagi_formula_on_known_cases() -> None:
    # H = 1, r = 0: K = ‖b‖²‖a‖², a ∈ R^M, b ∈ R^N, whose λ is min(M, N)/2 (one blow-up)
    for M in range(1, 7):
        for N in range(1, 7):
            assert aoyagi(M, N, 1, 0) == min(M, N) / 2, (M, N)
    # H = r: the model is regular on the rank-r matrices, of dimension (M + N − r)·r
    for M, N, r in ((1, 1, 1), (3, 3, 3), (4, 2, 2), (2, 5, 2), (6, 4, 3)):
        assert aoyagi(M, N, r, r) == (M + N - r) * r / 2, (M, N, r)
    # H ≥ min(M, N) + r on top of a full-rank truth: every matrix is reachable, λ = MN/2
    assert aoyagi(2, 2, 5, 2) == 2.0
    # rank 0, H = 2, M = N = 2: ½·[2·2·4 − 0 − 4]/4 = 1.5 (Aoyagi & Watanabe's even case)
    assert aoyagi(2, 2, 2, 0) == 1.5
    assert aoyagi(3, 3, 2, 0) == 2.5  # odd case: (2·2·6 − 0 − 4 + 1)/8
    # never above the regular count P/2 = H(M + N)/2
    for M, N, H, r in ((4, 2, 3, 1), (5, 3, 3, 0), (10, 8, 6, 3), (3, 2, 1, 0), (5, 5, 4, 2)):
        assert aoyagi(M, N, H, r) <= H * (M + N) / 2


class RRR(nn.Module):
    def __init__(self, M: int, N: int, H: int) -> None:
        super().__init__()
        self.A = nn.Linear(M, H, bias=False, dtype=F64)
        self.B = nn.Linear(H, N, bias=False, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def rrr(M: int, N: int, H: int, r: int, seed: int, n: int = 500, noise: float = 0.1) -> Problem:
    g = torch.Generator().manual_seed(1000 + seed)
    m = RRR(M, N, H)
    with torch.no_grad():
        m.A.weight.zero_()
        m.B.weight.zero_()
        m.A.weight[:r] = torch.randn(r, M, generator=g, dtype=F64)
        m.B.weight[:, :r] = torch.randn(N, r, generator=g, dtype=F64)
        X = torch.randn(n, M, generator=g, dtype=F64)
        Y = m(X) + noise * torch.randn(n, N, generator=g, dtype=F64)
    return Problem(m, X, Y, loss="mse")


def linear(d: int, seed: int, n: int = 100, noise: float = 0.1) -> Problem:
    g = torch.Generator().manual_seed(2000 + seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    Y = X @ torch.randn(d, 1, generator=g, dtype=F64) + noise * torch.randn(n, 1, generator=g, dtype=F64)
    m = nn.Linear(d, 1, dtype=F64)
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(n, 1, dtype=F64)], 1), Y).solution
    with torch.no_grad():
        m.weight.copy_(sol[:d].T)
        m.bias.copy_(sol[d])
    return Problem(m, X, Y, loss="mse")


class Power(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.zeros(1, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w**self.k * x


def power(k: int, seed: int, n: int = 1000, noise: float = 0.01) -> Problem:
    g = torch.Generator().manual_seed(3000 + seed)
    X = torch.randn(n, 1, generator=g, dtype=F64)
    return Problem(Power(k), X, noise * torch.randn(n, 1, generator=g, dtype=F64), loss="mse")


def _nbeta(p: Problem) -> float:
    return p.num_terms / math.log(p.num_terms)


def linear_truth(p: Problem, gamma: float = 1.0) -> float:
    """Linear regression: L − L(w*) = (w − w*)ᵀS(w − w*), S = X̃ᵀX̃/n (X̃ with a column of ones), so the
    posterior is Gaussian with precision 2nβS + γ and nβ·E[L − L(w*)] = Σᵢ nβsᵢ/(2nβsᵢ + γ)."""
    X = torch.cat([p.inputs, torch.ones(p.num_examples, 1, dtype=F64)], 1)
    s = torch.linalg.eigvalsh(X.T @ X / p.num_examples)
    nb = _nbeta(p)
    return float((nb * s / (2 * nb * s + gamma)).sum())


def power_truth(p: Problem, gamma: float = 1.0) -> float:
    """y = w^k·x at w* = 0: L(w) − L(0) = w^{2k}·Sxx − 2w^k·Sxy; the posterior mean of nβ times it by
    adaptive quadrature (scipy) over |w| ≤ 3 (the prior alone puts < 1% beyond 3)."""
    from scipy import integrate

    k = p.module.k
    x, y = p.inputs[:, 0], p.targets[:, 0]
    sxx, sxy, nb = float((x * x).mean()), float((x * y).mean()), _nbeta(p)

    def dL(w: float) -> float:
        return w ** (2 * k) * sxx - 2 * w**k * sxy

    top = max(-nb * dL(w) - gamma * w * w / 2 for w in torch.linspace(-3, 3, 2001).tolist())

    def dens(w: float) -> float:
        return math.exp(-nb * dL(w) - gamma * w * w / 2 - top)

    kw = dict(points=[0.0], limit=400, epsabs=0.0, epsrel=1e-10)
    z = integrate.quad(dens, -3, 3, **kw)[0]
    return integrate.quad(lambda w: nb * dL(w) * dens(w), -3, 3, **kw)[0] / z


def _rrr_parts(p: Problem) -> tuple[torch.Tensor, ...]:
    X, Y = p.inputs, p.targets
    return p.module.A.weight.detach(), p.module.B.weight.detach(), X.T @ X, X.T @ Y, (Y * Y).sum(), Y.shape[1]


def _b_given_a(A: torch.Tensor, B0: torch.Tensor, S: torch.Tensor, XtY: torch.Tensor, c: float,
               gamma: float) -> tuple[torch.Tensor, ...]:
    """Bᵀ | A (A: (..., H, M)): rows of B independent Gaussian, precision P = 2c·ASAᵀ + γ, mean
    P⁻¹(2c·A XᵀY + γB*ᵀ); returns G = ASAᵀ, AXᵀY, the rhs, P's Cholesky factor and the mean."""
    G = A @ S @ A.transpose(-1, -2)
    ZtY = A @ XtY
    rhs = 2 * c * ZtY + gamma * B0.T
    Lc = torch.linalg.cholesky(2 * c * G + gamma * torch.eye(A.shape[-2], dtype=F64))
    return G, ZtY, rhs, Lc, torch.cholesky_solve(rhs, Lc)


def _sse_given_a(G: torch.Tensor, ZtY: torch.Tensor, Lc: torch.Tensor, mean: torch.Tensor, YY: torch.Tensor,
                 N: int) -> torch.Tensor:
    """E[Σᵢ‖BAxᵢ − yᵢ‖² | A] = Σⱼ mⱼᵀGmⱼ − 2mⱼᵀ(AXᵀY)ⱼ + N·tr(GP⁻¹) + ‖Y‖² (Rao–Blackwell)."""
    return ((mean * (G @ mean)).sum((-2, -1)) - 2 * (mean * ZtY).sum((-2, -1))
            + N * (G * torch.cholesky_inverse(Lc)).sum((-2, -1)) + YY)


def gibbs_rrr(p: Problem, gamma: float = 1.0, chains: int = 16, sweeps: int = 1500, burn: int = 300,
              seed: int = 0) -> tuple[float, float]:
    """Reduced-rank regression: the exact posterior mean of nβ·(L − L(w*)) by blocked Gibbs (B | A,
    then A | B: vec(A) Gaussian with precision 2c·(BᵀB ⊗ XᵀX) + γ, c = nβ/N), the B-expectation in
    closed form given each A. Returns the mean and its s.e. over independent chains."""
    A0, B0, S, XtY, YY, N = _rrr_parts(p)
    H, M = A0.shape
    nb = _nbeta(p)
    c = nb / p.num_terms
    lstar = float(p.loss_at_optimum)
    g = torch.Generator().manual_seed(seed)
    A = A0 + 0.5 * torch.randn(chains, H, M, generator=g, dtype=F64) / math.sqrt(gamma)
    out = []
    for t in range(sweeps):
        G, ZtY, _, Lc, mean = _b_given_a(A, B0, S, XtY, c, gamma)
        if t >= burn:
            out.append(nb * (_sse_given_a(G, ZtY, Lc, mean, YY, N) / p.num_terms - lstar))
        xi = torch.randn(chains, H, N, generator=g, dtype=F64)
        B = (mean + torch.linalg.solve_triangular(Lc.transpose(-1, -2), xi, upper=True)).transpose(-1, -2)
        BtB = B.transpose(-1, -2) @ B
        Q = 2 * c * (BtB[:, :, None, :, None] * S[None, None, :, None, :]).reshape(chains, H * M, H * M)
        Lq = torch.linalg.cholesky(Q + gamma * torch.eye(H * M, dtype=F64))
        lin = (2 * c * B.transpose(-1, -2) @ XtY.T + gamma * A0).reshape(chains, H * M, 1)
        xa = torch.randn(chains, H * M, 1, generator=g, dtype=F64)
        A = (torch.cholesky_solve(lin, Lq) + torch.linalg.solve_triangular(Lq.transpose(-1, -2), xa, upper=True)
             ).reshape(chains, H, M)
    per_chain = torch.stack(out, 1).mean(1)
    return float(per_chain.mean()), float(per_chain.std() / math.sqrt(chains))


def grid_rrr(p: Problem, gamma: float = 1.0, half_width: float = 5.0, points: int = 101) -> float:
    """The same posterior mean by quadrature: B integrated out in closed form, A (H·M ≤ 3 entries) on
    a grid of ``points`` per entry over ±``half_width`` (the trapezoid rule on a smooth integrand)."""
    A0, B0, S, XtY, YY, N = _rrr_parts(p)
    H, M = A0.shape
    nb = _nbeta(p)
    c = nb / p.num_terms
    axis = torch.linspace(-half_width, half_width, points, dtype=F64)
    A = torch.stack(torch.meshgrid(*[axis] * (H * M), indexing="ij"), -1).reshape(-1, H, M) + A0
    G, ZtY, rhs, Lc, mean = _b_given_a(A, B0, S, XtY, c, gamma)
    # ∫ exp(−c·Σ‖BAx − y‖² − γ‖B − B*‖²/2) dB ∝ det(P)^(−N/2)·exp(½ Σⱼ rhsⱼᵀP⁻¹rhsⱼ), up to A-free factors
    logw = (-gamma / 2 * ((A - A0) ** 2).sum((-2, -1)) - N * torch.log(torch.diagonal(Lc, dim1=-2, dim2=-1)).sum(-1)
            + 0.5 * (rhs * mean).sum((-2, -1)))
    w = torch.exp(logw - logw.max())
    val = nb * (_sse_given_a(G, ZtY, Lc, mean, YY, N) / p.num_terms - float(p.loss_at_optimum))
    return float((w * val).sum() / w.sum())


@dataclass(frozen=True)
class Case:
    """``truth`` the asymptotic λ; ``finite(problem)`` the exact finite-n value for that data set."""

    name: str
    truth: float
    problem: Callable[[int], Problem]
    finite: Callable[[Problem], float]


def _rrr_case(M: int, N: int, H: int, r: int) -> Case:
    return Case(f"rrr{(M, N, H, r)}", aoyagi(M, N, H, r), lambda s: rrr(M, N, H, r, s), lambda p: gibbs_rrr(p)[0])


CASES = [
    _rrr_case(4, 2, 3, 1),
    _rrr_case(5, 5, 4, 2),
    _rrr_case(5, 3, 3, 0),  # true rank 0
    _rrr_case(4, 4, 2, 0),  # true rank 0
    _rrr_case(10, 8, 6, 3),  # P/2 = 54
    _rrr_case(3, 3, 3, 1),
    _rrr_case(3, 2, 1, 0),  # H = 1
    Case("linear d=4", 2.5, lambda s: linear(4, s), linear_truth),
    Case("w^2·x", 0.25, lambda s: power(2, s), power_truth),
    Case("w^3·x", 1 / 6, lambda s: power(3, s), power_truth),
]


def test_the_cases_are_those_the_issue_asks_for() -> None:
    rrrs = [c for c in CASES if c.name.startswith("rrr")]
    assert len(rrrs) >= 6 and any(c.name.endswith(", 0)") for c in rrrs)
    assert rrr(10, 8, 6, 3, 0, n=20).num_params / 2 >= 40


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 2, 1, 0), (1, 1, 2, 0), (1, 2, 2, 1)], ids=str)
def test_gibbs_reference_equals_quadrature(shape: tuple[int, int, int, int]) -> None:
    """The Gibbs reference against quadrature over A (B integrated out in closed form) where A has
    at most 3 entries: H = 1 at rank 0, and H = 2 (the A | B step's Kronecker precision) at rank 0
    and at rank 1 (w* ≠ 0)."""
    torch.set_num_threads(1)
    p = rrr(*shape, 0)
    mean, se = gibbs_rrr(p)
    quad = grid_rrr(p, points=161 if shape[2] * shape[0] == 3 else 401)
    assert abs(mean - quad) <= 4 * se + 1e-3 * quad, (mean, se, quad)


@pytest.fixture(scope="module")
def finite_truths() -> dict[str, float]:
    torch.set_num_threads(1)
    return {c.name: c.finite(c.problem(0)) for c in CASES}


@pytest.mark.slow
def test_finite_n_values_sit_just_below_lambda(finite_truths: dict[str, float]) -> None:
    """Singular learning theory: E[nβ(L − L(w*))] → λ as n → ∞, from below here (the localization
    and the lower-order terms only take mass away). At n = 500 (RRR), 100 (linear), 1,000 (w^k):
    within 10% of λ, measured 2–8% below (module docstring)."""
    for c in CASES:
        assert 0.9 * c.truth <= finite_truths[c.name] <= c.truth, (c.name, finite_truths[c.name], c.truth)


@pytest.fixture(scope="module")
def default_runs(finite_truths: dict[str, float]) -> dict[str, tuple[float, object]]:
    torch.set_num_threads(1)  # tiny models: threads only contend
    return {c.name: (finite_truths[c.name], llc(c.problem(0), seed=0, quadratic=False)) for c in CASES}


@pytest.mark.slow
def test_defaults_never_diverge(default_runs: dict[str, tuple[float, object]]) -> None:
    """At the default options no run fails or restarts during its draws, and every estimate is
    finite and positive."""
    for name, (_, r) in default_runs.items():
        assert math.isfinite(r.llc) and r.llc > 0, name  # type: ignore[attr-defined]
        assert bool(torch.isfinite(r.traces).all()), name  # type: ignore[attr-defined]
        assert not [x for x in r.restarts if x.phase == "draws"], name  # type: ignore[attr-defined]


@pytest.mark.slow
def test_defaults_accuracy(default_runs: dict[str, tuple[float, object]]) -> None:
    """The issue's bar, median relative error ≤ 5% and worst ≤ 12% at the default options, against
    the exact finite-n value of each data set (module docstring: λ itself is 2–8% above it at these
    n). Measured with data and chain seeds 0–4 (this fixture is seed 0): median 1.3–3.3%, worst
    3.5–10.0% (against λ: median 2.2–5.0%, worst 7.6–11.9%); errors/s.e. have mean −0.04 and sd 1.16
    over the 50 runs (no bias). With a fixed 4 × 1,000 draws instead of the auto draws' 4% s.e.
    target: worst 5.7–23% (the small-λ cases, s.e. 5–13%)."""
    errs = {name: abs(r.llc / truth - 1) for name, (truth, r) in default_runs.items()}  # type: ignore[attr-defined]
    assert statistics.median(errs.values()) <= 0.05 and max(errs.values()) <= 0.12, errs


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    CASES[7], CASES[8], CASES[0],  # rrr(4, 2, 3, 1) covered 16/20 with Euler steps at 0.1/a
], ids=lambda c: c.name)
def test_interval_coverage_over_20_seeds(case: Case, finite_truths: dict[str, float]) -> None:
    """20 chain seeds on the data of seed 0: the 95% interval of each seed's 4 chains × 1,000 draws
    (the shortest run the default auto draws can stop at) contains the value it estimates, the
    finite-n truth of that data, at least 17 times."""
    torch.set_num_threads(1)
    r = llc(case.problem(0), num_chains=80, num_draws=1000, seed=11, quadratic=False)
    truth = finite_truths[case.name]
    covered = 0
    for g in range(20):
        lo, hi = chain_mean(r.traces[4 * g : 4 * g + 4]).interval(0.95)
        covered += lo <= truth <= hi
    assert covered >= 17, (case.name, covered)
