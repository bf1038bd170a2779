"""``basins spectrum``, ``nullity`` and ``features`` end to end: JSON keys and values, reports, summary, errors.

Bundles are built with :func:`basins.files.loading.save_bundle` from small float64 models at an exact
zero-residual minimum (targets := f(x; θ*)), where the flat-direction count is P − rank J.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call, jacrev

from basins.cli.main import main


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """A zero-residual regression with a hidden linear layer (P = 38, n·k = 12) and a small classifier."""
    from basins.files.loading import save_bundle

    root = tmp_path_factory.mktemp("flat")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reg = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 2)).double().eval()
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = reg(x)
    save_bundle(str(root / "reg.pt"), reg, x, y, "mse")
    theta = torch.cat([p.detach().reshape(-1) for p in reg.parameters()])
    names = [n for n, _ in reg.named_parameters()]
    shapes = [p.shape for p in reg.parameters()]

    def outputs(th: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            k = int(np.prod(shape))
            params[name] = th[i : i + k].reshape(shape)
            i += k
        return functional_call(reg, params, (x,)).reshape(-1)

    J = jacrev(outputs)(theta)
    ratio = torch.linalg.svdvals(J) ** 2  # H = (2/N) JᵀJ: eigenvalue ratios are squared singular-value ratios
    ratio = torch.cat([ratio / ratio[0], torch.zeros(theta.numel() - ratio.numel(), dtype=torch.float64)])
    flat = {}
    for rtol in (1e-6, 1e-4, 1e-2):
        assert not bool(((ratio > rtol / 3) & (ratio < 3 * rtol)).any())  # no eigenvalue near a threshold
        flat[rtol] = int((ratio <= rtol).sum())

    clf = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    xc = torch.randn(20, 4, generator=g, dtype=torch.float64)
    yc = torch.randint(0, 3, (20,), generator=g)
    save_bundle(str(root / "clf.pt"), clf, xc, yc, "cross-entropy")
    return {"root": root, "reg": str(root / "reg.pt"), "clf": str(root / "clf.pt"), "P": theta.numel(), "flat": flat}


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_help():
    for cmd in ("spectrum", "nullity", "features"):
        code, out, _ = run(cmd, "--help")
        assert code == 0 and "Examples" in out


def test_spectrum_json(bundles):
    code, out, err = run("spectrum", bundles["reg"], "--probes", "4", "--lanczos-steps", "15", "--json")
    assert code == 0, err
    d = json.loads(out)
    for key in ("grid", "density", "density_lower", "density_upper", "nodes", "weights", "num_hvps", "trace"):
        assert key in d
    assert d["num_params"] == bundles["P"] and d["num_hvps"] <= 4 * 15
    assert len(d["nodes"]) == len(d["weights"]) == 4
    for w in d["weights"]:
        assert abs(sum(w) - 1) < 1e-12
    assert abs(np.trapezoid(d["density"], d["grid"]) - 1) < 1e-6
    assert all(lo <= m <= hi for lo, m, hi in zip(d["density_lower"], d["density"], d["density_upper"]))
    assert "HVPs" in err


def test_spectrum_log_scale(bundles):
    code, out, err = run("spectrum", bundles["reg"], "--probes", "3", "--lanczos-steps", "10", "--scale", "log", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["scale"] == "log" and abs(np.trapezoid(d["density"], d["grid"]) - 1) < 1e-6


def test_spectrum_plot_without_matplotlib_says_how_to_install(bundles, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    code, out, err = run("spectrum", bundles["reg"], "--plot", str(tmp_path / "s.png"))
    assert code == 2 and out == ""
    assert "pip install 'basins[plot]'" in err


@pytest.mark.parametrize("method", ["exact", "features"])
def test_nullity_json_counts_are_P_minus_rank(bundles, method):
    code, out, err = run("nullity", bundles["reg"], "--method", method, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["method"] == method and d["num_params"] == bundles["P"] and d["lambda_max"] > 0
    assert [c["rtol"] for c in d["counts"]] == [1e-6, 1e-4, 1e-2]
    for c in d["counts"]:
        assert set(c) >= {"rtol", "atol", "threshold", "count", "count_lower", "count_upper", "method"}
        assert c["count"] == bundles["flat"][c["rtol"]] and c["method"] == method
    if method == "features":
        assert d["gn_residual"] < 1e-10


def test_nullity_slq_interval(bundles):
    code, out, err = run("nullity", bundles["reg"], "--method", "slq", "--rtol", "1e-6", "--deflate", "4",
                         "--probes", "6", "--lanczos-steps", "30", "--json")
    assert code == 0, err
    c = json.loads(out)["counts"][0]
    assert c["method"] == "slq" and c["count_lower"] <= bundles["flat"][1e-6] <= c["count_upper"]


def test_features_json(bundles):
    code, out, err = run("features", bundles["clf"], "--top", "2", "--json")
    assert code == 0, err
    d = json.loads(out)
    for key in ("eigenvalues", "rank", "num_params", "num_outputs", "participation_ratio", "ranks", "loadings"):
        assert key in d
    assert d["num_outputs"] == 20 * 3 and d["rank"] <= 20 * (3 - 1)
    assert len(d["loadings"]) == 2 and abs(sum(d["loadings"][0]["per_output"]) - 1) < 1e-9
    assert len(d["loadings"][0]["per_example"]) == 20


def test_reports_and_summary(bundles, tmp_path):
    rep = str(tmp_path / "r.h5")
    for args in (("spectrum", "--probes", "3", "--lanczos-steps", "10"), ("nullity",), ("features",)):
        code, out, err = run(args[0], bundles["reg"], *args[1:], "-o", rep)
        assert code == 0, err
        assert out.strip()  # the table on stdout
        assert f"wrote /{args[0]}" in err
    code, out, err = run("summary", rep)
    assert code == 0, err
    assert "spectral density" in out and "near-zero Hessian eigenvalues" in out and "feature Gram matrix" in out
    assert "density (log |λ|)" in out and "note:" not in err
    rep2 = str(tmp_path / "r2.h5")
    run("nullity", bundles["reg"], "--method", "features", "-o", rep2)
    code, out, err = run("summary", rep, rep2)
    assert code == 0, err
    assert "flat@1e-06" in out and "Gram rank" in out


def test_bad_options_exit_2(bundles):
    code, _, err = run("nullity", bundles["reg"], "--rtol", "-1")
    assert code == 2 and "--rtol" in err
    code, _, err = run("nullity", bundles["reg"], "--method", "slq", "--probes", "1")
    assert code == 2 and "--probes" in err
    code, _, err = run("hessian", bundles["reg"], "--top-k", "100000")  # past P: the library's check, flag named
    assert code == 2 and "--top-k: k must be between 1 and the number of parameters" in err
    code, _, err = run("nullity", bundles["reg"], "--method", "svd")
    assert code == 2 and "svd" in err
