"""Data parallelism (basins.engine.distributed): 2 gloo processes under torchrun give the numbers of one process.

The multi-process tests launch ``python -m torch.distributed.run`` on loopback (127.0.0.1, a
free port) with this very file as the worker script (the ``_worker_*`` functions at the
bottom): every rank builds its shard's Problem, computes, and saves what it got; the test
compares rank 0 with a single process (float64, ``RTOL``) and the ranks with each other
(bitwise). Launches are the slow part (~10 s each: three interpreters import torch), so one
shared launch (``two_process_run``) runs the engine checks and several CLI commands; the
CLI ``hessian`` test runs the real ``torchrun -m basins.cli`` entry point.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from basins import ComputeError, InputError, Problem
from basins.engine import distributed as dist
from basins.linalg.operator import Operator

RTOL = 1e-10  # HVP-based quantities, 2 processes vs 1, float64
ROUTES = ("graph", "fwd-rev", "rev-rev")
HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
LAUNCH_TIMEOUT_S = 150  # a hang fails the test instead of blocking the suite
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# ---------------------------------------------------------------------- cases (seeded, tiny)
def _mse_tanh() -> tuple[nn.Module, torch.Tensor, torch.Tensor, str, int | None]:
    """n = 23 (shards 12 + 11), chunks of 5: the last chunk of each shard is short."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 4, generator=g, dtype=torch.float64)
    y = torch.randn(23, 2, generator=g, dtype=torch.float64)
    return model, x, y, "mse", 5


def _ce_bn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, str, int | None]:
    """n = 19 (shards 10 + 9), one chunk per shard, BatchNorm statistics (buffers) in eval mode."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(19, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (19,), generator=g)
    return model, x, y, "cross-entropy", None


CASES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor, str, int | None]]] = {
    "mse-tanh-n23": _mse_tanh,
    "ce-bn-n19": _ce_bn,
}


def _lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], P: int, steps: int, seed: int) -> torch.Tensor:
    """Plain Lanczos with full reorthogonalisation; returns the Ritz values (seeded CPU start vector)."""
    q = torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Q = [q / q.norm()]
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(Q[j])
        alphas.append(float(w @ Q[j]))
        for _ in range(2):
            B = torch.stack(Q, dim=1)
            w = w - B @ (B.T @ w)
        beta = float(w.norm())
        if j == steps - 1 or beta < 1e-12:
            break
        betas.append(beta)
        Q.append(w / beta)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T)


def _quantities(p: Problem, seed: int = 7) -> dict[str, Any]:
    """Everything the engine computes, from seeded CPU draws (so every rank asks the same)."""
    g = torch.Generator().manual_seed(seed)
    P = p.num_params
    v = torch.randn(P, generator=g, dtype=torch.float64)
    V = torch.randn(P, 3, generator=g, dtype=torch.float64)
    thetas = p.theta0.cpu() + 1e-2 * torch.randn(4, P, generator=g, dtype=torch.float64)
    out: dict[str, Any] = {
        "loss_at_optimum": torch.tensor(p.loss_at_optimum, dtype=torch.float64),
        "grad_norm": torch.tensor(p.grad_norm, dtype=torch.float64),
        "loss": p.loss(),
        "loss_moved": p.loss(thetas[0]),
        "grad": p.grad(),
        "grad_moved": p.grad(thetas[1]),
        "hvp": p.hvp(v),
        "hvp_block": p.hvp(V),
        "loss_many_vmap": p.loss_many(thetas),
        "loss_many_chunked": p.loss_many(thetas, chunk=3),
        "loss_many_loop": p.loss_many(thetas, route="loop"),
        "dense_hessian": p.dense_hessian(block=16),
        "lanczos": _lanczos(p.hvp, P, 8, seed),
    }
    for r in ROUTES:
        out[f"hvp_{r}"] = p.hvp_with_route(v, r)
        out[f"hvp_block_{r}"] = p.hvp_with_route(V, r)
    try:  # the library's Lanczos, where it exists: tolerance-driven stopping must agree across ranks
        from basins.linalg.lanczos import lanczos
    except ImportError:
        pass
    else:
        res = lanczos(Operator(p.hvp, P), k=3, which="top", tol=1e-8, seed=seed, dtype=torch.float64, device=p.device)
        out["basins_lanczos_top3"] = res.eigenvalues
        out["basins_lanczos_matvecs"] = torch.tensor(res.num_matvecs)
    return {k: (t.detach().cpu() if isinstance(t, torch.Tensor) else t) for k, t in out.items()}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny models: on a shared 2-core machine, intra-op threads only contend (100× slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _tiny_models_one_thread() -> Iterator[None]:
    with _one_thread():
        yield


def _single(case: str) -> tuple[Problem, dict[str, Any]]:
    model, x, y, loss, batch = CASES[case]()
    with _one_thread():
        p = Problem(model, x, y, loss, batch_size=batch, dtype="float64")
        return p, _quantities(p)


# ---------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(args: list[str], *, nproc: int = 2, timeout: float = LAUNCH_TIMEOUT_S,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --nproc-per-node nproc`` on loopback, a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    full_env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    full_env.update({"OMP_NUM_THREADS": "1", "BASINS_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT)})
    full_env.update(env or {})
    # Own session, so that a hang kills torchrun *and* its workers (by this process group's id).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env=full_env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for more than {timeout:.0f} s:\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _assert_ok(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def _assert_close(got: torch.Tensor, want: torch.Tensor, name: str, rtol: float = RTOL) -> None:
    scale = max(float(want.abs().max()), 1e-300) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:g} × {scale:.3e}"


# ---------------------------------------------------------------------- single-process unit tests
def test_shards_tile_the_data_exactly_uneven_first() -> None:
    for n in (1, 2, 7, 23, 100):
        for world in range(1, min(n, 5) + 1):
            sizes = dist.shard_sizes(n, world)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            covered = [i for r in range(world) for i in range(*dist.shard_range(n, world, r))]
            assert covered == list(range(n))  # every example exactly once, contiguous, in order
    assert dist.shard_sizes(23, 2) == [12, 11]


def test_shard_errors_name_the_fix() -> None:
    with pytest.raises(InputError, match="3 examples cannot be split across 4 processes"):
        dist.shard_sizes(3, 4)
    with pytest.raises(InputError, match="rank 2 is outside 0..1"):
        dist.shard_range(10, 2, 2)


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in _TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not dist.launched() and dist.init_from_env("cpu") is None
    assert (dist.rank(), dist.world_size(), dist.is_main_process()) == (0, 1, True)
    t = torch.arange(3.0)
    assert dist.all_reduce_sum(t) is t
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(5) == 5
    dist.barrier()
    dist.teardown()
    assert dist.local_device("auto") == "auto"


def test_rank_and_backend_from_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist.launched() and (dist.rank(), dist.world_size(), dist.env_local_rank()) == (1, 2, 1)
    assert not dist.is_main_process()
    assert dist.choose_backend(torch.device("cpu")) == "gloo"
    monkeypatch.setenv("BASINS_DIST_BACKEND", "nccl")
    assert dist.choose_backend(torch.device("cpu")) == "nccl"
    monkeypatch.setenv("BASINS_DIST_BACKEND", "carrier-pigeon")
    with pytest.raises(InputError, match="BASINS_DIST_BACKEND"):
        dist.choose_backend(torch.device("cpu"))
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(InputError, match="RANK='one' is not an integer"):
        dist.rank()
    if not torch.cuda.is_available():
        assert dist.local_device("cpu") == "cpu" and dist.local_device("auto") == "auto"


@pytest.mark.parametrize("case", list(CASES))
def test_shard_problems_sum_to_the_full_problem(case: str) -> None:
    """Weights use the global n: the shards' partial sums (no reduce) add up to the full quantities."""
    model, x, y, loss, batch = CASES[case]()
    full = Problem(model, x, y, loss, batch_size=batch, dtype="float64")
    n = x.shape[0]
    parts = [Problem(model, x[s:e], y[s:e], loss, batch_size=batch, dtype="float64", total_examples=n,
                     hvp_route="rev-rev")
             for s, e in (dist.shard_range(n, 3, r) for r in range(3))]
    assert [p.num_local_examples for p in parts] == dist.shard_sizes(n, 3)
    assert all(p.num_examples == n for p in parts) and full.num_local_examples == n
    V = torch.randn(full.num_params, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _assert_close(sum(p.loss() for p in parts), full.loss(), "loss")
    _assert_close(sum(p.grad() for p in parts), full.grad(), "grad")
    for r in ROUTES:
        _assert_close(sum(p.hvp_with_route(V, r) for p in parts), full.hvp_with_route(V, r), f"hvp {r}")
    thetas = full.theta0 + 1e-2 * torch.randn(3, full.num_params, generator=torch.Generator().manual_seed(4),
                                              dtype=torch.float64)
    _assert_close(sum(p.loss_many(thetas) for p in parts), full.loss_many(thetas), "loss_many")


def test_reduce_and_gather_hooks_are_used() -> None:
    model, x, y, loss, batch = _mse_tanh()
    calls: list[tuple[int, ...]] = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return 2 * t  # as if a second rank held an identical shard

    p = Problem(model, x, y, loss, batch_size=batch, dtype="float64", total_examples=2 * x.shape[0],
                reduce=reduce, gather=lambda obj: [obj, obj])
    full = Problem(model, x, y, loss, batch_size=batch, dtype="float64")
    assert p.num_examples == 46 and p.num_local_examples == 23 and p.num_terms == 92
    _assert_close(p.loss(), full.loss(), "loss")
    _assert_close(p.hvp(torch.ones(p.num_params)), full.hvp(torch.ones(p.num_params)), "hvp")
    assert calls and p.hvp_route in ROUTES


def test_total_examples_errors() -> None:
    model, x, y, loss, batch = _mse_tanh()
    with pytest.raises(InputError, match="total_examples = 5 is less than the 23 examples given"):
        Problem(model, x, y, loss, total_examples=5)
    with pytest.raises(InputError, match="shards do not add up to total_examples = 40"):
        Problem(model, x, y, loss, total_examples=40, gather=lambda k: [k, 10])


def test_route_agreement_picks_fastest_on_the_slowest_rank_among_common_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y, loss, batch = _mse_tanh()
    other = {"fwd-rev": 1.0, "rev-rev": 3.0}  # the other rank: no graph route, fwd-rev fastest
    p = Problem(model, x, y, loss, dtype="float64", total_examples=46, reduce=lambda t: 2 * t,
                gather=lambda obj: [obj, other] if isinstance(obj, dict) else [obj, obj])
    assert p.hvp_route == "fwd-rev"  # graph is not viable everywhere; max(local, 1.0) < max(local, 3.0)
    with pytest.raises(ComputeError, match="no Hessian-vector product route works on every process"):
        Problem(model, x, y, loss, dtype="float64", total_examples=46,
                gather=lambda obj: [obj, {}] if isinstance(obj, dict) else [obj, obj])


def test_cli_output_is_rank_zero_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from basins.cli import common
    from basins.progress import Progress

    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    assert not common.is_main_process()
    common.print_json({"a": 1})
    common.stdout_console().print("table")
    common.stderr_console(False).print("log")
    with common.progress_bar(common.stderr_console(False), "x", total=3) as update:
        update(Progress("x", 1, 3, info="y"))
    report = tmp_path / "r.h5"
    common.write_report(str(report), {"model_sha256": "a", "data_sha256": "b"}, "hessian", {"k": 1})
    out = capsys.readouterr()
    assert out.out == "" and out.err == "" and not report.exists()
    monkeypatch.setenv("RANK", "0")
    common.print_json({"a": 1})
    common.write_report(str(report), {"model_sha256": "a", "data_sha256": "b"}, "hessian", {"k": 1})
    assert json.loads(capsys.readouterr().out) == {"a": 1} and report.exists()


# ---------------------------------------------------------------------- 2 processes (torchrun, gloo)
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, cli_files: dict[str, str] | None
                    ) -> tuple[Path, list[list[str]]]:
    """One torchrun launch (2 gloo ranks): the engine checks, then ``CLI_COMMANDS`` in turn, all saved per rank.

    Launches are the slow part (three interpreters importing torch), so the tests share this one.
    """
    out = tmp_path_factory.mktemp("two-procs")
    commands = _cli_commands(cli_files) if cli_files is not None and _cli_available("nullity", "volume", "spectrum", "features") else []
    r = torchrun([str(HERE), "all", str(out), *map(json.dumps, commands)])
    _assert_ok(r)
    return out, commands


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(two_process_run: tuple[Path, list[list[str]]]) -> None:
    out, _ = two_process_run
    ranks = [torch.load(out / f"rank{k}.pt", weights_only=False) for k in range(2)]
    for case in CASES:
        single, want = _single(case)
        r0, r1 = ranks[0][case], ranks[1][case]
        assert r0["num_examples"] == r1["num_examples"] == single.num_examples
        assert r0["num_local_examples"] + r1["num_local_examples"] == single.num_examples
        assert r0["num_local_examples"] - r1["num_local_examples"] == single.num_examples % 2  # uneven: 12 + 11
        assert r0["hvp_route"] == r1["hvp_route"]  # agreed, although measured per rank
        assert r0["block_route"] == r1["block_route"] is not None
        assert r0["counters"] == r1["counters"]
        for key, value in want.items():
            _assert_close(r0["q"][key], value, f"{case}/{key}")
            assert torch.equal(r0["q"][key], r1["q"][key]), f"{case}/{key}: ranks differ"


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_without_hanging(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    r = torchrun([str(HERE), "fail", str(tmp_path)], timeout=120)
    elapsed = time.perf_counter() - t0
    assert r.returncode != 0
    assert "rank 1 fails on purpose" in r.stdout + r.stderr
    assert not list(tmp_path.glob("done*")), "a rank finished normally although its peer failed"
    assert elapsed < 100


# ---------------------------------------------------------------------- CLI under torchrun
ATOL = 1e-13  # scalars in the JSON that are rounding-sized differences of O(1) terms
_VOLATILE = {"wall_seconds", "setup_seconds", "report", "world_size", "rank_examples", "timings", "loss_route",
             "memory_plan", "memory_budget_bytes", "memory_plan_bytes",  # the plan is per process: its share of memory
             "dist_backend", "batch_size"}  # the /problem record's: the launch, and each process's chunk of its shard


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str] | None:
    """A float64 tanh MLP regression trained to ‖∇L‖ ≈ 1e-10 (P = 34, n = 23 → shards 12 + 11), as .pt2 + .pt;
    None while the loader is missing."""
    return make_cli_files(tmp_path_factory.mktemp("dist-cli")) if _cli_available("hessian") else None


@pytest.fixture
def files(cli_files: dict[str, str] | None) -> dict[str, str]:
    _needs_cli("hessian")
    assert cli_files is not None
    return cli_files


def make_cli_files(root: Path) -> dict[str, str]:
    """Write ``model.pt2`` (dynamic batch) and ``data.pt`` under ``root``; returns their paths."""
    with _one_thread():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(23, 5, generator=g, dtype=torch.float64)
        y = torch.tanh(x[:, :2] - 0.5 * x[:, 2:4]) + 0.1 * torch.randn(23, 2, generator=g, dtype=torch.float64)
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=300, tolerance_grad=1e-12, tolerance_change=0,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        ep = torch.export.export(model.eval(), (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, str(root / "model.pt2"))
        torch.save({"inputs": x, "targets": y}, root / "data.pt")
    (root / "stream_data.py").write_text(STREAM_DATA.format(data=str(root / "data.pt"), root=str(root)))
    return {"model": str(root / "model.pt2"), "data": str(root / "data.pt"), "root": str(root),
            "stream": f"{root / 'stream_data.py'}:loader"}


#: A DataLoader (chunks of 5) over a Dataset that logs every index it reads, per rank.
STREAM_DATA = """\
import os
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


class Logged(Dataset):
    def __init__(self):
        d = torch.load({data!r})
        self.x, self.y = d["inputs"], d["targets"]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        with open(os.path.join({root!r}, "reads_rank" + os.environ.get("RANK", "-") + ".txt"), "a") as f:
            f.write(str(int(i)) + "\\n")
        return self.x[i], self.y[i]


def loader():
    return DataLoader(Logged(), batch_size=5)


def rank_split():
    d = torch.load({data!r})
    rank = int(os.environ.get("RANK", "0"))
    return TensorDataset(d["inputs"][rank::2], d["targets"][rank::2])  # each process its own half: refused
"""


def _missing(*commands: str) -> list[str]:
    import importlib.util

    mods = ["basins.files.loading", *(f"basins.cli.{c}" for c in commands)]
    return [m for m in mods if importlib.util.find_spec(m) is None]


def _cli_available(*commands: str) -> bool:
    return not _missing(*commands)


def _needs_cli(*commands: str) -> None:
    if _missing(*commands):
        pytest.skip(f"{', '.join(_missing(*commands))} not there yet")


def _cli_commands(files: dict[str, str]) -> list[list[str]]:
    """The commands the shared launch runs after the engine checks (and the test reruns in one process).

    The HVP route is pinned: ``auto`` chooses between fwd-rev and rev-rev by timing, which two
    launches on a loaded machine need not agree on (the ranks of one launch do agree: tested above).
    """
    pinned = [*COMMON, "--hvp", "fwd-rev"]
    return [
        ["nullity", files["model"], "--data", files["data"], "--method", "exact", *pinned],
        ["spectrum", files["model"], "--data", files["data"], "--probes", "3", "--lanczos-steps", "12", "--points", "50",
         *pinned],
        ["volume", files["model"], "--data", files["data"], "--samples", "12", "--epsilon", "1e-3",
         "--epsilon", "1e-2", "--seed", "3", *pinned],
        # under torchrun G = JᵀH_ℓJ is summed per process and all-reduced: the 'outer' route
        ["features", files["model"], "--data", files["data"], "--route", "outer", *pinned],
        # a DataLoader read on every pass, each rank reading only its shard
        ["hessian", files["model"], "--data", files["stream"], "--stream", "-k", "3", "--which", "both",
         "--tol", "1e-10", *pinned],
        # data already split by rank: refused (exit 2) on every rank, no hang
        ["hessian", files["model"], "--data", files["stream"].replace(":loader", ":rank_split"), *COMMON],
    ]


def _one_process(args: list[str]) -> dict[str, Any]:
    from click.testing import CliRunner

    from basins.cli.main import main

    with _one_thread():
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _compare(two: Any, one: Any, rtol: float, path: str = "") -> None:
    """Every number of the 2-process JSON equals the 1-process one (rtol of the largest at that key)."""
    if isinstance(one, dict):
        assert isinstance(two, dict) and set(two) >= set(one), f"{path}: keys differ"
        for k, v in one.items():
            if k not in _VOLATILE:
                _compare(two[k], v, rtol, f"{path}/{k}")
    elif isinstance(one, list) and one and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in one):
        _assert_close(torch.tensor(two, dtype=torch.float64), torch.tensor(one, dtype=torch.float64), path, rtol)
    elif isinstance(one, list):
        assert isinstance(two, list) and len(two) == len(one), f"{path}: lengths differ"
        for i, (a, b) in enumerate(zip(two, one)):
            _compare(a, b, rtol, f"{path}[{i}]")
    elif isinstance(one, float):
        assert isinstance(two, (int, float)), f"{path}: {two!r} is not a number"
        # ATOL: results of cancellation (‖∇L(θ*)‖ ≈ 1e-10 at a minimum, near-zero eigenvalues)
        assert abs(two - one) <= rtol * abs(one) + ATOL, f"{path}: {two!r} != {one!r}"
    else:
        assert two == one, f"{path}: {two!r} != {one!r}"


COMMON = ["--dtype", "float64", "--device", "cpu", "--json"]


@pytest.mark.slow
def test_cli_hessian_under_torchrun_equals_one_process(files: dict[str, str], tmp_path: Path) -> None:
    _needs_cli("hessian")
    from basins.files.report import read_report

    args = ["hessian", files["model"], "--data", files["data"], "-k", "4", "--which", "both", "--tol", "1e-10",
            "--trace", *COMMON]
    one = _one_process(args)
    report = tmp_path / "r2.h5"
    r = torchrun(["-m", "basins.cli", *args, "-o", str(report)])
    _assert_ok(r)
    two = json.loads(r.stdout)  # one JSON object: rank 0 alone prints
    assert two["world_size"] == 2 and two["rank_examples"] == [12, 11] and two["num_examples"] == 23
    assert one["world_size"] == 1 and one["rank_examples"] == [23]
    _compare(two, one, RTOL)
    assert r.stderr.count("data parallel: 2 processes (gloo), examples per rank 12 + 11 = 23") == 1
    problem = read_report(str(report))["problem"]
    problem = problem.get("attrs", problem)
    assert list(problem["rank_examples"]) == [12, 11] and int(problem["world_size"]) == 2
    assert sum(problem["rank_examples"]) == problem["num_examples"] == 23


@pytest.mark.slow
def test_cli_nullity_exact_volume_spectrum_under_torchrun_equal_one_process(
        two_process_run: tuple[Path, list[list[str]]]) -> None:
    """The shared launch ran the three commands in turn (the process group joined once, then reused)."""
    _needs_cli("nullity", "volume", "spectrum", "features")
    out, commands = two_process_run
    assert commands
    for i, args in enumerate(commands):
        if any(a.endswith(":rank_split") for a in args):
            continue  # an error case (test_data_split_by_rank_is_refused_under_torchrun)
        text0 = (out / f"cli{i}_rank0.txt").read_text()
        assert (out / f"cli{i}_rank1.txt").read_text() == "", "rank 1 printed to stdout"
        two = json.loads(text0)
        one = _one_process(args)
        assert two["rank_examples"] == [12, 11]
        if args[0] == "volume":
            # losses equal up to rounding: radii (and the log-volumes built from them) within the radius tolerance
            _compare(two, one, float(one["radius_rtol"]))
        else:
            _compare(two, one, RTOL)


@pytest.mark.slow
def test_streamed_loader_under_torchrun_reads_each_shard_on_its_own_rank(
        two_process_run: tuple[Path, list[list[str]]], files: dict[str, str]) -> None:
    """Rank r reads only examples of its shard (12 + 11), in chunks of 5, again on every pass;
    the numbers equal one process with the data loaded from the .pt file."""
    out, commands = two_process_run
    i = next(k for k, c in enumerate(commands) if "--stream" in c)
    two = json.loads((out / f"cli{i}_rank0.txt").read_text())
    args = commands[i]
    one = _one_process([a if a != files["stream"] else files["data"] for a in args if a != "--stream"])
    assert two.pop("hvp_route") != "graph"  # the gradient graph would hold every chunk: not for --stream
    one.pop("hvp_route")
    # the route choices cost differently (graph: one check product; streamed: two timed ones); the rest is equal
    assert two.pop("num_hvps") - two.pop("num_setup_hvps") == one.pop("num_hvps") - one.pop("num_setup_hvps")
    for key in ("num_hessian_hvps", "data", "data_streamed", "data_read_every_pass"):  # the source, not the data
        two.pop(key), one.pop(key)
    _compare(two, one, RTOL)
    root = Path(files["root"])
    reads = [[int(v) for v in (root / f"reads_rank{r}.txt").read_text().split()] for r in range(2)]
    assert set(reads[0]) == set(range(12))
    # rank 1: its shard, plus the first 8 examples once (every process fingerprints them to check that
    # all opened the same data)
    assert set(reads[1]) - set(range(8)) == set(range(12, 23))
    assert sorted(i for i in reads[1] if i < 12) == list(range(8))
    passes = [reads[0].count(11), reads[1].count(22)]  # the last example of each shard: once per full pass
    assert passes[0] == passes[1] >= 5  # read again on every pass (loss, gradient, HVPs), in step


@pytest.mark.slow
def test_data_split_by_rank_is_refused_under_torchrun(two_process_run: tuple[Path, list[list[str]]]) -> None:
    out, commands = two_process_run
    i = next(k for k, c in enumerate(commands) if any(a.endswith(":rank_split") for a in c))
    for r in range(2):
        assert (out / f"cli{i}_rank{r}.txt").read_text().strip() == "EXIT 2"


@pytest.mark.slow
def test_cli_rank_failure_exits_nonzero_with_the_error(files: dict[str, str], tmp_path: Path) -> None:
    """Rank 1's data factory raises: every rank exits, torchrun exits non-zero, the message is shown."""
    _needs_cli("hessian")
    (tmp_path / "flaky_data.py").write_text(
        "import os, torch\n"
        "def make():\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise RuntimeError('rank 1 cannot read its data')\n"
        f"    d = torch.load({files['data']!r})\n"
        "    return d['inputs'], d['targets']\n"
    )
    t0 = time.perf_counter()
    r = torchrun(["-m", "basins.cli", "hessian", files["model"], "--data", "flaky_data:make", "-k", "2", *COMMON],
                 env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, timeout=120)
    assert r.returncode != 0
    assert "rank 1 cannot read its data" in r.stdout + r.stderr
    assert time.perf_counter() - t0 < 100


# ---------------------------------------------------------------------- the worker (run by torchrun)
def _worker_engine(out: Path, device: str = "cpu") -> None:
    device = f"cuda:{dist.env_local_rank()}" if device == "cuda" else device
    ctx = dist.init_from_env(device)
    assert ctx is not None and ctx.world_size >= 2
    assert ctx.backend == ("nccl" if device.startswith("cuda") else "gloo")
    results: dict[str, Any] = {}
    for case, make in CASES.items():
        model, x, y, loss, batch = make()
        n = x.shape[0]
        s, e = dist.shard_range(n, ctx.world_size, ctx.rank)
        p = Problem(model, x[s:e], y[s:e], loss, batch_size=batch, dtype="float64", total_examples=n,
                    reduce=dist.all_reduce_sum, gather=dist.all_gather_object, device=device)
        q = _quantities(p)
        results[case] = {"q": q, "num_examples": p.num_examples, "num_local_examples": p.num_local_examples,
                         "hvp_route": p.hvp_route, "block_route": p.block_route, "counters": p.counters.as_dict()}
    torch.save(results, out / f"rank{ctx.rank}.pt")


def _worker_fail(out: Path) -> None:
    ctx = dist.init_from_env("cpu")
    assert ctx is not None
    model, x, y, loss, batch = _mse_tanh()
    s, e = dist.shard_range(x.shape[0], ctx.world_size, ctx.rank)
    p = Problem(model, x[s:e], y[s:e], loss, dtype="float64", total_examples=x.shape[0],
                reduce=dist.all_reduce_sum, gather=dist.all_gather_object)
    if ctx.rank == 1:
        raise ComputeError("rank 1 fails on purpose")
    for _ in range(100_000):  # rank 0 waits in all_reduce for a peer that is gone
        p.hvp(torch.ones(p.num_params))
    (out / f"done{ctx.rank}").write_text("finished")


def _worker_cli(out: Path, *commands: str) -> None:
    """Run several ``basins`` commands in one launch (each: JSON args), capturing each rank's stdout."""
    from basins.cli.main import main

    for i, spec in enumerate(commands):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                main.main(json.loads(spec), standalone_mode=False)
            except SystemExit as exc:  # pragma: no cover - reported through the file
                buf.write(f"\nEXIT {exc.code}")
        (out / f"cli{i}_rank{dist.rank()}.txt").write_text(buf.getvalue())


if __name__ == "__main__":
    _mode, _out = sys.argv[1], Path(sys.argv[2])
    if _mode == "all":
        _worker_engine(_out)
        _worker_cli(_out, *sys.argv[3:])
    elif _mode == "engine":
        _worker_engine(_out)
    elif _mode == "engine-cuda":
        _worker_engine(_out, "cuda")
    elif _mode == "fail":
        _worker_fail(_out)
    elif _mode == "cli":
        _worker_cli(_out, *sys.argv[3:])
    else:
        raise SystemExit(f"unknown worker mode {_mode!r}")
    # end as the basins console script does (basins.cli.__main__.run): the process group torn down,
    # output flushed, then os._exit, so that the C++ destructors of gloo's threads at interpreter
    # teardown cannot abort a finished rank ("terminate called without an active exception", -6)
    from basins.engine import distributed as _dist

    if _dist.is_initialized():
        _dist.teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
