"""basins.linalg.trace: Hutchinson and Hutch++ against exact traces of matrices with known spectra."""

from __future__ import annotations

import math

import pytest
import torch
from dense import CountingMatvec, symmetric_with_spectrum

from basins.errors import ComputeError, InputError
from basins.linalg.operator import Operator
from basins.linalg.trace import TraceEstimate, hutchinson, hutchpp

F64 = torch.float64
METHODS = {"hutchinson": hutchinson, "hutch++": hutchpp}
SEEDS = 50




def matrix(kind: str, P: int = 120) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(1)
    if kind == "psd":
        lam = torch.rand(P, generator=g, dtype=F64) ** 2
    elif kind == "indefinite":
        lam = torch.randn(P, generator=g, dtype=F64)
    elif kind == "lowrank-dominated":  # 6 large directions over a small bulk
        lam = torch.cat([torch.tensor([50.0, 40, 30, 20, 15, 10], dtype=F64), 0.05 * torch.rand(P - 6, generator=g, dtype=F64)])
    elif kind == "rank3":
        lam = torch.cat([torch.tensor([5.0, -2.0, 1.0], dtype=F64), torch.zeros(P - 3, dtype=F64)])
    else:
        raise AssertionError(kind)
    return symmetric_with_spectrum(lam, 2), float(lam.sum())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["psd", "indefinite", "lowrank-dominated", "rank3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_trace_within_three_stderr(method: str, kind: str, seed: int) -> None:
    h, trace = matrix(kind)
    mv = CountingMatvec(h)
    est = METHODS[method](Operator(mv, 120), num_matvecs=60, seed=seed)
    assert isinstance(est, TraceEstimate) and est.method == method and est.seed == seed
    assert abs(est.estimate - trace) <= 3 * est.stderr + 1e-10 * abs(trace)
    assert est.num_matvecs == mv.vectors == 60


def test_hutchpp_exact_when_rank_fits_the_sketch() -> None:
    h, trace = matrix("rank3")
    est = hutchpp(Operator(CountingMatvec(h), 120), num_matvecs=30, seed=0)
    assert est.estimate == pytest.approx(trace, rel=1e-12)
    assert est.stderr < 1e-12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["psd", "lowrank-dominated"])
def test_stderr_is_calibrated_over_seeds(method: str, kind: str) -> None:
    """Mean reported stderr within a factor 2 of the spread of the estimates over 50 seeds."""
    h, _ = matrix(kind)
    runs = [METHODS[method](Operator(CountingMatvec(h), 120), num_matvecs=30, seed=s) for s in range(SEEDS)]
    spread = float(torch.tensor([r.estimate for r in runs]).std())
    mean_stderr = sum(r.stderr for r in runs) / SEEDS
    assert spread / 2 <= mean_stderr <= 2 * spread


def test_hutchpp_beats_hutchinson_on_low_rank_dominated_spectrum() -> None:
    h, trace = matrix("lowrank-dominated")
    mse = {}
    for method, fn in METHODS.items():
        errors = [fn(Operator(CountingMatvec(h), 120), num_matvecs=30, seed=s).estimate - trace for s in range(SEEDS)]
        mse[method] = sum(e * e for e in errors) / SEEDS
    assert mse["hutch++"] < 0.1 * mse["hutchinson"]


def test_hutchinson_variance_matches_theory() -> None:
    """Rademacher: Var = 2 (||H||_F^2 - sum H_ii^2) / m; the mean of stderr^2 estimates it."""
    h, _ = matrix("indefinite")
    theory = 2 * (float((h**2).sum()) - float((torch.diagonal(h) ** 2).sum())) / 40
    runs = [hutchinson(Operator(CountingMatvec(h), 120), num_matvecs=40, seed=s) for s in range(SEEDS)]
    assert sum(r.stderr**2 for r in runs) / SEEDS == pytest.approx(theory, rel=0.25)


@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_probes_do_not_depend_on_block_size(block_size: int) -> None:
    h, _ = matrix("psd")
    ref = hutchinson(Operator(CountingMatvec(h), 120), num_matvecs=30, block_size=16, seed=5)
    mv = CountingMatvec(h)
    est = hutchinson(Operator(mv, 120), num_matvecs=30, block_size=block_size, seed=5)
    assert est.estimate == pytest.approx(ref.estimate, rel=1e-12)
    assert mv.calls == math.ceil(30 / block_size) and max(mv.widths) == min(block_size, 30)


@pytest.mark.parametrize("num_matvecs", [4, 10, 101])
def test_hutchpp_spends_exactly_its_budget(num_matvecs: int) -> None:
    h, _ = matrix("psd")
    mv = CountingMatvec(h)
    est = hutchpp(Operator(mv, 120), num_matvecs=num_matvecs, block_size=5, seed=0)
    assert est.num_matvecs == mv.vectors == num_matvecs and max(mv.widths) <= 5


def test_hutchpp_sketch_larger_than_dimension_is_exact() -> None:
    h, trace = matrix("indefinite", P=20)
    mv = CountingMatvec(h)
    est = hutchpp(Operator(mv, 20), num_matvecs=102, seed=0)  # s = 34 > P = 20
    assert est.estimate == pytest.approx(trace, rel=1e-12) and est.stderr < 1e-12
    assert est.num_matvecs == mv.vectors == 34 + 20 + 34


@pytest.mark.parametrize("method", METHODS)
def test_float32_and_seeded(method: str) -> None:
    h, trace = matrix("psd")
    a = METHODS[method](Operator(CountingMatvec(h.float()), 120), dtype=torch.float32, seed=3)
    b = METHODS[method](Operator(CountingMatvec(h.float()), 120), dtype=torch.float32, seed=3)
    assert a == b
    assert abs(a.estimate - trace) <= 3 * a.stderr + 1e-5 * abs(trace)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_matvecs": 1}, "num_matvecs=1"), ({"num_matvecs": 2.5}, "num_matvecs=2.5"),
    ({"block_size": 0}, "block_size=0"), ({"dtype": torch.int64}, "dtype=torch.int64"),
    ({"seed": "x"}, "seed='x'"),
])
def test_bad_arguments_raise_input_error(method: str, kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        METHODS[method](Operator(lambda v: v, 10), **kwargs)


def test_hutchpp_needs_four_matvecs() -> None:
    with pytest.raises(InputError, match="num_matvecs=3 must be an integer >= 4"):
        hutchpp(Operator(lambda v: v, 10), num_matvecs=3)


@pytest.mark.parametrize("method", METHODS)
def test_bad_operators(method: str) -> None:
    fn = METHODS[method]
    with pytest.raises(InputError, match="num_params=0"):
        fn(Operator(lambda v: v, 0))
    with pytest.raises(InputError, match="matvec must be callable"):
        fn(Operator(None, 10))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="operator must be an Operator or a dense"):
        fn(lambda v: v)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"matvec returned \(10,\)"):
        fn(Operator(lambda v: v[:, 0], 10))
    with pytest.raises(ComputeError, match="non-finite"):
        fn(Operator(lambda v: v * math.inf, 10))
