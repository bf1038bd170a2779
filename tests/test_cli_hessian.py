"""``basins hessian``: eigenvalues against a dense float64 Hessian, saddles, trace, JSON, reports, exit codes.

Bundles are built here with :func:`basins.files.loading.save_bundle` from small float64 models; the dense
reference is ``torch.func.hessian`` of the explicit full-data loss of the original module.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from basins.cli.main import main
from basins.files.report import read_report
from tests.dense import loss_hessian

TOP_RTOL = 1e-6  # top-k: relative error against eigvalsh
BOTTOM_ATOL = 1e-6  # bottom-k: absolute error, in units of λ_max


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A tanh MLP regression (P = 72) and a two-layer linear net at a saddle (weights 0)."""
    from basins.files.loading import save_bundle

    root = tmp_path_factory.mktemp("bundles")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 2)).double().eval()
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    save_bundle(str(root / "mlp.pt"), mlp, x, y, "mse")
    H = loss_hessian(mlp, x, y, _mse)

    saddle = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 1)).double().eval()
    xs = torch.randn(30, 3, generator=g, dtype=torch.float64)
    ys = xs @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    with torch.no_grad():
        saddle[0].weight.zero_()
        saddle[1].weight.zero_()
        saddle[1].bias.fill_(float(ys.mean()))  # ∇L = 0 exactly: a critical point, not a minimum
    save_bundle(str(root / "saddle.pt"), saddle, xs, ys, "mse")
    Hs = loss_hessian(saddle, xs, ys, _mse)

    # another problem (other data) for the "report of another problem" checks
    save_bundle(str(root / "other.pt"), mlp, x[:30], y[:30], "mse")
    return {"root": root, "mlp": str(root / "mlp.pt"), "eig": torch.linalg.eigvalsh(H), "H": H,
            "saddle": str(root / "saddle.pt"), "saddle_eig": torch.linalg.eigvalsh(Hs), "other": str(root / "other.pt")}


def run(*args: str):
    return CliRunner().invoke(main, ["hessian", *args])


def run_json(*args: str) -> dict:
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_top10_matches_dense(bundles):
    out = run_json(bundles["mlp"], "--dtype", "float64", "--tol", "1e-10")
    ref = bundles["eig"].flip(0)[:10].tolist()
    got = out["eigenvalues"]
    assert len(got) == 10 and got == sorted(got, reverse=True)
    np.testing.assert_allclose(got, ref, rtol=TOP_RTOL, atol=0)
    assert all(out["converged"]) and out["all_converged"]
    assert all(r <= 1e-10 * ref[0] * 1.0001 for r in out["residuals"])
    for key in ("eigenvalues", "residuals", "converged", "num_params", "num_examples", "num_hvps", "wall_seconds",
                "trace", "trace_stderr", "report", "is_saddle", "loss_at_optimum", "grad_norm", "which", "tol"):
        assert key in out, key
    assert out["num_params"] == 72 and out["num_examples"] == 40 and out["dtype"] == "float64"
    assert out["report"] is None and out["trace"] is None and out["is_saddle"] is None  # top only: not checked
    assert 10 <= out["num_hvps"] <= 200 and out["wall_seconds"] > 0


def test_bottom5_and_both(bundles):
    lam_max = float(bundles["eig"][-1])
    bottom = bundles["eig"][:5].tolist()
    out = run_json(bundles["mlp"], "--dtype", "float64", "--tol", "1e-10", "--which", "bottom", "-k", "5")
    assert out["eigenvalues"] == sorted(out["eigenvalues"])
    np.testing.assert_allclose(out["eigenvalues"], bottom, rtol=0, atol=BOTTOM_ATOL * lam_max)
    assert "bottom_eigenvalues" not in out

    out = run_json(bundles["mlp"], "--dtype", "float64", "--tol", "1e-10", "--which", "both", "-k", "5")
    np.testing.assert_allclose(out["eigenvalues"], bundles["eig"].flip(0)[:5].tolist(), rtol=TOP_RTOL)
    np.testing.assert_allclose(out["bottom_eigenvalues"], bottom, rtol=0, atol=BOTTOM_ATOL * lam_max)
    assert len(out["bottom_residuals"]) == 5 and len(out["bottom_converged"]) == 5
    assert out["lambda_max"] == out["eigenvalues"][0] and out["lambda_min"] == out["bottom_eigenvalues"][0]
    assert out["is_saddle"] == (bottom[0] < 0)


def test_saddle_reported(bundles):
    ref = bundles["saddle_eig"]
    assert float(ref[0]) < -1e-2  # the construction really is a saddle
    r = run(bundles["saddle"], "--which", "bottom", "-k", "2", "--json", "--tol", "1e-10")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["grad_norm"] < 1e-12
    assert out["is_saddle"] is True and out["eigenvalues"][0] < 0
    np.testing.assert_allclose(out["eigenvalues"][0], float(ref[0]), rtol=1e-8)
    assert "saddle" in r.stderr and "negative curvature" in " ".join(r.stderr.split())
    assert any("saddle" in w for w in out["warnings"])
    r = run(bundles["saddle"], "--which", "both", "-k", "1")  # the table says it too
    assert r.exit_code == 0 and "negative curvature" in r.stdout

    out = run_json(bundles["mlp"], "--which", "bottom", "-k", "1", "--tol", "1e-10")
    assert out["is_saddle"] is (float(bundles["eig"][0]) < 0)


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace(bundles, method):
    out = run_json(bundles["mlp"], "--trace", "--trace-method", method, "--trace-hvps", "60", "-k", "1")
    exact = float(bundles["H"].trace())
    assert out["trace_method"] == method and out["trace_stderr"] > 0
    assert abs(out["trace"] - exact) <= 5 * out["trace_stderr"] + 1e-9 * abs(exact)
    parts = ("num_setup_hvps", "num_lanczos_hvps", "num_trace_hvps", "num_check_hvps")
    assert out["num_hvps"] == sum(out[k] for k in parts)  # every HVP computed (the count itself: test_counts.py)
    assert 0 < out["num_trace_hvps"] <= 60


def test_table_output_and_help(bundles):
    r = run(bundles["mlp"], "-k", "3", "--trace")
    assert r.exit_code == 0, r.output
    for text in ("top eigenvalues", "λ_max", "± residual", "converged", "trace", "HVPs"):
        assert text in r.stdout, text
    assert "P = 72" in r.stderr and "P = 72" not in r.stdout  # logs on stderr only
    r = CliRunner().invoke(main, ["hessian", "--help"])
    assert r.exit_code == 0 and "--top-k" in r.stdout and "basins hessian model.pt" in r.stdout


def test_report_written_replaced_and_summarised(bundles, tmp_path, monkeypatch):
    report = str(tmp_path / "r.h5")
    monkeypatch.setattr(sys, "argv", ["basins", "hessian", "mlp.pt", "-o", "r.h5"])  # argv() reads sys.argv
    out = run_json(bundles["mlp"], "--which", "both", "-k", "3", "--trace", "--eigenvectors", "-o", report)
    assert out["report"] == report
    rep = read_report(report)
    h = rep["analyses"]["hessian"]
    assert h["attrs"]["replaced"] == 0 and h["attrs"]["which"] == "both" and h["attrs"]["top_k"] == 3
    assert h["attrs"]["num_hvps"] == out["num_hvps"] and h["attrs"]["argv"] == "basins hessian mlp.pt -o r.h5"
    assert h["attrs"]["trace"] == out["trace"] and h["attrs"]["is_saddle"] == out["is_saddle"]
    for name in ("eigenvalues", "residuals", "converged", "bottom_eigenvalues", "bottom_residuals", "bottom_converged"):
        np.testing.assert_array_equal(h["datasets"][name]["values"], out[name])
        assert h["datasets"][name]["description"]
    assert h["datasets"]["eigenvalues"]["units"] == "loss / parameter²"
    vecs = h["datasets"]["eigenvectors"]["values"]
    assert vecs.shape == (72, 3) and vecs.dtype == np.float32
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(3), atol=1e-5)
    assert h["datasets"]["bottom_eigenvectors"]["values"].shape == (72, 3)
    assert rep["problem"]["num_params"] == 72 and rep["problem"]["loss"] == "mse"
    assert rep["problem"]["grad_norm"] == out["grad_norm"]

    run_json(bundles["mlp"], "-k", "2", "-o", report)  # re-run: the group is replaced, and says so
    h = read_report(report)["analyses"]["hessian"]
    assert h["attrs"]["replaced"] == 1 and h["attrs"]["which"] == "top" and "bottom_eigenvalues" not in h["datasets"]

    s = CliRunner().invoke(main, ["summary", report])
    assert s.exit_code == 0 and "λ_max" in s.stdout and "replaced" in s.stdout


def test_report_of_another_problem(bundles, tmp_path):
    report = str(tmp_path / "r.h5")
    run_json(bundles["mlp"], "-k", "1", "-o", report)
    before = open(report, "rb").read()
    r = run(bundles["other"], "-k", "1", "-o", report, "--json")
    assert r.exit_code == 2 and "another problem" in r.stderr and "--force" in r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert open(report, "rb").read() == before
    out = run_json(bundles["other"], "-k", "1", "-o", report, "--force")
    assert read_report(report)["problem"]["num_examples"] == 30 == out["num_examples"]


@pytest.mark.parametrize("kind", ["random", "foreign", "schema"])
def test_bad_report_target_exit_2(bundles, tmp_path, kind):
    import h5py

    report = str(tmp_path / "r.h5")
    if kind == "random":
        with open(report, "wb") as f:
            f.write(os.urandom(2048))
        message = "not an HDF5 file"
    elif kind == "foreign":
        with h5py.File(report, "w") as f:
            f["x"] = np.zeros(2)
        message = "not a basins report"
    else:
        run_json(bundles["mlp"], "-k", "1", "-o", report)
        with h5py.File(report, "a") as f:
            f.attrs["schema_version"] = 42
        message = "schema version 42"
    before = open(report, "rb").read()
    r = run(bundles["mlp"], "-k", "1", "-o", report, "--force")
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert "HVPs in" not in r.stderr  # refused before the computation
    assert open(report, "rb").read() == before


def test_strict_and_unconverged(bundles):
    args = [bundles["mlp"], "--tol", "1e-12", "--max-hvps", "10", "--json"]
    r = run(*args)
    assert r.exit_code == 0 and "did not converge" in r.stderr
    out = json.loads(r.stdout)
    assert out["all_converged"] is False and out["num_lanczos_hvps"] <= 10  # --max-hvps is the Lanczos budget
    assert out["num_hvps"] == out["num_setup_hvps"] + out["num_lanczos_hvps"] + out["num_check_hvps"]
    r = run(*args, "--strict")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["all_converged"] is False  # the result is still printed
    assert "--strict" in r.stderr and "Traceback" not in r.stderr


def test_input_errors_exit_2(bundles, tmp_path):
    r = run(str(tmp_path / "missing.pt"), "--json")
    assert r.exit_code == 2 and r.stdout == "" and "missing.pt" in r.stderr and "Traceback" not in r.stderr
    r = run(bundles["mlp"], "-k", "500")
    assert r.exit_code == 2 and "500" in r.stderr
    r = run(bundles["mlp"], "--which", "sideways")
    assert r.exit_code == 2
    r = run(bundles["mlp"], "-o", str(tmp_path / "no-such-dir" / "r.h5"))
    assert r.exit_code == 2 and "does not exist" in r.stderr


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "basins.cli", *args]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_debug_shows_traceback(tmp_path):
    missing = str(tmp_path / "missing.pt")
    r = subprocess.run(_cli("hessian", missing), capture_output=True, text=True, timeout=120, env=_ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    r = subprocess.run(_cli("--debug", "hessian", missing), capture_output=True, text=True, timeout=120, env=_ENV)
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.slow
def test_stdout_clean_with_stderr_on_a_terminal(bundles):
    """stdout a pipe, stderr a pty (progress bar live): stdout must be exactly one JSON object."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:  # keep the pty from filling up
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**_ENV, "TERM": "xterm-256color", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    try:
        proc = subprocess.run(_cli("hessian", bundles["mlp"], "--json", "--trace", "-k", "3"), stdout=subprocess.PIPE,
                              stderr=slave, stdin=subprocess.DEVNULL, timeout=120, env=env)
    finally:
        os.close(slave)
        reader.join(timeout=5)
        os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    text = proc.stdout.decode()
    assert text.endswith("\n") and text.count("\n") == 1
    out = json.loads(text)
    assert isinstance(out, dict) and len(out["eigenvalues"]) == 3
    tty = b"".join(chunks)
    assert b"P = 72" in tty and b"Lanczos" in tty  # the logs and the progress bar did reach the terminal


def test_block_size_and_interrupt(bundles, tmp_path, monkeypatch):
    out = run_json(bundles["mlp"], "--dtype", "float64", "--tol", "1e-10", "--block-size", "3", "-k", "4")
    np.testing.assert_allclose(out["eigenvalues"], bundles["eig"].flip(0)[:4].tolist(), rtol=TOP_RTOL)
    assert out["num_lanczos_hvps"] % 3 == 0

    report = str(tmp_path / "r.h5")
    run_json(bundles["mlp"], "-k", "1", "-o", report)
    before = open(report, "rb").read()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("basins.analyses.hessian.hessian_eigenvalues", interrupted)
    r = run(bundles["mlp"], "-k", "1", "-o", report)
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert open(report, "rb").read() == before


@pytest.mark.parametrize("bounds", ["rescaled", "float64"])
def test_float32_error_bounds_contain_the_dense_float64_eigenvalues(bundles, bounds):
    """Every float32 eigenvalue lies within its error bound of an eigenvalue of the float64 dense Hessian."""
    out = run_json(bundles["mlp"], "--dtype", "float32", "--bounds", bounds, "-k", "5", "--tol", "1e-6", "-q")
    eig = bundles["eig"].numpy()
    for lam, b in zip(out["eigenvalues"], out["error_bounds"]):
        assert np.abs(eig - lam).min() <= b, (lam, b)
    assert all(b >= r for b, r in zip(out["error_bounds"], out["residuals"]))


def test_memory_plan_printed_stored_and_refused(bundles):
    """--memory: the plan is one stderr line before the work and in the JSON/report; a budget nothing
    fits is refused with exit 2 and one line; a malformed size is bad usage."""
    r = run(bundles["mlp"], "--dtype", "float64", "--tol", "1e-10", "--memory", "64G", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    plan_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("memory plan:")]
    # the budget's source: the library's parameter in the record, the flag on the command line's stderr
    assert len(plan_lines) == 1 and "in memory" in plan_lines[0] and "(--memory)" in plan_lines[0]
    assert out["memory_plan"].replace("(memory_bytes)", "(--memory)") == plan_lines[0]
    assert out["memory_budget_bytes"] == 64 << 30
    assert out["basis_storage"] == "memory" and 0 < out["memory_plan_bytes"] <= 64 << 30
    np.testing.assert_allclose(out["eigenvalues"], bundles["eig"].flip(0)[:10].tolist(), rtol=TOP_RTOL)

    r = run(bundles["mlp"], "--memory", "1M")
    assert r.exit_code == 2 and "nothing fits the memory budget" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run(bundles["mlp"], "--memory", "lots")
    assert r.exit_code == 2 and "not a size" in r.stderr
