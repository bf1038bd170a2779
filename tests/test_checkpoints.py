"""Several checkpoints in one run, and the Lanczos warm start.

References: ``torch.linalg.eigvalsh`` of dense float64 Hessians (``torch.func.hessian`` of the
explicit full-data loss), and separate one-checkpoint runs of the same command.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from basins.cli.checkpoints import expand_models, output_paths, parse_steps, step_from_name
from basins.cli.main import main
from basins.errors import InputError
from basins.files.report import read_report
from basins.linalg.lanczos import lanczos
from tests.dense import loss_hessian


def _dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return loss_hessian(model, x, y, lambda out, t: ((out - t) ** 2).mean())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Four checkpoints of one float64 training run (a tanh MLP on mse, P = 72) with dense Hessians."""
    from basins.files.loading import save_bundle

    root = tmp_path_factory.mktemp("ckpts")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 2)).double()
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    torch.save({"inputs": x, "targets": y}, root / "data.pt")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dense = {}
    for step in range(1, 401):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if step in (100, 200, 300, 400):
            save_bundle(str(root / f"ckpt_{step}.pt"), model.eval(), x, y, "mse")
            dense[step] = torch.linalg.eigvalsh(_dense_hessian(model, x, y))
            model.train()
    return {"root": root, "data": str(root / "data.pt"), "eig": dense,
            "models": [str(root / f"ckpt_{s}.pt") for s in (100, 200, 300, 400)]}


def _json(args: list[str]) -> tuple[int, object, str]:
    res = CliRunner().invoke(main, args)
    out = res.stdout
    return res.exit_code, (json.loads(out) if out.strip().startswith(("[", "{")) else None), res.stderr


# ---------------------------------------------------------------------- Lanczos warm start
def test_warm_start_equals_cold_and_dense_reference():
    """A warm start from the Ritz vectors of a nearby matrix gives the same eigenvalues as a cold
    start, within the residual bounds, and both contain the dense truth."""
    g = torch.Generator().manual_seed(3)
    P = 300
    Q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))[0]
    spectrum = torch.cat([torch.linspace(10, 5, 12, dtype=torch.float64), torch.rand(P - 12, generator=g,
                                                                                    dtype=torch.float64)])
    A = Q @ torch.diag(spectrum) @ Q.T
    E = torch.randn(P, P, generator=g, dtype=torch.float64)
    B = A + 0.01 * (E + E.T)  # the next checkpoint
    truth = torch.linalg.eigvalsh(B).flip(0)[:6]
    first = lanczos(A, k=6, tol=1e-10, return_eigenvectors=True)
    cold = lanczos(B, k=6, tol=1e-10)
    warm = lanczos(B, k=6, tol=1e-10, start=first.eigenvectors)
    assert cold.all_converged and warm.all_converged
    for r in (cold, warm):
        assert bool(((r.eigenvalues - truth).abs() <= r.residuals + 1e-12 * 10).all())
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=0, atol=1e-9 * 10)


def test_warm_start_finds_an_eigenvalue_new_at_this_matrix():
    """The random half of the warm start: an eigenvector absent from the start is still found."""
    P = 200
    d = torch.linspace(1, 2, P, dtype=torch.float64)
    A = torch.diag(d)
    prev = lanczos(A, k=3, tol=1e-10, return_eigenvectors=True)
    B = A.clone()
    B[0, 0] = 50.0  # a new top eigenvector, orthogonal to every previous Ritz vector
    warm = lanczos(B, k=3, tol=1e-10, start=prev.eigenvectors)
    torch.testing.assert_close(warm.eigenvalues, torch.tensor([50.0, 2.0, d[-2].item()], dtype=torch.float64),
                               rtol=0, atol=1e-8)


def test_warm_start_rejects_bad_shapes():
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(InputError, match="start must be a tensor of shape"):
        lanczos(A, k=2, start=torch.ones(9, 2, dtype=torch.float64))
    with pytest.raises(InputError, match="non-finite"):
        lanczos(A, k=2, start=torch.full((10,), float("nan"), dtype=torch.float64))


# ---------------------------------------------------------------------- names, steps, outputs
def test_steps_from_names_and_flags(tmp_path):
    assert step_from_name("runs/ckpt_000300.pt2") == 300
    assert step_from_name("model.pt") is None
    assert step_from_name("a/epoch3-step120.pt") == 120
    assert parse_steps("0, 5,10", ["a", "b", "c"]) == [0, 5, 10]
    with pytest.raises(InputError, match="2 steps for 3 checkpoints"):
        parse_steps("1,2", ["a", "b", "c"])
    with pytest.raises(InputError, match="not a comma-separated list"):
        parse_steps("1,x", ["a"])
    for n in ("s10.pt", "s2.pt", "notes.txt", ".hidden.pt"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "config.json").write_text("{}")
    models, several = expand_models([str(tmp_path)])  # (the --data file is dropped by the command, below)
    assert several and [m.rsplit("/", 1)[1] for m in models] == ["s2.pt", "checkpoint-5", "s10.pt"]
    with pytest.raises(InputError, match="no file matches"):
        expand_models([str(tmp_path / "nothing*.pt")])
    assert output_paths("-o", str(tmp_path / "r_{step}.h5"), ["a/x1.pt", "a/x2.pt"], [1, 2]) == [
        str(tmp_path / "r_1.h5"), str(tmp_path / "r_2.h5")]
    assert output_paths("-o", str(tmp_path / "out") + "/", ["a/x1.pt"], [1]) == [str(tmp_path / "out" / "x1.h5")]
    with pytest.raises(InputError, match="cannot all write"):
        output_paths("-o", "r.h5", ["a.pt", "b.pt"], [None, None])
    with pytest.raises(InputError, match="would write"):
        output_paths("-o", "{name}.h5", ["a/x.pt", "b/x.pt"], [None, None])


# ---------------------------------------------------------------------- the CLI
def test_several_checkpoints_equal_separate_runs(run_dir, tmp_path):
    """``basins hessian c1 c2 c3 c4`` (shuffled order) equals four separate runs, report for report,
    and each checkpoint's eigenvalues contain the dense truth within their error bounds."""
    models = run_dir["models"]
    shuffled = [models[2], models[0], models[3], models[1]]
    common = ["--data", run_dir["data"], "-k", "4", "--tol", "1e-10", "--hvp", "fwd-rev", "-q"]
    code, many, err = _json(["hessian", *shuffled, *common, "--cold", "--json", "-o", str(tmp_path / "{step}.h5")])
    assert code == 0, err
    assert isinstance(many, list) and [d["step"] for d in many] == [100, 200, 300, 400]  # training order
    for obj, model in zip(many, models):
        code, one, err = _json(["hessian", model, *common, "--json", "-o", str(tmp_path / "one.h5"), "--force"])
        assert code == 0, err
        assert obj["model"] == model and one["step"] == obj["step"]
        assert obj["eigenvalues"] == one["eigenvalues"]  # a cold start: the very same computation
        assert obj["num_lanczos_hvps"] == one["num_lanczos_hvps"]
        truth = run_dir["eig"][obj["step"]].flip(0)[:4].numpy()
        assert np.all(np.abs(np.array(obj["eigenvalues"]) - truth) <= np.array(obj["error_bounds"]))
        a, b = read_report(str(tmp_path / f"{obj['step']}.h5")), read_report(str(tmp_path / "one.h5"))
        assert a["problem"]["model_sha256"] == b["problem"]["model_sha256"] == one["model_sha256"] == obj["model_sha256"]
        assert one["data_sha256"] == a["problem"]["data_sha256"] and one["params"] is None
        assert a["problem"]["loss_at_optimum"] == b["problem"]["loss_at_optimum"]
        assert a["problem"]["step"] == obj["step"]
        np.testing.assert_array_equal(a["analyses"]["hessian"]["datasets"]["eigenvalues"]["values"],
                                      b["analyses"]["hessian"]["datasets"]["eigenvalues"]["values"])


def test_warm_started_checkpoints_agree_with_dense_truth(run_dir):
    models = run_dir["models"]
    code, many, err = _json(["hessian", *models, "--data", run_dir["data"], "-k", "4", "--tol", "1e-10",
                             "--json", "-q"])
    assert code == 0, err
    assert [d["start"] for d in many] == ["random"] + ["warm: the previous checkpoint's Ritz vectors plus a "
                                                       "random vector"] * 3
    # the route is chosen once; later checkpoints only check it works (one product each)
    assert all(d["hvp_route"] == many[0]["hvp_route"] and d["num_setup_hvps"] <= 1 for d in many[1:])
    for obj in many:
        truth = run_dir["eig"][obj["step"]].flip(0)[:4].numpy()
        assert obj["all_converged"]
        assert np.all(np.abs(np.array(obj["eigenvalues"]) - truth) <= np.array(obj["error_bounds"]))


def test_data_loaded_once(run_dir, monkeypatch):
    import basins.files.loading as loading

    calls = []
    original = loading.open_data

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(loading, "open_data", counting)
    code, many, err = _json(["hessian", *run_dir["models"][:3], "--data", run_dir["data"], "-k", "2", "--json", "-q"])
    assert code == 0, err
    assert len(many) == 3 and len(calls) == 1


def test_a_failing_checkpoint_is_reported_and_the_others_run(run_dir, tmp_path):
    bad = tmp_path / "ckpt_250.pt"
    bad.write_bytes(b"not a model")
    code, many, err = _json(["hessian", run_dir["models"][0], str(bad), run_dir["models"][1],
                             "--data", run_dir["data"], "-k", "2", "--json", "-q"])
    assert code == 1
    assert [d["step"] for d in many] == [100, 250, 200] or [d["step"] for d in many] == [100, 200, 250]
    failed = [d for d in many if "error" in d]
    assert len(failed) == 1 and failed[0]["model"] == str(bad) and failed[0]["exit_code"] == 2
    assert all("eigenvalues" in d for d in many if "error" not in d)
    assert "failed: 1 of 3 checkpoints" in err
    code, _, err = _json(["hessian", str(bad), str(bad), "--data", run_dir["data"], "-q"])
    assert code == 2  # every checkpoint failed on bad input


def test_several_checkpoints_need_an_output_template(run_dir):
    code, _, err = _json(["hessian", *run_dir["models"][:2], "--data", run_dir["data"], "-o", "r.h5", "-q"])
    assert code == 2 and "-o: 2 checkpoints cannot all write r.h5" in err
    code, _, err = _json(["hessian", *run_dir["models"][:2], "--data", run_dir["data"], "--steps", "1", "-q"])
    assert code == 2 and "--train-steps: 1 steps for 2 checkpoints" in err
    code, many, err = _json(["nullity", *run_dir["models"][:2], "--data", run_dir["data"], "--steps", "7,3",
                             "--method", "exact", "--json", "-q"])  # --steps: the training steps in every command
    assert code == 0, err
    assert [d["step"] for d in many] == [7, 3]  # given steps keep the given order


def test_table_has_one_row_per_checkpoint(run_dir):
    res = CliRunner().invoke(main, ["hessian", *run_dir["models"][:2], "--data", run_dir["data"], "-k", "2", "-q"])
    assert res.exit_code == 0, res.stderr
    assert "hessian over 2 checkpoints" in res.stdout
    rows = [line for line in res.stdout.splitlines() if "ckpt_" in line]
    assert len(rows) == 2 and "100" in rows[0] and "200" in rows[1]


def test_top_eigenpairs_warm_start_inside_warm_starts():
    """The deflation/top-family eigenpairs: the second checkpoint's call starts warm, and both
    contain the dense truth within their residuals."""
    from basins.analyses.eigen import WarmStarts, top_eigenpairs, warm_starts
    from basins.linalg.operator import as_operator

    g = torch.Generator().manual_seed(5)
    P = 150
    Q = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.linspace(0, 4, P, dtype=torch.float64) ** 2) @ Q.T
    E = torch.randn(P, P, generator=g, dtype=torch.float64)
    store = WarmStarts()
    for M in (A, A + 1e-3 * (E + E.T)):
        with warm_starts(store):
            pairs = top_eigenpairs(as_operator(M), 4, tol=1e-10, vectors=False)
        truth = torch.linalg.eigvalsh(M).flip(0)[:4]
        assert bool(((pairs.eigenvalues - truth).abs() <= pairs.residuals + 1e-9).all())
        assert pairs.eigenvectors.shape[1] == 0  # vectors=False: none returned, though kept for the next
    assert store.warm == 1 and store.calls == 1 and len(store.vectors) == 1


def test_nullity_over_checkpoints_warm_starts_its_deflation(run_dir):
    res = CliRunner().invoke(main, ["nullity", *run_dir["models"][:2], "--data", run_dir["data"], "--method", "slq",
                                    "--probes", "2", "--lanczos-steps", "20", "--deflate", "3", "--json"])
    assert res.exit_code == 0, res.stderr
    assert "Lanczos run(s) warm-started from the previous checkpoint" in res.stderr
    many = json.loads(res.stdout)
    assert [d["step"] for d in many] == [100, 200] and all("counts" in d for d in many)


def test_a_directory_holding_its_data_file(run_dir, tmp_path):
    """``basins hessian run/ --data run/data.pt``: the data file in the folder is not a checkpoint."""
    import shutil

    for m in run_dir["models"][:2]:
        shutil.copy(m, tmp_path)
    shutil.copy(run_dir["data"], tmp_path / "data.pt")
    code, many, err = _json(["hessian", str(tmp_path), "--data", str(tmp_path / "data.pt"), "-k", "2", "--json", "-q"])
    assert code == 0, err
    assert [d["step"] for d in many] == [100, 200]
