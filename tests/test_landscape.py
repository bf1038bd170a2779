"""``basins landscape``: slices and the line between checkpoints against independent references —
``Problem.loss`` at the same points (float64), dense float64 Hessian eigenpairs for the ``top``
directions, an analytic loss along a line (a product of three parameters) for the refined
barrier, and a fine loop of ``Problem.loss`` between two trained tanh networks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from basins import Problem
from basins.analyses.landscape import (
    REFINE_STEPS,
    default_epsilon,
    filter_normalised_direction,
    landscape_slice,
    linear_path,
    slice_grid,
)
from basins.cli.main import main
from basins.errors import InputError
from basins.files.loading import load_parameters_like, save_bundle
from basins.files.report import read_report


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    return x, torch.sin(x @ torch.tensor([[1.0], [-0.5], [0.3]], dtype=torch.float64))


def _trained(seed: int, steps: int = 300, hidden: int = 8) -> nn.Module:
    x, y = _data()
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    for _ in range(steps):
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def problem() -> Problem:
    x, y = _data()
    return Problem(_trained(0), x, y, "mse")


@pytest.fixture(scope="module")
def other() -> nn.Module:
    return _trained(7)


class _Product(nn.Module):
    """``f(x) = a·b·c·x``: with targets ``y = x``, ``L = (abc − 1)²·mean(x²)``; every point with
    ``abc = 1`` is a minimum with ``L = 0``."""

    def __init__(self, a: float, b: float, c: float) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Parameter(torch.tensor([v], dtype=torch.float64)) for v in (a, b, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * self.b * self.c * x


def test_grid_is_uniform_and_contains_zero() -> None:
    torch.testing.assert_close(slice_grid(2.0, 5), torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    even = slice_grid(3.0, 6)  # h = 1: one step short at the top
    torch.testing.assert_close(even, torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    for g in (2, 3, 4, 51, 20):
        grid = slice_grid(0.7, g)
        assert (grid == 0).sum() == 1 and float(grid[0]) == pytest.approx(-0.7, rel=1e-15)
        torch.testing.assert_close(grid.diff(), torch.full((g - 1,), float(grid[1] - grid[0]), dtype=torch.float64))


def test_1d_slice_equals_problem_loss(problem: Problem) -> None:
    evals = problem.counters.num_loss_evals
    res = landscape_slice(problem, dims=1, num_points=7, extent=0.5, seed=3, chunk=3)
    assert problem.counters.num_loss_evals - evals == res.num_loss_evals == 7 and res.num_hvps == 0
    d = filter_normalised_direction(problem, torch.Generator().manual_seed(3))
    assert res.t is not None and float(res.t[3]) == 0.0 and float(res.t[-1]) == 0.5
    for t, val in zip(res.t.tolist(), res.loss.tolist()):
        assert val == pytest.approx(float(problem.loss(problem.theta0 + t * d)), rel=1e-12, abs=1e-15)
    assert res.loss[3].item() == pytest.approx(problem.loss_at_optimum, rel=1e-12)
    assert len(set(res.loss.tolist())) == 7  # a slice that moves: not a constant


def test_2d_slice_orientation(problem: Problem) -> None:
    res = landscape_slice(problem, dims=2, num_points=5, extent=0.8, seed=1, chunk=4)
    gen = torch.Generator().manual_seed(1)
    d1, d2 = filter_normalised_direction(problem, gen), filter_normalised_direction(problem, gen)
    assert res.x is not None and res.y is not None and res.loss.shape == (5, 5) and res.num_loss_evals == 25
    for i, j in [(0, 4), (4, 0), (1, 3), (3, 0), (2, 2)]:  # asymmetric points: loss[i, j] is at (x[i], y[j])
        ref = float(problem.loss(problem.theta0 + float(res.x[i]) * d1 + float(res.y[j]) * d2))
        assert float(res.loss[i, j]) == pytest.approx(ref, rel=1e-12)
    assert float(res.loss[0, 4]) != pytest.approx(float(res.loss[4, 0]), rel=1e-6)
    assert res.direction_cosine == pytest.approx(float(d1 @ d2 / (d1.norm() * d2.norm())), rel=1e-12)
    assert res.direction_norms == pytest.approx([float(d1.norm()), float(d2.norm())], rel=1e-12)


def test_filter_normalisation_per_filter_norms() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = Problem(conv, x, torch.tensor([0, 1, 0, 1, 1]), "cross-entropy", check_determinism=False)
    d = p.space.unflatten(filter_normalised_direction(p, torch.Generator().manual_seed(0)))
    theta = p.space.unflatten(p.theta0)
    for name in p.space.names:
        if theta[name].dim() >= 2:  # every filter (output channel / row) has θ*'s filter norm
            w, v = theta[name].reshape(theta[name].shape[0], -1), d[name].reshape(d[name].shape[0], -1)
            torch.testing.assert_close(v.norm(dim=1), w.norm(dim=1), rtol=1e-12, atol=0)
            assert not torch.allclose(v / v.norm(dim=1, keepdim=True), w / w.norm(dim=1, keepdim=True))
        else:
            assert bool((d[name] == 0).all())  # biases held fixed (Li et al.'s "ignore biasbn")
    assert {theta[n].dim() for n in p.space.names} == {1, 2, 4}


def test_only_selected_parameters_move(problem: Problem) -> None:
    x, y = _data()
    model = _trained(0)
    part = Problem(model, x, y, "mse", params=["2.*"])  # the output layer only
    res = landscape_slice(part, dims=1, num_points=5, extent=0.9, seed=2)
    d = filter_normalised_direction(part, torch.Generator().manual_seed(2))
    full = problem.space.unflatten(problem.theta0.clone())
    assert part.space.names == ["2.weight", "2.bias"]
    for t, val in zip(res.t.tolist(), res.loss.tolist()):  # the same point in the full parameter space
        moved = dict(full, **{"2.weight": full["2.weight"] + t * part.space.unflatten(d)["2.weight"]})
        assert val == pytest.approx(float(problem.loss(problem.space.flatten(moved))), rel=1e-12)


def test_top_directions_are_hessian_eigenvectors(problem: Problem) -> None:
    dense = torch.linalg.eigvalsh(problem.dense_hessian().to(torch.float64)).flip(0)[:2]
    res = landscape_slice(problem, dims=2, directions="top", num_points=3, seed=0)
    assert res.direction_eigenvalues == pytest.approx(dense.tolist(), rel=1e-6)
    assert res.num_hvps > 0 and res.normalisation is None and res.direction_norms == pytest.approx([1.0, 1.0])
    assert res.extent == pytest.approx(2 * math.sqrt(2 * max(problem.loss_at_optimum, 1e-2) / float(dense[1])))
    assert res.loss[1, 1].item() == pytest.approx(problem.loss_at_optimum, rel=1e-12)
    # the curvature along the 1-D slice's direction is λ_max: a central second difference of L
    h = 1e-3
    one = landscape_slice(problem, dims=1, directions="top", num_points=3, extent=h)
    second = float(one.loss[0] + one.loss[2] - 2 * one.loss[1]) / h ** 2
    assert second == pytest.approx(float(dense[0]), rel=1e-4)


def test_line_analytic_barrier() -> None:
    """θa = (1, 1, 1), θb = (−½, −1, 2): abc − 1 = t(t − 1)(3t + 5/2) on the line, so
    L(t) = g(t)²·mean(x²) with g = t(1 − t)(3t + 5/2), maximal at t* = (1 + √91)/18."""
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
    p = Problem(_Product(1.0, 1.0, 1.0), x, x.clone(), "mse")
    theta_b = torch.tensor([-0.5, -1.0, 2.0], dtype=torch.float64)
    res = linear_path(p, theta_b, num_points=11)
    t_star = (1 + math.sqrt(91)) / 18
    mx2 = float((x ** 2).mean())
    exact = (t_star * (1 - t_star) * (3 * t_star + 2.5)) ** 2 * mx2
    assert res.loss_a == 0.0 and res.loss_b == pytest.approx(0.0, abs=1e-28)
    for t, val in zip(res.t.tolist(), res.loss.tolist()):
        assert val == pytest.approx((t * (1 - t) * (3 * t + 2.5)) ** 2 * mx2, rel=1e-12, abs=1e-28)
    assert res.barrier == pytest.approx(exact, rel=1e-10)
    assert res.barrier_t == pytest.approx(t_star, abs=1e-4)
    assert res.barrier > float(res.loss.max())  # refined beyond the grid's best (t = 0.6)
    assert res.num_loss_evals == 11 + REFINE_STEPS and p.counters.num_loss_evals >= res.num_loss_evals
    assert res.epsilon == default_epsilon(0.0, res.loss_b) == 1e-6 and res.same_basin is False
    assert res.line_length == pytest.approx(math.sqrt(1.5 ** 2 + 2 ** 2 + 1), rel=1e-12)


def test_line_ends_are_the_two_models_exactly() -> None:
    """θ(1) is θb itself, not θa + 1·(θb − θa), which rounds (here 0.1 − 2.8e-17 in the first
    coordinate) off the minimum abc = 1 of :class:`_Product`."""
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None]
    p = Problem(_Product(1.0, 1.0, 1.0), x, x.clone(), "mse")
    b = torch.tensor([0.1, 3.0, 1 / (0.1 * 3.0)], dtype=torch.float64)
    assert float(_Product(*b.tolist())(x).detach().sub(x).abs().max()) == 0.0  # θb is an exact minimum
    assert not torch.equal(p.theta0 + 1.0 * (b - p.theta0), b)
    res = linear_path(p, b, num_points=6)
    assert res.loss_a == 0.0 and res.loss_b == 0.0


def test_blocks_never_hold_a_single_point() -> None:
    from basins.analyses.landscape import _blocks

    for num in range(2, 40):
        for chunk in (2, 3, 5, 16):
            sizes = _blocks(num, chunk)
            assert sum(sizes) == num and 1 not in sizes and max(sizes) <= (chunk if chunk > 2 else 3)
        assert _blocks(num, 1) == [1] * num


def test_line_to_itself_and_between_two_minima(problem: Problem, other: nn.Module) -> None:
    same = linear_path(problem, problem.theta0.clone(), num_points=17)  # blocks of 15 + 2 points
    assert same.barrier == 0.0 and same.same_basin is True and same.line_length == 0.0
    assert same.loss_a == same.loss_b == float(same.loss[2]) and len(set(same.loss.tolist())) == 1
    theta_b = problem.space.flatten({n: p.detach() for n, p in other.named_parameters()})
    res = linear_path(problem, theta_b, num_points=21, epsilon=1e-3, chunk=5)
    a = problem.theta0
    fine_t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    fine = torch.tensor([float(problem.loss((1 - t) * a + t * theta_b)) for t in fine_t], dtype=torch.float64)
    assert res.loss_a == pytest.approx(float(fine[0]), rel=1e-12) and res.loss_b == pytest.approx(float(problem.loss(theta_b)), rel=1e-12)
    for t, val in zip(res.t.tolist(), res.loss.tolist()):  # the grid values are Problem.loss at those points
        assert val == pytest.approx(float(problem.loss((1 - t) * a + t * theta_b)), rel=1e-12)
    ref_barrier = float(fine.max()) - max(res.loss_a, res.loss_b)
    assert ref_barrier > 1e-3, "the two minima must be separated by a barrier for this test to mean anything"
    assert res.barrier >= float(res.loss.max()) - max(res.loss_a, res.loss_b)  # refined ≥ grid maximum
    assert res.barrier >= ref_barrier * (1 - 1e-9)  # at least the fine loop's maximum (2001 points)
    assert res.barrier == pytest.approx(ref_barrier, rel=1e-5)
    assert res.barrier_t == pytest.approx(float(fine_t[int(fine.argmax())]), abs=2e-3)
    assert res.same_basin is False and res.epsilon == 1e-3


def test_bad_arguments(problem: Problem) -> None:
    with pytest.raises(InputError, match="dims must be 1 or 2"):
        landscape_slice(problem, dims=3)
    with pytest.raises(InputError, match="num_points must be an integer ≥ 2"):
        landscape_slice(problem, num_points=1)
    with pytest.raises(InputError, match="unknown directions"):
        landscape_slice(problem, directions="pca")
    with pytest.raises(InputError, match="extent must be"):
        landscape_slice(problem, extent=-1.0)
    with pytest.raises(InputError, match="chunk must be"):
        landscape_slice(problem, chunk=0)
    with pytest.raises(InputError, match="other must have shape"):
        linear_path(problem, problem.theta0[:-1])
    with pytest.raises(InputError, match="other has non-finite"):
        linear_path(problem, problem.theta0 * math.inf)
    with pytest.raises(InputError, match="epsilon must be"):
        linear_path(problem, problem.theta0, epsilon=-1.0)
    x = torch.ones(4, 1, dtype=torch.float64)
    with pytest.raises(InputError, match="every selected parameter is one-dimensional"):
        landscape_slice(Problem(nn.Linear(1, 1).double(), x, x, "mse", params=["bias"]))


def test_load_parameters_like(tmp_path, problem: Problem, other: nn.Module) -> None:
    x, y = _data()
    save_bundle(str(tmp_path / "b.pt"), other, x, y, "mse")
    got = load_parameters_like(str(tmp_path / "b.pt"), problem.module, problem.space.names)
    ref = problem.space.flatten({n: p.detach() for n, p in other.named_parameters()})
    torch.testing.assert_close(got.theta, ref, rtol=0, atol=0)
    assert got.differ == [] and len(got.model.sha256) == 64
    part = load_parameters_like(str(tmp_path / "b.pt"), problem.module, ["2.weight"])  # --params 2.weight
    torch.testing.assert_close(part.theta, other[2].weight.detach().reshape(-1), rtol=0, atol=0)
    assert part.differ == ["0.weight", "0.bias", "2.bias"]  # held at MODEL's along the line
    torch.save(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1), nn.Linear(1, 1)).double().state_dict(),
               tmp_path / "extra.pt")
    save_bundle(str(tmp_path / "extra.pt"),
                nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1), nn.Linear(1, 1)).double(), x, y, "mse")
    with pytest.raises(InputError, match=r"has parameter '3.weight', which MODEL lacks \(and 1 more\)"):
        load_parameters_like(str(tmp_path / "extra.pt"), problem.module, problem.space.names)


# ---------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, other: nn.Module) -> dict[str, str]:
    d = tmp_path_factory.mktemp("landscape")
    x, y = _data()
    paths = {k: str(d / f"{k}.pt") for k in ("a", "b", "wide")}
    save_bundle(paths["a"], _trained(0), x, y, "mse")
    save_bundle(paths["b"], other, x, y, "mse")
    save_bundle(paths["wide"], nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 1)).double().eval(), x, y, "mse")
    paths["dir"] = str(d)
    return paths


def _run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(main, ["landscape", *args])
    return res.exit_code, res.stdout, res.stderr


def test_cli_1d_json_report_and_summary(bundles: dict[str, str], problem: Problem) -> None:
    report = bundles["dir"] + "/r1.h5"
    code, out, err = _run(bundles["a"], "--points", "9", "--seed", "4", "--json", "-q", "-o", report)
    assert code == 0, err
    obj = json.loads(out)
    assert {"t", "loss", "directions", "extent", "num_loss_evals", "num_hvps", "wall_seconds", "num_params",
            "loss_at_optimum", "normalisation", "seed"} <= set(obj)
    assert len(obj["t"]) == len(obj["loss"]) == 9 and obj["kind"] == "1d"
    assert obj["num_loss_evals"] == 9 + obj["num_setup_loss_evals"]  # the set-up's evaluations included
    assert obj["directions"] == "random" and obj["normalisation"] == "filter" and obj["extent"] == 1.0
    d = filter_normalised_direction(problem, torch.Generator().manual_seed(4))  # same model, same seed
    for t, val in zip(obj["t"], obj["loss"]):
        assert val == pytest.approx(float(problem.loss(problem.theta0 + t * d)), rel=1e-12)
    group = read_report(report)["analyses"]["landscape"]
    attrs = group["attrs"]
    for key in ("kind", "directions", "normalisation", "extent", "num_points", "seed", "loss_at_optimum",
                "num_loss_evals", "num_hvps", "wall_seconds"):
        assert key in attrs, key
    assert attrs["kind"] == "1d" and attrs["num_points"] == 9 and attrs["seed"] == 4
    assert set(group["datasets"]) == {"t", "loss"}
    np.testing.assert_array_equal(group["datasets"]["loss"]["values"], obj["loss"])
    assert "filter-normalised" in group["datasets"]["t"]["units"]
    summ = CliRunner().invoke(main, ["summary", report])
    assert summ.exit_code == 0 and "landscape (1d, random)" in summ.stdout and "loss along t" in summ.stdout


def test_cli_2d_and_top(bundles: dict[str, str]) -> None:
    report = bundles["dir"] + "/r2.h5"
    code, out, err = _run(bundles["a"], "--dims", "2", "--directions", "top", "--points", "4", "--json", "-q",
                          "-o", report)
    assert code == 0, err
    obj = json.loads(out)
    assert len(obj["x"]) == len(obj["y"]) == 4 and np.asarray(obj["loss"]).shape == (4, 4)
    assert obj["x"][2] == 0.0 and obj["directions"] == "top" and len(obj["direction_eigenvalues"]) == 2
    assert obj["num_hvps"] >= obj["num_landscape_hvps"] > 0 and obj["num_loss_evals"] == 16 + obj["num_setup_loss_evals"]
    group = read_report(report)["analyses"]["landscape"]
    assert group["attrs"]["kind"] == "2d" and np.asarray(group["datasets"]["loss"]["values"]).shape == (4, 4)
    assert list(group["attrs"]["direction_eigenvalues"]) == pytest.approx(obj["direction_eigenvalues"])
    assert "Euclidean" in group["datasets"]["x"]["units"]
    summ = CliRunner().invoke(main, ["summary", report])
    assert summ.exit_code == 0 and "direction eigenvalues" in summ.stdout


def test_cli_line(bundles: dict[str, str], problem: Problem, other: nn.Module) -> None:
    report = bundles["dir"] + "/r3.h5"
    code, out, err = _run(bundles["a"], "--to", bundles["b"], "--points", "11", "--json", "-q", "-o", report)
    assert code == 0, err
    obj = json.loads(out)
    assert {"t", "loss", "barrier", "barrier_t", "loss_a", "loss_b", "epsilon", "same_basin", "directions",
            "extent", "num_loss_evals", "num_hvps", "wall_seconds"} <= set(obj)
    theta_b = problem.space.flatten({n: p.detach() for n, p in other.named_parameters()})
    lib = linear_path(problem, theta_b, num_points=11)
    assert obj["barrier"] == pytest.approx(lib.barrier, rel=1e-12) and obj["barrier_t"] == lib.barrier_t
    assert obj["loss_b"] == pytest.approx(float(problem.loss(theta_b)), rel=1e-12)
    assert obj["same_basin"] is False and obj["epsilon"] == pytest.approx(default_epsilon(obj["loss_a"], obj["loss_b"]))
    assert obj["num_loss_evals"] == 11 + REFINE_STEPS + obj["num_setup_loss_evals"] and obj["kind"] == "line" and obj["directions"] == "line"
    attrs = read_report(report)["analyses"]["landscape"]["attrs"]
    for key in ("other_model", "other_model_sha256", "barrier", "barrier_t", "loss_a", "loss_b", "epsilon",
                "same_basin"):
        assert key in attrs, key
    assert attrs["other_model"] == bundles["b"] and len(attrs["other_model_sha256"]) == 64
    summ = CliRunner().invoke(main, ["summary", report])
    assert summ.exit_code == 0 and "barrier" in summ.stdout and "one basin" in summ.stdout
    code, out, err = _run(bundles["a"], "--to", bundles["a"], "--points", "5", "--json", "-q")
    assert code == 0 and json.loads(out)["barrier"] == 0.0 and json.loads(out)["same_basin"] is True


def test_cli_several_models_to_one(bundles: dict[str, str]) -> None:
    code, out, err = _run(bundles["a"], bundles["b"], "--to", bundles["b"], "--points", "5", "--json", "-q")
    assert code == 0, err
    objs = json.loads(out)
    assert [o["model"] for o in objs] == [bundles["a"], bundles["b"]]
    assert objs[0]["barrier"] > 0 and objs[1]["barrier"] == 0.0


@pytest.mark.parametrize("args, message", [
    (["--to", "{wide}"], "parameter '0.weight' has shape (9, 3), MODEL's has (8, 3)"),
    (["--to", "{b}", "--dims", "2"], "--to draws the line between two checkpoints: it takes no --dims"),
    (["--to", "{b}", "--extent", "2"], "it takes no --extent"),
    (["--barrier-tol", "0.1"], "--barrier-tol is the one-basin tolerance of --to"),
    (["--to", "{dir}/missing.pt"], "missing.pt"),
])
def test_cli_bad_input_exits_2_with_one_line(bundles: dict[str, str], args: list[str], message: str) -> None:
    code, out, err = _run(bundles["a"], *[a.format(**bundles) for a in args], "-q")
    assert code == 2 and out == "" and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_points_below_two_is_usage_error(bundles: dict[str, str]) -> None:
    code, _, err = _run(bundles["a"], "--points", "1")
    assert code == 2 and "--points" in err


@pytest.mark.slow
def test_cli_on_the_example_bundle(tmp_path) -> None:
    """The bundle ``basins example`` writes, in float64: the slice is ``Problem.loss`` at its points."""
    from basins.files.example import make_example
    from basins.files.loading import load_bundle

    path = make_example(str(tmp_path / "ex"))
    code, out, err = _run(path, "--points", "5", "--extent", "0.5", "--dtype", "float64", "--json", "-q")
    assert code == 0, err
    obj = json.loads(out)
    bundle = load_bundle(path)
    p = Problem(bundle.model.module, bundle.data.inputs, bundle.data.targets, bundle.loss, dtype="float64")
    d = filter_normalised_direction(p, torch.Generator().manual_seed(0))
    assert obj["loss"][2] == pytest.approx(p.loss_at_optimum, rel=1e-12)
    for t, val in zip(obj["t"], obj["loss"]):
        assert val == pytest.approx(float(p.loss(p.theta0 + t * d)), rel=1e-10)
    assert max(obj["loss"]) > 2 * obj["loss"][2]  # an extent that leaves the minimum's neighbourhood
