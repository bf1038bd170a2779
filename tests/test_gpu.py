"""One GPU: float64 CPU and CUDA runs of the same problem agree to rounding.

Random numbers are drawn on the CPU from the seed and then moved (basins convention), so the
only differences between devices are the order of floating-point operations. Every test
that needs CUDA is skipped, with the reason shown, where ``torch.cuda.is_available()`` is
False; ``test_device_comparison_helper_on_cpu`` runs the same comparison cpu-vs-cpu so the
helper itself is exercised everywhere.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from basins import Problem
from basins.linalg.operator import Operator

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine"
)
needs_two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2 if HAS_CUDA else True,
    reason="needs 2 CUDA GPUs for a 2-rank nccl run (one rank per GPU)",
)
RTOL = 1e-10  # float64, loss / gradient / HVP
RTOL_EIG = 1e-8  # float64 Lanczos Ritz values, relative to the largest |eigenvalue|
ROUTES = ("graph", "fwd-rev", "rev-rev")


def _case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(57, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (57,), generator=g)
    return model, x, y, "cross-entropy"


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, name: str) -> None:
    a, b = a.detach().cpu(), b.detach().cpu()
    scale = max(float(b.abs().max()), 1e-300)
    err = float((a - b).abs().max())
    assert a.shape == b.shape and err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:g} × {scale:.3e}"


def _compare_devices(dev_a: str, dev_b: str) -> None:
    model, x, y, loss = _case()
    pa = Problem(copy.deepcopy(model), x, y, loss, dtype="float64", device=dev_a, batch_size=20)
    pb = Problem(copy.deepcopy(model), x, y, loss, dtype="float64", device=dev_b, batch_size=20)
    assert pa.device.type == torch.device(dev_a).type and pb.device.type == torch.device(dev_b).type
    g = torch.Generator().manual_seed(1)  # drawn on the CPU, moved by the engine
    v = torch.randn(pa.num_params, generator=g, dtype=torch.float64)
    V = torch.randn(pa.num_params, 4, generator=g, dtype=torch.float64)
    thetas = pa.theta0.cpu() + 1e-2 * torch.randn(5, pa.num_params, generator=g, dtype=torch.float64)
    _close(pa.loss(), pb.loss(), RTOL, "loss")
    _close(pa.grad(), pb.grad(), RTOL, "grad")
    _close(pa.hvp(v), pb.hvp(v), RTOL, "hvp")
    _close(pa.hvp(V), pb.hvp(V), RTOL, "hvp block")
    for r in ROUTES:
        _close(pa.hvp_with_route(V, r), pb.hvp_with_route(V, r), RTOL, f"hvp {r}")
    _close(pa.loss_many(thetas), pb.loss_many(thetas), RTOL, "loss_many vmap")
    _close(pa.loss_many(thetas, route="loop"), pb.loss_many(thetas, route="loop"), RTOL, "loss_many loop")
    _close(pa.dense_hessian(), pb.dense_hessian(), RTOL, "dense Hessian")

    lanczos_mod = pytest.importorskip("basins.linalg.lanczos", reason="basins.linalg.lanczos is not there yet")
    ra = lanczos_mod.lanczos(Operator(pa.hvp, pa.num_params), k=4, tol=1e-10, seed=3, dtype=torch.float64, device=pa.device)
    rb = lanczos_mod.lanczos(Operator(pb.hvp, pb.num_params), k=4, tol=1e-10, seed=3, dtype=torch.float64, device=pb.device)
    _close(ra.eigenvalues, rb.eigenvalues, RTOL_EIG, "Lanczos top-4")
    exact = torch.linalg.eigvalsh(pa.dense_hessian().cpu()).flip(0)[:4]
    _close(ra.eigenvalues, exact, RTOL_EIG, "Lanczos vs dense")


def test_device_comparison_helper_on_cpu() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: on a busy 2-core machine threads only contend
    try:
        _compare_devices("cpu", "cpu")
    finally:
        torch.set_num_threads(threads)


@needs_cuda
def test_float64_cpu_and_cuda_agree() -> None:
    _compare_devices("cpu", "cuda")


@needs_cuda
def test_auto_device_is_cuda_and_problem_lives_there() -> None:
    model, x, y, loss = _case()
    p = Problem(model, x, y, loss, dtype="float64", device="auto")
    assert p.device.type == "cuda"
    assert p.theta0.device.type == "cuda" and p.grad().device.type == "cuda"
    assert p.loss().device.type == "cuda"


@needs_cuda
def test_cli_hessian_cpu_vs_cuda(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from basins.cli.main import main

    sys.path.insert(0, str(Path(__file__).parent))
    import test_distributed as td

    td._needs_cli("hessian")
    files = td.make_cli_files(tmp_path)
    runner = CliRunner()
    out: dict[str, Any] = {}
    for device in ("cpu", "cuda"):
        r = runner.invoke(main, ["hessian", files["model"], "--data", files["data"], "-k", "3", "--tol", "1e-10",
                                 "--device", device, "--dtype", "float64", "--json", "-q"])
        assert r.exit_code == 0, r.output
        out[device] = json.loads(r.stdout)
    assert out["cuda"]["device"].startswith("cuda") and out["cpu"]["device"] == "cpu"
    _close(torch.tensor(out["cuda"]["loss_at_optimum"]), torch.tensor(out["cpu"]["loss_at_optimum"]), RTOL, "L(θ*)")
    key = "eigenvalues" if "eigenvalues" in out["cpu"] else next(k for k in out["cpu"] if "eigenvalues" in k)
    _close(torch.tensor(out["cuda"][key]), torch.tensor(out["cpu"][key]), RTOL_EIG, key)


@needs_two_gpus
@pytest.mark.slow
def test_two_nccl_ranks_equal_one_process(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import test_distributed as td

    r = td.torchrun([str(Path(td.__file__)), "engine-cuda", str(tmp_path)])
    td._assert_ok(r)
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(2)]
    for case in td.CASES:
        _, want = td._single(case)
        for key, value in want.items():
            _close(ranks[0][case]["q"][key], value, RTOL, f"{case}/{key}")
            assert torch.equal(ranks[0][case]["q"][key], ranks[1][case]["q"][key]), f"{case}/{key}: ranks differ"


@needs_cuda
def test_disk_basis_with_the_hvp_on_cuda_equals_the_device_basis() -> None:
    """The basis in a host scratch file while the HVPs run on the GPU: the same eigenvalues."""
    from dataclasses import replace

    from basins.analyses.hessian import hessian_eigenvalues, plan_hessian

    model, x, y, loss = _case()
    p = Problem(model, x, y, loss, dtype="float64", device="cuda")
    plan = plan_hessian(p, k=4)
    dev = hessian_eigenvalues(p, k=4, tol=1e-10, memory_plan=plan)
    disk = hessian_eigenvalues(p, k=4, tol=1e-10, memory_plan=replace(plan, basis_storage="disk"))
    assert dev.top is not None and disk.top is not None
    _close(disk.top.eigenvalues, dev.top.eigenvalues, RTOL_EIG, "disk vs device basis")


@needs_cuda
def test_bf16_autocast_on_cuda_bounds_hold() -> None:
    """bf16 autocast on the GPU: the audit finds bfloat16 and the measured bounds contain float64 truth."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from basins.analyses.hessian import hessian_eigenvalues
    from basins.engine.precision import audit_precision
    from tests.test_precision import autocast_case

    p, ref = autocast_case("cuda")
    assert audit_precision(p).lowest == torch.bfloat16
    top = hessian_eigenvalues(p, k=4, tol=1e-4).top
    assert top is not None and top.error_bounds is not None
    assert bool(((top.eigenvalues - ref).abs() <= top.error_bounds).all())
