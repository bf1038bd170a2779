"""``basins landscape``: slices and the line between checkpoints against ``Problem.loss`` at the
same points, dense float64 Hessian eigenvalues for the ``top`` directions, and a fine grid of
``Problem.loss`` for the barrier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from basins import Problem
from basins.analyses.landscape import filter_normalised_direction, landscape_slice, linear_path
from basins.cli.main import main
from basins.errors import InputError
from basins.files.report import read_report


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    return x, torch.sin(x @ torch.tensor([[1.0], [-0.5], [0.3]], dtype=torch.float64))


def _trained(seed: int, steps: int = 300) -> nn.Module:
    x, y = _data()
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
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


def test_1d_slice_equals_problem_loss(problem: Problem) -> None:
    res = landscape_slice(problem, dims=1, num_points=7, extent=0.5, seed=3)
    d = filter_normalised_direction(problem, torch.Generator().manual_seed(3))
    assert res.t is not None and float(res.t[3]) == 0.0
    for t, val in zip(res.t.tolist(), res.loss.tolist()):
        ref = float(problem.loss(problem.theta0 + t * d))
        assert val == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert res.loss[3].item() == pytest.approx(problem.loss_at_optimum, rel=1e-12)
    assert res.num_loss_evals == 7


def test_2d_slice_orientation(problem: Problem) -> None:
    res = landscape_slice(problem, dims=2, num_points=5, extent=0.8, seed=1)
    gen = torch.Generator().manual_seed(1)
    d1, d2 = filter_normalised_direction(problem, gen), filter_normalised_direction(problem, gen)
    assert res.x is not None and res.y is not None and res.loss.shape == (5, 5)
    for i, j in [(0, 4), (4, 0), (1, 3), (2, 2)]:  # asymmetric points: loss[i, j] is at (x[i], y[j])
        ref = float(problem.loss(problem.theta0 + float(res.x[i]) * d1 + float(res.y[j]) * d2))
        assert float(res.loss[i, j]) == pytest.approx(ref, rel=1e-12)
    assert float(res.loss[0, 4]) != pytest.approx(float(res.loss[4, 0]), rel=1e-6)


def test_filter_normalisation(problem: Problem) -> None:
    d = problem.space.unflatten(filter_normalised_direction(problem, torch.Generator().manual_seed(0)))
    theta = problem.space.unflatten(problem.theta0)
    for name in problem.space.names:
        if theta[name].dim() >= 2:
            torch.testing.assert_close(d[name].norm(dim=1), theta[name].norm(dim=1), rtol=1e-12, atol=0)
        else:
            assert bool((d[name] == 0).all())  # biases held fixed (Li et al.'s "ignore biasbn")


def test_top_directions_are_hessian_eigenvectors(problem: Problem) -> None:
    H = problem.dense_hessian().to(torch.float64)
    dense = torch.linalg.eigvalsh(H).flip(0)[:2]
    res = landscape_slice(problem, dims=2, directions="top", num_points=3, extent=0.1)
    assert res.direction_eigenvalues is not None
    torch.testing.assert_close(res.direction_eigenvalues, dense, rtol=1e-6, atol=0)
    assert res.num_hvps > 0 and res.loss[1, 1].item() == pytest.approx(problem.loss_at_optimum, rel=1e-12)


def test_line_to_itself_and_between_two_minima(problem: Problem) -> None:
    same = linear_path(problem, problem.theta0.clone(), num_points=5)
    assert same.barrier == 0.0 and same.same_basin
    x, y = _data()
    other = _trained(7)
    theta_b = problem.space.flatten({n: p.detach() for n, p in other.named_parameters()})
    res = linear_path(problem, theta_b, num_points=21, epsilon=1e-3)
    a = problem.theta0
    fine_t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    fine = torch.tensor([float(problem.loss((1 - t) * a + t * theta_b)) for t in fine_t], dtype=torch.float64)
    assert res.loss_a == pytest.approx(float(fine[0]), rel=1e-12) and res.loss_b == pytest.approx(float(fine[-1]),
                                                                                                   rel=1e-12)
    for t, val in zip(res.t.tolist(), res.loss.tolist()):  # the grid values are Problem.loss at those points
        assert val == pytest.approx(float(problem.loss((1 - t) * a + t * theta_b)), rel=1e-12)
    ref_barrier = float(fine.max()) - max(res.loss_a, res.loss_b)
    assert ref_barrier > 1e-3, "the two minima must be separated by a barrier for this test to mean anything"
    assert res.barrier >= float(res.loss.max()) - max(res.loss_a, res.loss_b)  # refined ≥ grid maximum
    assert res.barrier == pytest.approx(ref_barrier, rel=1e-5)
    assert res.barrier_t == pytest.approx(float(fine_t[int(fine.argmax())]), abs=2e-3)
    assert res.same_basin is False
    with pytest.raises(InputError, match="other must have shape"):
        linear_path(problem, theta_b[:-1])


def test_bad_arguments(problem: Problem) -> None:
    with pytest.raises(InputError, match="dims must be 1 or 2"):
        landscape_slice(problem, dims=3)
    with pytest.raises(InputError, match="num_points"):
        landscape_slice(problem, num_points=1)
    with pytest.raises(InputError, match="unknown directions"):
        landscape_slice(problem, directions="pca")


def test_cli_json_report_summary_and_errors(tmp_path) -> None:
    from basins.files.loading import save_bundle

    x, y = _data()
    save_bundle(str(tmp_path / "a.pt"), _trained(0), x, y, "mse")
    save_bundle(str(tmp_path / "b.pt"), _trained(7), x, y, "mse")
    save_bundle(str(tmp_path / "wide.pt"), nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 1)).double().eval(),
                x, y, "mse")
    run = CliRunner()
    res = run.invoke(main, ["landscape", str(tmp_path / "a.pt"), "--points", "9", "--json", "-q",
                            "-o", str(tmp_path / "r.h5")])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["t"]) == len(out["loss"]) == 9 and out["kind"] == "1d" and out["num_loss_evals"] == 9
    rep = read_report(str(tmp_path / "r.h5"))["analyses"]["landscape"]
    np.testing.assert_array_equal(rep["datasets"]["loss"]["values"], out["loss"])
    res = run.invoke(main, ["landscape", str(tmp_path / "a.pt"), "--dims", "2", "--points", "3", "--json", "-q"])
    out = json.loads(res.stdout)
    assert len(out["x"]) == len(out["y"]) == 3 and np.asarray(out["loss"]).shape == (3, 3)
    res = run.invoke(main, ["landscape", str(tmp_path / "a.pt"), "--to", str(tmp_path / "b.pt"), "--json", "-q",
                            "-o", str(tmp_path / "r.h5")])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"barrier", "barrier_t", "loss_a", "loss_b", "epsilon", "same_basin"} <= set(out)
    summ = run.invoke(main, ["summary", str(tmp_path / "r.h5")])
    assert summ.exit_code == 0 and "barrier" in summ.stdout
    res = run.invoke(main, ["landscape", str(tmp_path / "a.pt"), "--to", str(tmp_path / "wide.pt"), "-q"])
    assert res.exit_code == 2 and "same architecture" in res.stderr and "Traceback" not in res.stderr
    res = run.invoke(main, ["landscape", str(tmp_path / "a.pt"), "--to", str(tmp_path / "b.pt"), "--dims", "2"])
    assert res.exit_code == 2
