"""Counts that are the work done, and float32 error bounds that hold (issue: time to result and
honest error bars).

* ``problem.counters.num_hvps`` equals an independent count of the vectors that went through the
  HVP route functions (route choice, Lanczos, trace and checks included);
* every float32 eigenvalue of ``hessian_eigenvalues`` lies within its ``error_bounds`` of the
  float64 truth, computed independently as ``eigvalsh`` of ``torch.func.hessian`` of the
  explicit loss;
* the route choice costs at most two products and the trace reuses it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.func import functional_call

from basins import Problem
from basins.analyses.hessian import hessian_eigenvalues
from basins.engine import routes as routes_mod
from tests.models import classification_data, cnn_bn, image_data, mlp


@pytest.fixture
def hvp_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Vectors through the route functions: each functional chunk product over the first chunk of a
    pass (or over a timing piece), each graph backward, each float64 check vector."""
    seen: list[int] = []
    chunk_hvp, graph_hvp, f64 = routes_mod.Routes._chunk_hvp, routes_mod.Routes._graph_hvp, routes_mod.float64_products

    def counted_chunk(self, x, y, m, Vd, route):  # type: ignore[no-untyped-def]
        seen.append(next(iter(Vd.values())).shape[0])  # one chunk per pass in these tests
        return chunk_hvp(self, x, y, m, Vd, route)

    def counted_graph(self, V):  # type: ignore[no-untyped-def]
        seen.append(V.shape[1])
        return graph_hvp(self, V)

    def counted_f64(problem, V):  # type: ignore[no-untyped-def]
        seen.append(V.shape[1])
        return f64(problem, V)

    monkeypatch.setattr(routes_mod.Routes, "_chunk_hvp", counted_chunk)
    monkeypatch.setattr(routes_mod.Routes, "_graph_hvp", counted_graph)
    monkeypatch.setattr(routes_mod, "float64_products", counted_f64)
    monkeypatch.setattr("basins.engine.problem.float64_products", counted_f64)
    yield seen


@pytest.mark.parametrize("route", ["auto", "fwd-rev"])
@pytest.mark.parametrize("graph_memory", [None, 0])
def test_num_hvps_is_every_product_computed(hvp_calls: list[int], route: str, graph_memory: int | None) -> None:
    x, y = classification_data(40)
    p = Problem(mlp(), x, y, "cross-entropy", hvp_route=route, graph_memory_bytes=graph_memory)
    setup = p.counters.num_hvps
    assert setup == sum(hvp_calls) and 1 <= setup <= 2  # the route choice: at most two products
    res = hessian_eigenvalues(p, k=3, trace=True, trace_hvps=12, bounds="rescaled")
    assert p.counters.num_hvps == sum(hvp_calls)
    assert res.num_hvps == res.num_lanczos_hvps + res.num_trace_hvps + res.num_check_hvps == sum(hvp_calls) - setup
    assert res.num_check_hvps == 3 and res.num_trace_hvps == 12
    assert p.block_route == p.hvp_route  # the trace's blocks reuse the choice: no re-timing
    before = sum(hvp_calls)
    p.check_eigenpairs(torch.randn(p.num_params, 2))
    assert p.counters.num_hvps == sum(hvp_calls) == before + 2


def _dense_top(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k eigenvalues of the float64 Hessian of the mean cross-entropy, by torch.func.hessian."""
    m = model.double().eval()
    names = [n for n, _ in m.named_parameters()]
    shapes = [q.shape for _, q in m.named_parameters()]
    theta = torch.cat([q.detach().reshape(-1) for _, q in m.named_parameters()])
    buffers = {n: b for n, b in m.named_buffers()}

    def loss(t: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = t[i : i + s.numel()].reshape(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(m, (params, buffers), (x.double(),)), y)

    H = torch.func.hessian(loss)(theta)
    return torch.linalg.eigvalsh((H + H.T) / 2).flip(0)[:k]


@pytest.mark.parametrize("bounds", ["rescaled", "float64"])
@pytest.mark.parametrize("case", ["mlp", "cnn_bn"])
def test_float32_error_bounds_contain_the_float64_eigenvalues(case: str, bounds: str) -> None:
    build, (x, y) = (mlp, classification_data(64)) if case == "mlp" else (cnn_bn, image_data(32))
    k = 4
    ref = _dense_top(build(), x, y, k)
    p = Problem(build(), x, y, "cross-entropy")
    assert p.dtype == torch.float32
    top = hessian_eigenvalues(p, k=k, tol=1e-6, bounds=bounds).top
    assert top is not None and top.error_bounds is not None and bool(top.converged.all())
    err = (top.eigenvalues - ref).abs()
    assert bool((err <= top.error_bounds).all()), (err.tolist(), top.error_bounds.tolist())
    # informative, not vacuous: far below the eigenvalues, and at least the Lanczos residual
    assert bool((top.error_bounds <= 1e-4 * ref[0]).all())
    assert bool((top.error_bounds >= top.residuals).all())


def test_float64_keeps_tight_bounds() -> None:
    x, y = classification_data(64)
    ref = _dense_top(mlp(), x, y, 3)
    p = Problem(mlp(), x, y, "cross-entropy", dtype="float64")
    res = hessian_eigenvalues(p, k=3, tol=1e-10)
    top = res.top
    assert top is not None and top.error_bounds is not None and res.num_check_hvps == 6  # the loss head spread (cross-entropy)
    assert bool(((top.eigenvalues - ref).abs() <= top.error_bounds).all())
    assert bool((top.error_bounds <= 1e-10 * ref[0]).all())  # the residual at tol 1e-10, no rounding term to speak of


def test_bounds_option_is_checked() -> None:
    x, y = classification_data(20)
    p = Problem(mlp(), x, y, "cross-entropy")
    with pytest.raises(Exception, match="unknown bounds"):
        hessian_eigenvalues(p, k=1, bounds="guess")


@pytest.fixture
def work_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Full-data losses, gradients and GGN products, counted at the calls (``loss_many`` of K points
    counts K; a GGN product of K columns counts K), and the same counts when the problem was set up."""
    from basins.engine import curvature
    from basins.engine.problem import Problem as EngineProblem

    seen = {"num_loss_evals": 0, "num_grads": 0, "num_ggn_products": 0}
    at_setup: dict[str, int] = {}
    loss, grad, many, ggn = EngineProblem.loss, EngineProblem.grad, EngineProblem.loss_many, curvature.GGNOperator._matvec

    def counted(name, fn, size=lambda *a, **k: 1):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen[name] += size(*args, **kwargs)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(EngineProblem, "loss", counted("num_loss_evals", loss))
    monkeypatch.setattr(EngineProblem, "grad", counted("num_grads", grad))
    monkeypatch.setattr(EngineProblem, "loss_many", counted("num_loss_evals", many, lambda self, thetas, *a, **k:
                                                            int(thetas.shape[0])))
    monkeypatch.setattr(curvature.GGNOperator, "_matvec", counted("num_ggn_products", ggn, lambda self, V:
                                                                  int(V.shape[1]) if V.dim() == 2 else 1))
    import basins.problems

    open_problem = basins.problems.open_problem

    def opened(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = open_problem(*args, **kwargs)
        at_setup.update(seen)
        return out

    monkeypatch.setattr(basins.problems, "open_problem", opened)
    seen["setup"] = at_setup  # type: ignore[assignment]
    yield seen


COUNTED_COMMANDS = [
    ["hessian", "-k", "3", "--trace", "--trace-hvps", "8"],
    ["hessian", "--per-block", "1", "--trace-hvps", "4"],
    ["spectrum", "--probes", "2", "--lanczos-steps", "12"],
    ["nullity", "--method", "slq", "--probes", "2", "--lanczos-steps", "12", "--deflate", "3"],
    ["nullity", "--method", "exact"],
    ["features", "--gn-probes", "2"],
    ["volume", "--samples", "4", "--compare-quadratic", "--family", "isotropic", "--family", "top", "--top-k", "2"],
    ["llc", "--chains", "2", "--draws", "10", "--burnin", "5", "--minibatch", "8"],
    ["evidence", "--curvature", "both", "--prior-precision", "10", "--method", "slq", "--probes", "2",
     "--lanczos-steps", "4"],
    ["landscape", "--points", "5", "--directions", "top"],
]


@pytest.mark.parametrize("command", COUNTED_COMMANDS, ids=lambda c: "-".join(c[:3]))
def test_every_command_counts_every_product(hvp_calls: list[int], work_calls: dict, tmp_path,
                                            command: list[str]) -> None:
    """Through the CLI: every count in the JSON equals the work counted independently at the calls
    that do it (HVP route functions, loss, gradient, batched loss, GGN product), the set-up's share
    included once and reported as ``num_setup_*``."""
    import json

    from click.testing import CliRunner

    from basins.cli.main import main
    from basins.files.loading import save_bundle

    x, y = classification_data(40)
    save_bundle(str(tmp_path / "m.pt"), mlp().eval(), x, y, "cross-entropy")
    res = CliRunner().invoke(main, [command[0], str(tmp_path / "m.pt"), *command[1:], "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    setup = work_calls.pop("setup")
    assert out["num_hvps"] == sum(hvp_calls) and out["num_setup_hvps"] >= 1
    for name, n in work_calls.items():
        assert out[name] == n, (name, out[name], n)
        assert out[f"num_setup_{name[4:]}"] == setup[name], name
    assert out["num_setup_loss_evals"] >= 1 and out["num_setup_grads"] >= 1  # L(θ*) and ∇L(θ*) at loading
    if command[0] == "hessian" and "--per-block" not in command:
        own = out["num_lanczos_hvps"] + out["num_trace_hvps"] + out["num_check_hvps"]
        assert out["num_setup_hvps"] + own == out["num_hvps"]


LIBRARY_CALLS = {
    "hessian": lambda p: __import__("basins.analyses.hessian", fromlist=["x"]).hessian_eigenvalues(
        p, k=3, trace=True, trace_hvps=8),
    "spectrum": lambda p: __import__("basins.analyses.spectrum", fromlist=["x"]).hessian_spectrum(
        p, num_probes=2, num_steps=12),
    "nullity": lambda p: __import__("basins.analyses.nullity", fromlist=["x"]).nullity(p, method="exact"),
    "features": lambda p: __import__("basins.analyses.features", fromlist=["x"]).feature_analysis(p),
    "landscape": lambda p: __import__("basins.analyses.landscape", fromlist=["x"]).landscape_slice(
        p, num_points=5, directions="top"),
}


@pytest.mark.parametrize("name", sorted(LIBRARY_CALLS))
def test_library_records_count_the_work_done(hvp_calls: list[int], work_calls: dict, name: str) -> None:
    """A Python caller's result record carries the work counted independently at the calls that do
    it, during the call only (the construction's own loss and gradient excluded), never a literal."""
    x, y = classification_data(40)
    p = Problem(mlp().eval(), x, y, loss="cross-entropy")
    hvp_calls.clear()
    before = {k: v for k, v in work_calls.items() if k != "setup"}
    attrs = LIBRARY_CALLS[name](p).record().attrs
    assert attrs["num_hvps"] == sum(hvp_calls)
    for counter, n in work_calls.items():
        if counter != "setup":
            assert attrs[counter] == n - before[counter], (counter, attrs[counter], n - before[counter])
