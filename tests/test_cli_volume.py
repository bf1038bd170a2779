"""``basins volume`` end to end on a bundle whose loss is exactly quadratic (least squares at its solution)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from basins.analyses.volume.estimators import log_ball_volume
from basins.cli.main import main
from basins.files.report import read_report

F64 = torch.float64


@pytest.fixture(scope="module")
def linreg(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Linear regression (P = 3) saved at its least-squares solution: L − L* = δᵀ(XᵀX/n)δ exactly."""
    from basins.files.loading import save_bundle

    root = tmp_path_factory.mktemp("volume")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g, dtype=F64) * torch.tensor([1.0, 0.6, 0.4], dtype=F64)
    y = x @ torch.tensor([[0.5], [-1.0], [2.0]], dtype=F64) + 0.1 * torch.randn(50, 1, generator=g, dtype=F64)
    model = nn.Linear(3, 1, bias=False).double().eval()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    save_bundle(str(root / "linreg.pt"), model, x, y, "mse")
    H = 2 * x.T @ x / 50
    return {"root": root, "bundle": str(root / "linreg.pt"), "eig": torch.linalg.eigvalsh(H).numpy()}


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, ["volume", *args])


def run_json(*args: str) -> dict:
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_volume_json_report_and_summary(linreg: dict, tmp_path) -> None:  # type: ignore[no-untyped-def]
    report = str(tmp_path / "r.h5")
    r = run(linreg["bundle"], "--samples", "600", "--walls", "--compare-quadratic", "--json", "-o", report)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert "loss evaluations" in r.stderr and "wrote /volume and /walls" in r.stderr
    for key in ("num_params", "num_rays", "epsilon", "log_volume", "log_prior_mass", "ess", "max_weight_share",
                "is_lower_bound", "ci_lower", "ci_upper", "radii", "censored", "num_loss_evals", "num_hvps", "walls",
                "jensen_bound", "volume_slope", "quadratic", "families", "seed", "radius_rtol", "report"):
        assert key in out, key
    eps = out["epsilon"]
    assert eps == [1e-3, 1e-2, 1e-1] and out["num_params"] == 3 and out["num_rays"] == 600
    for name in ("log_volume", "ess", "is_lower_bound", "ci_lower", "ci_upper", "radii", "censored", "log_prior_mass"):
        assert len(out[name]) == 3, name
    lam = linreg["eig"]
    for j, e in enumerate(eps):
        truth = log_ball_volume(3) + 0.5 * float(np.sum(np.log(2 * e / lam)))
        assert not out["is_lower_bound"][j] and out["ci_lower"][j] < out["ci_upper"][j]
        assert abs(out["log_volume"][j] - truth) <= 3 * out["log_volume_se"][j]
        assert out["quadratic"]["log_volume"][j] == pytest.approx(truth, rel=1e-9)
        assert out["censored"][j] == 0 and out["radii"][j]["count"] == 600
    assert all(s == pytest.approx(1.5, rel=1e-2) for s in out["volume_slope"])  # P/2 for a regular basin
    assert out["quadratic"]["num_null"] == 0 and out["quadratic"]["method"] == "exact"
    walls = out["walls"]
    assert walls["exponent"]["q05"] == pytest.approx(2.0, abs=1e-4) and walls["exponent"]["q95"] == pytest.approx(2.0, abs=1e-4)
    assert len(walls["anharmonicity"]) == 3 and abs(walls["anharmonicity"][1]["q50"]) < 1e-3
    assert out["num_hvps"] >= 3 + 300  # dense Hessian + one uᵀHu per pair
    assert out["num_loss_evals"] >= out["num_search_evals"] > 0

    d = read_report(report)
    vol, wal = d["analyses"]["volume"], d["analyses"]["walls"]
    iso = vol["groups"]["isotropic"]["datasets"]
    assert iso["radii"]["values"].shape == (600, 3) and iso["pair_seeds"]["values"].shape == (300,)
    assert iso["radii"]["units"].startswith("parameter units")
    assert wal["groups"]["isotropic"]["datasets"]["profile"]["values"].shape[0] == 600
    assert vol["attrs"]["num_loss_evals"] == out["num_loss_evals"]

    s = CliRunner().invoke(main, ["summary", report])
    assert s.exit_code == 0, s.output
    assert "basin volume" in s.stdout and "basin walls" in s.stdout  # /walls is drawn by basins.cli.volume
    from basins.cli.volume import summary_row, summary_tables

    assert summary_tables(wal, d["problem"]) and "wall exponent (median)" in summary_row(wal)
    assert "log V (ε=0.01)" in summary_row(vol)
    s2 = CliRunner().invoke(main, ["summary", report, report])
    assert s2.exit_code == 0 and "log V" in s2.stdout


def test_table_output_and_rounding(linreg: dict) -> None:
    r = run(linreg["bundle"], "--samples", "41", "--epsilon", "0.01", "--max-radius", "100")
    assert r.exit_code == 0, r.output
    assert "basin volume by random probing" in r.stdout and "42 rays" in r.stdout
    assert "rounded up to 42" in r.stderr


def test_same_seed_same_radii(linreg: dict) -> None:
    args = (linreg["bundle"], "--samples", "20", "--epsilon", "0.01")
    a, b = run_json(*args), run_json(*args)
    c = run_json(*args, "--seed", "1")
    assert a["radii"] == b["radii"] and a["log_volume"] == b["log_volume"]
    assert a["radii"] != c["radii"]


def test_top_and_floor_families(linreg: dict) -> None:
    out = run_json(linreg["bundle"], "--samples", "40", "--family", "top", "--family", "floor", "--top-k", "1",
                   "--walls", "--epsilon", "0.01")
    assert out["family"] == "top" and out["dimension"] == 1  # no isotropic family: the first is primary
    assert set(out["families"]) == {"top", "floor"} and out["families"]["floor"]["dimension"] == 2
    lam_max = float(linreg["eig"].max())
    assert out["radii"][0]["q50"] == pytest.approx(math.sqrt(2 * 0.01 / lam_max), rel=1e-3)
    assert out["families"]["top"]["walls"]["exponent"]["q50"] == pytest.approx(2.0, abs=1e-4)


def test_bad_options_exit_2(linreg: dict) -> None:
    r = run(linreg["bundle"], "--epsilon", "-1")
    assert r.exit_code == 2
    r = run(linreg["bundle"], "--normalisation", "sideways")
    assert r.exit_code == 2


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib_is_an_input_error(linreg: dict, tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = run(linreg["bundle"], "--samples", "4", "--plot", str(tmp_path / "w.png"))
    assert r.exit_code == 2
    assert "matplotlib" in r.stderr and "basins[plot]" in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib (plot extra)")
def test_plot_writes_png(linreg: dict, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "w.png"
    r = run(linreg["bundle"], "--samples", "20", "--plot", str(path), "--family", "isotropic")
    assert r.exit_code == 0, r.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
