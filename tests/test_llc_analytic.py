"""``llc`` at its default options against analytic learning coefficients.

Truths:
- reduced-rank regression y = BAx + noise, A: M→H, B: H→N, true rank r, at the true parameters
  padded with zeros (the most singular point of the true set): Aoyagi & Watanabe (2005), "Stochastic
  complexities of reduced rank regression in Bayesian estimation", Neural Networks 18(7), 924–933,
  Main Theorem (:func:`aoyagi`);
- a regular linear regression with d weights and a bias at its least-squares fit: λ = (d + 1)/2;
- y = w^k·x + noise at w* = 0: K(w) ∝ w^{2k}, so λ = 1/(2k).

The cases are not those of the issue that measured the old defaults. Is n large enough that the
asymptotic λ is the truth at this nβ = N/log N and γ = 1? Measured with long runs (6,000–10,000
burn-in + draws each): yes for the cases of true rank ≥ 1 (rrr(4, 2, 3, 1) at n = 500: 3.48 ± 0.11
for 3.5) and the regular and one-parameter cases (exact for K homogeneous and γ → 0; γ = 1 is
weak against nβ = 145 there). Not quite for the rank-0 cases: rrr(5, 3, 3, 0) gives 4.14 ± 0.06
at n = 500, 4.16 ± 0.07 at n = 2,000, 4.27 ± 0.10 at n = 8,000 for 4.5 (−8%, −8%, −5%), and
rrr(4, 4, 2, 0) 3.30 ± 0.14 for 3.5 at n = 500 (at n = 100, −13%): K is quartic-homogeneous there,
only nβ/γ² matters, and the approach to λ is slow (logarithmic in nβ, as a multiplicity > 1
gives), so no affordable n removes it; they stay at n = 500 and count against the bar. Cost: the default 4 chains
× 2,000 steps per case; the coverage test runs the 20 seeds' chains of a case as one vmapped run
of 80 chains and forms each seed's interval from its 4 (what the library computes for a run of 4
chains; only ε, frozen at the smallest over the chains of a run, is shared).
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


@dataclass(frozen=True)
class Case:
    name: str
    truth: float
    problem: Callable[[int], Problem]


def _rrr_case(M: int, N: int, H: int, r: int) -> Case:
    return Case(f"rrr{(M, N, H, r)}", aoyagi(M, N, H, r), lambda s: rrr(M, N, H, r, s))


CASES = [
    _rrr_case(4, 2, 3, 1),
    _rrr_case(5, 5, 4, 2),
    _rrr_case(5, 3, 3, 0),  # true rank 0
    _rrr_case(4, 4, 2, 0),  # true rank 0
    _rrr_case(10, 8, 6, 3),  # P/2 = 54
    _rrr_case(3, 3, 3, 1),
    _rrr_case(3, 2, 1, 0),  # H = 1
    Case("linear d=4", 2.5, lambda s: linear(4, s)),
    Case("w^2·x", 0.25, lambda s: power(2, s)),
    Case("w^3·x", 1 / 6, lambda s: power(3, s)),
]


def test_the_cases_are_those_the_issue_asks_for() -> None:
    rrrs = [c for c in CASES if c.name.startswith("rrr")]
    assert len(rrrs) >= 6 and any(c.name.endswith(", 0)") for c in rrrs)
    assert rrr(10, 8, 6, 3, 0, n=20).num_params / 2 >= 40


@pytest.fixture(scope="module")
def default_runs() -> dict[str, tuple[float, object]]:
    torch.set_num_threads(1)  # tiny models: threads only contend
    return {c.name: (c.truth, llc(c.problem(0), seed=0, quadratic=False)) for c in CASES}


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
    """The issue's bar: median relative error ≤ 5%, worst ≤ 12% at the default options. Measured at
    these seeds: median 4.5%, worst 11.2% (rrr(5, 3, 3, 0), whose own finite-n value is ≈ −8%, see
    the module docstring); Euler steps at 0.1/a and MALA target 0.95 gave 12.5% / 38.6%. Not a wide
    margin: with data and chain seed 1 instead of 0, median 4.8%, worst 17.4% (rrr(3, 2, 1, 0), whose
    own finite-n value for that data is −11%: 6,000 + 6,000 steps give 0.889 ± 0.025)."""
    errs = {name: abs(r.llc / truth - 1) for name, (truth, r) in default_runs.items()}  # type: ignore[attr-defined]
    assert statistics.median(errs.values()) <= 0.05 and max(errs.values()) <= 0.12, errs


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    CASES[7], CASES[8], CASES[0],  # rrr(4, 2, 3, 1) covered 16/20 with Euler steps at 0.1/a
], ids=lambda c: c.name)
def test_interval_coverage_over_20_seeds(case: Case) -> None:
    torch.set_num_threads(1)
    r = llc(case.problem(0), num_chains=80, seed=11, quadratic=False)
    covered = 0
    for g in range(20):
        lo, hi = chain_mean(r.traces[4 * g : 4 * g + 4]).interval(0.95)
        covered += lo <= case.truth <= hi
    assert covered >= 17, (case.name, covered)
