"""The memory plan (issue 24): HVP pieces that fit a budget give the same products, the Lanczos
basis is placed in memory / bounded by thick restart / on disk by the budget, and a budget that
nothing fits is refused before the work. References: the unsplit product, the dense float64
Hessian (``tests.dense.loss_hessian``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from basins import Problem
from basins.analyses.hessian import hessian_eigenvalues, plan_hessian
from basins.engine import routes as routes_mod
from basins.engine.memory import DISK_BASIS_VECTORS, MemoryPlan, hvp_piece_bytes, plan_lanczos
from basins.errors import InputError
from tests.dense import loss_hessian
from tests.models import classification_data, mlp

GiB = 1 << 30


def _plan(budget: int, resident: int = 0) -> MemoryPlan:
    return MemoryPlan(budget=budget, given=True, device="cpu", resident=resident, per_example=0, route="fwd-rev",
                      graph=0, piece_rows=None, piece_block=16, hvp=0)


def test_basis_in_memory_bounded_or_on_disk_by_budget() -> None:
    P, isz, need = 10**6, 4, 10
    vec = P * isz
    roomy = plan_lanczos(_plan(10 * GiB), P, isz, need=need, block=1)
    assert roomy.basis_storage == "memory" and roomy.max_basis is None and roomy.basis_vectors == 40
    # 40 + 1 + 10 vectors do not fit, 20 + 1 + 10 do: thick restart at k + 10 vectors
    bounded = plan_lanczos(_plan(35 * vec), P, isz, need=need, block=1)
    assert bounded.basis_storage == "memory" and bounded.restart_bound and bounded.max_basis == 20
    assert "thick restart bounded" in bounded.describe()
    disk = plan_lanczos(_plan(20 * vec), P, isz, need=need, block=1)
    assert disk.basis_storage == "disk" and disk.scratch_bytes == 40 * vec and disk.max_basis is None
    assert disk.basis_bytes == (DISK_BASIS_VECTORS + 1) * vec and "on disk" in disk.describe()
    with pytest.raises(InputError, match="nothing fits the memory budget"):
        plan_lanczos(_plan(4 * vec), P, isz, need=need, block=1)
    # the trace block is halved until Hutch++'s vectors fit: 10 + 3·tb + 10 ≤ 40
    traced = plan_lanczos(_plan(40 * vec), P, isz, need=need, block=1, trace_hvps=30)
    assert traced.trace_block == 4 and traced.trace == (10 + 12 + 10) * vec
    assert traced.total == max(traced.basis_bytes, traced.trace)


def test_hvp_pieces_that_fit_a_budget_give_the_same_products(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = classification_data(40)
    whole = Problem(mlp(), x, y, "cross-entropy", dtype="float64", hvp_route="fwd-rev")
    assert whole.routes.piece_rows is None and whole.routes.plan.route == "fwd-rev"
    pe, P = float(whole.routes._per_example or 0), whole.num_params
    assert pe > 0
    monkeypatch.setattr(routes_mod, "resident_bytes", lambda _device=None: 0)
    budget = DISK_BASIS_VECTORS * P * 8 + hvp_piece_bytes(pe, 7, 1, P, 8) + 1
    cut = Problem(mlp(), x, y, "cross-entropy", dtype="float64", hvp_route="fwd-rev", memory_bytes=budget)
    assert cut.routes.piece_rows is not None and cut.routes.piece_rows <= 7 and cut.routes.piece_block == 1
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = cut.counters.num_hvps
    torch.testing.assert_close(cut.hvp(V), whole.hvp(V), rtol=1e-12, atol=1e-14)
    assert cut.counters.num_hvps == before + 3  # pieces and groups of vectors count once per vector
    with pytest.raises(InputError, match="nothing fits the memory budget"):
        Problem(mlp(), x, y, "cross-entropy", dtype="float64", memory_bytes=1)


def test_hessian_with_the_basis_on_disk_matches_dense_float64() -> None:
    x, y = classification_data(40)
    model = mlp().double()
    H = loss_hessian(model, x.double(), y, nn.functional.cross_entropy)
    ref = torch.linalg.eigvalsh(H).flip(0)[:4]
    p = Problem(model, x, y, "cross-entropy", dtype="float64")
    plan = plan_hessian(p, k=4)
    assert plan.basis_storage == "memory"
    ram = hessian_eigenvalues(p, k=4, tol=1e-10, memory_plan=plan)
    disk = hessian_eigenvalues(p, k=4, tol=1e-10, memory_plan=replace(plan, basis_storage="disk"))
    assert ram.top is not None and disk.top is not None and disk.top.error_bounds is not None
    assert disk.num_lanczos_hvps == ram.num_lanczos_hvps
    torch.testing.assert_close(disk.top.eigenvalues, ram.top.eigenvalues, rtol=1e-12, atol=0)
    assert bool(((disk.top.eigenvalues - ref).abs() <= disk.top.error_bounds).all())
    assert disk.record().attrs["basis_storage"] == "disk"


def test_every_opened_problem_records_its_memory_plan(model_files) -> None:  # noqa: ANN001
    """The problem's plan (route, HVP pieces, what is resident) is in the record every command's report
    keeps, with the budget asked for; its bytes are the plan's total (resident + route + one product)."""
    import basins

    opened = basins.open_problem(str(model_files.bundle), device="cpu", memory_bytes=8 * GiB)
    plan, rec = opened.problem.routes.plan, opened.record
    assert rec["memory_plan"] == plan.describe() and rec["memory_plan"].startswith("memory plan: ")
    assert f"HVP route {opened.problem.hvp_route}" in rec["memory_plan"] and "(memory_bytes)" in rec["memory_plan"]
    assert rec["memory_budget_bytes"] == 8 * GiB
    assert rec["memory_plan_bytes"] == plan.resident + plan.graph + plan.hvp > plan.resident > 0
