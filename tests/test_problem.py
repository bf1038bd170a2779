"""The Problem engine against dense float64 references (torch.func.hessian of the explicit loss)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from basins import ComputeError, InputError, Problem
from basins.engine.losses import BUILTIN_LOSSES

RTOL = 1e-8
ROUTES = ("graph", "fwd-rev", "rev-rev")


class SmallCNN(nn.Module):
    """conv → BatchNorm → ReLU-free tanh → linear, on 1×6×6 inputs, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def tanh_regression() -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    x = torch.randn(23, 4, generator=g, dtype=torch.float64)
    y = torch.randn(23, 2, generator=g, dtype=torch.float64)
    return model, x, y, "mse"


def cnn_bn_classification() -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    torch.manual_seed(1)
    model = SmallCNN().double()
    with torch.no_grad():  # non-trivial running statistics, used in eval mode
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(19, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (19,), generator=g)
    return model, x, y, "cross-entropy"


def exported_fixed_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor, str, nn.Module]:
    """A .pt2 exported with a static batch of 8, used on n = 21 (remainder 5)."""
    model, _, _, _ = tanh_regression()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(21, 4, generator=g, dtype=torch.float64)
    y = torch.randn(21, 2, generator=g, dtype=torch.float64)
    buf = io.BytesIO()
    torch.export.save(torch.export.export(model, (x[:8],)), buf)
    buf.seek(0)
    return torch.export.load(buf).module(), x, y, "mse", model


def dense_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, problem: Problem) -> torch.Tensor:
    """Dense float64 Hessian of the explicit full-data loss (model in eval mode)."""
    model = model.eval()
    buffers = dict(model.named_buffers())
    names = [n for n, _ in model.named_parameters()]
    fn = BUILTIN_LOSSES[loss]
    target = y if loss != "mse" or y.shape == (x.shape[0], 2) else y

    def full_loss(theta: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, problem.space.unflatten(theta).values()))
        return fn(functional_call(model, (params, buffers), (x,)), target)

    return torch.func.hessian(full_loss)(problem.theta0)


CASES = {
    "tanh-mlp-regression": tanh_regression,
    "cnn-batchnorm-classification": cnn_bn_classification,
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[Problem, torch.Tensor]:
    model, x, y, loss = CASES[request.param]()
    problem = Problem(model, x, y, loss, dtype="float64")
    return problem, dense_reference(model, x, y, loss, problem)


def _vectors(P: int, k: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("route", ROUTES)
def test_hvp_matches_dense_hessian(case: tuple[Problem, torch.Tensor], route: str) -> None:
    problem, H = case
    V = _vectors(problem.num_params, 3)
    for j in range(3):
        torch.testing.assert_close(problem.hvp_with_route(V[:, j], route), H @ V[:, j], rtol=RTOL, atol=RTOL * H.abs().max())


@pytest.mark.parametrize("route", ROUTES)
def test_block_hvp_equals_single_hvps(case: tuple[Problem, torch.Tensor], route: str) -> None:
    problem, _ = case
    V = _vectors(problem.num_params, 5)
    block = problem.hvp_with_route(V, route)
    singles = torch.stack([problem.hvp_with_route(V[:, j], route) for j in range(5)], dim=1)
    torch.testing.assert_close(block, singles, rtol=1e-12, atol=1e-12)


def test_hvp_symmetry(case: tuple[Problem, torch.Tensor]) -> None:
    problem, _ = case
    u, v = _vectors(problem.num_params, 2).unbind(1)
    assert torch.dot(u, problem.hvp(v)).item() == pytest.approx(torch.dot(v, problem.hvp(u)).item(), rel=1e-10)


@pytest.mark.parametrize("batch_size", [1, 5, 7, 1000])
def test_chunked_equals_unchunked(batch_size: int) -> None:
    model, x, y, loss = cnn_bn_classification()
    whole = Problem(model, x, y, loss, dtype="float64")
    chunked = Problem(model, x, y, loss, dtype="float64", batch_size=batch_size)
    V = _vectors(whole.num_params, 2)
    assert chunked.loss_at_optimum == pytest.approx(whole.loss_at_optimum, rel=1e-12)
    torch.testing.assert_close(chunked.grad(), whole.grad(), rtol=1e-10, atol=1e-12)
    for route in ROUTES:
        torch.testing.assert_close(chunked.hvp_with_route(V, route), whole.hvp(V), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("route", ROUTES)
def test_fixed_batch_export_with_remainder(route: str) -> None:
    exported, x, y, loss, original = exported_fixed_batch()
    with pytest.raises((RuntimeError, AssertionError, ValueError)):  # the export is static: it refuses another batch size
        exported(x)
    problem = Problem(exported, x, y, loss, fixed_batch_size=8, dtype="float64")
    assert problem.batch_size == 8 and problem.num_examples == 21
    H = dense_reference(original, x, y, loss, problem)
    V = _vectors(problem.num_params, 2)
    torch.testing.assert_close(problem.hvp_with_route(V, route), H @ V, rtol=RTOL, atol=RTOL * H.abs().max())
    expected = BUILTIN_LOSSES[loss](original(x), y).item()
    assert problem.loss_at_optimum == pytest.approx(expected, rel=1e-12)


def test_dense_hessian_and_gradient(case: tuple[Problem, torch.Tensor]) -> None:
    problem, H = case
    torch.testing.assert_close(problem.dense_hessian(block=4), H, rtol=RTOL, atol=RTOL * H.abs().max())
    assert problem.counters.num_hvps >= problem.num_params


def test_loss_many_equals_separate_evaluations(case: tuple[Problem, torch.Tensor]) -> None:
    problem, _ = case
    thetas = problem.theta0 + 0.05 * _vectors(problem.num_params, 6).T
    separate = torch.stack([problem.loss(t) for t in thetas])
    before = problem.counters.num_loss_evals
    batched = problem.loss_many(thetas, chunk=4)
    assert problem.counters.num_loss_evals == before + 6
    torch.testing.assert_close(batched, separate, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(problem.loss_many(thetas, route="loop"), separate, rtol=1e-12, atol=1e-14)


def test_loss_many_on_fixed_batch_export() -> None:
    exported, x, y, loss, original = exported_fixed_batch()
    problem = Problem(exported, x, y, loss, fixed_batch_size=8, dtype="float64")
    thetas = problem.theta0 + 0.1 * _vectors(problem.num_params, 3).T
    torch.testing.assert_close(problem.loss_many(thetas), torch.stack([problem.loss(t) for t in thetas]), rtol=1e-12, atol=1e-14)


def test_float32_problem_matches_float64_roughly() -> None:
    model, x, y, loss = tanh_regression()
    p64 = Problem(model, x, y, loss, dtype="float64")
    p32 = Problem(model, x.float(), y.float(), loss, dtype="float32")
    assert p32.dtype == torch.float32 and p32.theta0.dtype == torch.float32
    v = _vectors(p64.num_params, 1)[:, 0]
    torch.testing.assert_close(p32.hvp(v).double(), p64.hvp(v), rtol=1e-4, atol=1e-5)


def test_counters_and_sizes() -> None:
    model, x, y, loss = tanh_regression()
    problem = Problem(model, x, y, loss, dtype="float64", hvp_route="fwd-rev")
    problem.counters.num_hvps = 0
    problem.hvp(_vectors(problem.num_params, 4))
    assert problem.counters.num_hvps == 4
    assert problem.num_params == 7 * 4 + 7 + 2 * 7 + 2
    assert problem.num_examples == 23 and problem.hvp_route == "fwd-rev"
    assert problem.num_terms == 23 * 2


def test_auto_route_is_measured() -> None:
    model, x, y, loss = tanh_regression()
    problem = Problem(model, x, y, loss, dtype="float64")
    assert problem.hvp_route in ROUTES
    assert problem.hvp_route == min(problem.route_timings, key=problem.route_timings.__getitem__)


def test_user_loss_with_mse_mean_falls_back_to_a_working_route() -> None:
    """F.mse_loss(reduction='mean') breaks jvp(grad) in torch 2.13; auto must still work."""
    model, x, y, _ = tanh_regression()
    problem = Problem(model, x, y, torch.nn.functional.mse_loss, dtype="float64", graph_memory_bytes=0)
    reference = Problem(model, x, y, "mse", dtype="float64")
    v = _vectors(problem.num_params, 1)[:, 0]
    torch.testing.assert_close(problem.hvp(v), reference.hvp(v), rtol=1e-10, atol=1e-12)


def test_saved_bytes_counts_each_saved_storage_once() -> None:
    """``saved_bytes`` against a count by hand: mul saves both factors, tanh its result; a tensor
    saved twice (x * x) counts once."""
    from basins.engine.routes import saved_bytes

    x = torch.randn(100, requires_grad=True)
    w = torch.randn(100, dtype=torch.float64).float().requires_grad_(True)
    assert saved_bytes(torch.tanh(x * w).sum()) == 3 * 100 * 4
    assert saved_bytes((x * x).sum()) == 100 * 4
    assert saved_bytes((x + w).sum()) == 0  # an addition saves nothing


def test_one_fixed_batch_chunk_builds_its_graph_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the timing piece would be all the data (one chunk of a fixed-batch model), the graph is
    built once and measured, not estimated on a throwaway copy; over a tiny budget it is dropped."""
    from basins.engine import routes

    def no_estimate(self: object) -> int:
        raise AssertionError("the throwaway estimate pass ran")

    monkeypatch.setattr(routes.Routes, "graph_bytes", no_estimate)
    model, x, y, loss = tanh_regression()
    n = x.shape[0]
    problem = Problem(model, x, y, loss, dtype="float64", fixed_batch_size=n)
    assert problem.hvp_route == "graph"
    reference = Problem(model, x, y, loss, dtype="float64", hvp_route="fwd-rev")
    v = _vectors(problem.num_params, 1)[:, 0]
    torch.testing.assert_close(problem.hvp(v), reference.hvp(v), rtol=1e-10, atol=1e-12)
    small = Problem(model, x, y, loss, dtype="float64", fixed_batch_size=n, graph_memory_bytes=1)
    assert small.hvp_route != "graph" and "budget" in small.routes.errors["graph"]


class AlwaysDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.lin(x), p=0.5, training=True)


def test_nondeterministic_model_is_refused() -> None:
    _, x, y, _ = tanh_regression()
    with pytest.raises(InputError, match="not a deterministic function"):
        Problem(AlwaysDropout().double(), x, y, "mse")


class LogOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.lin(x) - 1e6)  # log of a negative number: NaN


def test_non_finite_loss_is_a_compute_error() -> None:
    _, x, y, _ = tanh_regression()
    with pytest.raises(ComputeError, match="loss at the saved parameters is nan"):
        Problem(LogOutputs().double(), x, y, "mse")


def test_input_errors_name_the_problem() -> None:
    model, x, y, _ = tanh_regression()
    with pytest.raises(InputError, match=r"rejected inputs of shape \(batch, 5\)"):
        Problem(model, torch.randn(23, 5, dtype=torch.float64), y, "mse")
    with pytest.raises(InputError, match="needs integer class indices"):
        Problem(model, x, y[:, 0], "cross-entropy")
    with pytest.raises(InputError, match="needs class probabilities"):
        Problem(model, x, y, "cross-entropy")  # float targets of the outputs' shape, not probabilities
    with pytest.raises(InputError, match="targets of the outputs' shape"):
        Problem(model, x, torch.randn(23, 3, dtype=torch.float64), "mse")
    with pytest.raises(InputError, match="23 examples but targets have 22"):
        Problem(model, x, y[:22], "mse")
    with pytest.raises(InputError, match="unknown loss"):
        Problem(model, x, y, "hinge")
    with pytest.raises(InputError, match="class indices in"):
        Problem(nn.Linear(4, 3).double(), x, torch.full((23,), 5), "cross-entropy")
    with pytest.raises(InputError, match="unknown hvp_route"):
        Problem(model, x, y, "mse", hvp_route="fast")


def test_loss_is_inferred_from_targets() -> None:
    model, x, y, _ = tanh_regression()
    assert Problem(model, x, y).loss_name == "mse"
    cnn, cx, cy, _ = cnn_bn_classification()
    assert Problem(cnn, cx, cy).loss_name == "cross-entropy"


def test_soft_label_cross_entropy_matches_torch() -> None:
    model, x, _, _ = tanh_regression()
    probs = torch.softmax(torch.randn(23, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64), 1)
    problem = Problem(model, x, probs, "cross-entropy", dtype="float64")
    expected = torch.nn.functional.cross_entropy(model.eval()(x), probs).item()
    assert problem.loss_at_optimum == pytest.approx(expected, rel=1e-12)
