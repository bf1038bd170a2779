"""``basins plot`` and the ``--plot`` options: figures compared pixel by pixel with committed
baselines (``matplotlib.testing.compare.compare_images``), and the command's contract.

Baselines are drawn from fixed synthetic report groups (the shapes and names real reports hold),
so that they depend on the drawing code only. After a deliberate change of a figure, regenerate
them with ``BASINS_REGENERATE_BASELINES=1 python -m pytest tests/test_plot.py`` and look at them.
They were drawn with the matplotlib pinned in ``constraints-cpu.txt``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from matplotlib.testing.compare import compare_images  # noqa: E402

from basins.cli.figures.layout import report_figure  # noqa: E402
from basins.cli.figures.style import save  # noqa: E402
from basins.cli.figures.trajectory import trajectory_figure  # noqa: E402
from basins.cli.main import main  # noqa: E402

BASELINES = Path(__file__).parent / "baseline_images"
TOLERANCE = 0.3  # RMS difference in 0-255 grey levels: identical renders give 0, one moved marker ~0.9


def _ds(values, units=None, description=""):
    return {"values": np.asarray(values), "units": units, "description": description}


def _problem(step=None, sha="ab" * 32):
    p = {"model": f"runs/ckpt_{step}.pt2" if step is not None else "model.pt2", "model_sha256": sha,
         "data_sha256": "cd" * 32, "num_params": 2643, "num_examples": 1500, "loss": "cross-entropy"}
    if step is not None:
        p["step"] = step
    return p


def _analyses(scale: float = 1.0) -> dict:
    rng = np.random.default_rng(0)
    EU = "loss / parameter²"
    lam = scale * np.array([6.9, 5.2, 4.8, 3.1, 2.2])
    grid = np.linspace(-0.5, 7.5, 200)
    dens = np.exp(-((grid - 0.0) ** 2) / 0.02) + 0.01 * np.exp(-((grid - 3.0) ** 2) / 0.1) + 1e-6
    t = np.geomspace(1 / 64, 8, 10)
    q = np.vstack([t**2 * f for f in (0.5, 0.8, 1.0, 1.3, 2.0)])
    return {
        "hessian": {"attrs": {"which": "both", "trace": 57.8 * scale, "trace_stderr": 0.23},
                    "datasets": {"eigenvalues": _ds(lam, EU), "error_bounds": _ds(1e-3 * lam, EU),
                                 "bottom_eigenvalues": _ds([-1e-4, -2e-5, 1e-6, 3e-5, 1e-4], EU),
                                 "bottom_error_bounds": _ds([4e-4] * 5, EU)}, "groups": {}},
        "spectrum": {"attrs": {"coverage": 0.95, "num_probes": 10, "num_steps": 80, "scale": "linear"},
                     "datasets": {"grid": _ds(grid, EU), "density": _ds(dens, "1 / (loss / parameter²)"),
                                  "density_lower": _ds(0.5 * dens), "density_upper": _ds(1.5 * dens)}, "groups": {}},
        "nullity": {"attrs": {"method": "slq"},
                    "datasets": {"threshold": _ds([6.9e-6, 6.9e-4, 6.9e-2], EU), "rtol": _ds([1e-6, 1e-4, 1e-2]),
                                 "count": _ds(np.array([2035, 2489, 2594]) - round(100 * scale)),
                                 "count_lower": _ds(np.array([2030, 2480, 2590]) - round(100 * scale)),
                                 "count_upper": _ds(np.array([2046, 2495, 2600]) - round(100 * scale))},
                    "groups": {}},
        "features": {"attrs": {"ranks": [{"rtol": 1e-4, "threshold": 6.9e-4, "rank": 155}]},
                     "datasets": {"eigenvalues": _ds(np.geomspace(7, 1e-12, 300), EU)}, "groups": {}},
        "volume": {"attrs": {"epsilon": [1e-3, 1e-2, 1e-1], "log_volume": [-8526.0, -5480.0, -2885.0],
                             "log_volume_se": [30.0, 20.0, 10.0], "ci_lower": [None, None, None],
                             "ci_upper": [None, None, None], "is_lower_bound": [False, False, True],
                             "ci_level": 0.95, "family": "isotropic", "num_rays": 64}, "datasets": {}, "groups": {}},
        "walls": {"attrs": {"walls_epsilon": 0.01}, "datasets": {},
                  "groups": {"isotropic": {"attrs": {}, "datasets": {"t": _ds(t), "profile_quantiles": _ds(q)},
                                           "groups": {}}}},
        "llc": {"attrs": {"llc": 6.99 * scale, "llc_stderr": 0.39, "num_burnin": 10},
                "datasets": {"loss_trace": _ds(0.22 + 0.03 * rng.random((4, 60)), "loss")}, "groups": {}},
        "landscape": {"attrs": {"kind": "1d", "directions": "random"},
                      "datasets": {"t": _ds(np.linspace(-1, 1, 21)),
                                   "loss": _ds(0.2 + 5 * np.linspace(-1, 1, 21) ** 2, "loss")}, "groups": {}},
        "evidence": {"attrs": {"log_evidence": -120.0, "log_evidence_ci": [-121.0, -119.0]}, "datasets": {},
                     "groups": {}},
    }


def _landscape_report() -> dict:
    x = np.linspace(-1, 1, 15)
    z = 0.3 + 2 * x[:, None] ** 2 + 0.5 * x[None, :] ** 2 + 0.8 * x[:, None] * x[None, :] ** 2
    tl = np.linspace(0, 1, 25)
    line = 0.1 + 0.4 * np.sin(np.pi * tl) ** 2
    return {"problem": _problem(), "analyses": {
        "landscape": {"attrs": {"kind": "2d", "directions": "top"},
                      "datasets": {"x": _ds(x), "y": _ds(x), "loss": _ds(z, "loss")}, "groups": {}}}}, {
        "problem": _problem(), "analyses": {
            "landscape": {"attrs": {"kind": "line", "directions": "line", "barrier": 0.4, "barrier_t": 0.5,
                                    "loss_a": 0.1, "loss_b": 0.1},
                          "datasets": {"t": _ds(tl), "loss": _ds(line, "loss")}, "groups": {}}}}


def _check(fig, name: str, tmp_path: Path) -> None:
    actual = tmp_path / f"{name}.png"
    save(fig, str(actual))
    expected = BASELINES / f"{name}.png"
    if os.environ.get("BASINS_REGENERATE_BASELINES"):
        BASELINES.mkdir(exist_ok=True)
        shutil.copy(actual, expected)
    assert expected.exists(), f"no baseline {expected}: run with BASINS_REGENERATE_BASELINES=1"
    err = compare_images(str(expected), str(actual), tol=TOLERANCE)
    assert err is None, err


def test_report_figure_matches_baseline(tmp_path: Path) -> None:
    _check(report_figure({"problem": _problem(), "analyses": _analyses()}), "report_all_groups", tmp_path)


def test_landscape_figures_match_baselines(tmp_path: Path) -> None:
    two_d, line = _landscape_report()
    _check(report_figure(two_d), "landscape_2d", tmp_path)
    _check(report_figure(line), "landscape_line", tmp_path)


def test_trajectory_figure_matches_baseline(tmp_path: Path) -> None:
    reports = [{"problem": _problem(step, sha=f"{step:02d}" * 32), "analyses": _analyses(scale)}
               for step, scale in ((300, 0.4), (10, 2.0), (100, 1.0))]  # out of order: drawn by step
    _check(trajectory_figure(reports), "trajectory", tmp_path)


def test_a_changed_figure_fails_the_comparison(tmp_path: Path) -> None:
    """The comparison can fail: another eigenvalue moves the picture beyond the tolerance."""
    analyses = _analyses()
    analyses["hessian"]["datasets"]["eigenvalues"] = _ds([6.9, 5.2, 4.8, 3.1, 0.2], "loss / parameter²")
    actual = tmp_path / "changed.png"
    save(report_figure({"problem": _problem(), "analyses": analyses}), str(actual))
    assert compare_images(str(BASELINES / "report_all_groups.png"), str(actual), tol=TOLERANCE) is not None


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """Real reports written by the CLI on the example bundle: one with several groups, three checkpoints."""
    from basins.files.example import make_example

    root = tmp_path_factory.mktemp("plot")
    bundle = make_example(str(root / "ex"))
    run = CliRunner()
    one = str(root / "one.h5")
    for args in (["hessian", "--which", "both", "-k", "3"], ["spectrum", "--probes", "3", "--steps", "20"],
                 ["landscape", "--points", "7"]):
        res = run.invoke(main, [args[0], bundle, *args[1:], "-q", "-o", one])
        assert res.exit_code == 0, res.stderr
    steps = []
    for step in (5, 50, 500):
        shutil.copy(bundle, root / f"ckpt_{step}.pt")
        steps.append(str(root / f"ckpt_{step}.pt"))
    res = run.invoke(main, ["hessian", *steps, "-k", "2", "-q", "-o", str(root / "runs") + "/"])
    assert res.exit_code == 0, res.stderr
    return {"one": one, "runs": sorted(str(p) for p in (root / "runs").glob("*.h5")), "root": root}


@pytest.mark.parametrize("ext,magic", [("png", b"\x89PNG"), ("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_cli_writes_each_format(reports: dict, tmp_path: Path, ext: str, magic: bytes) -> None:
    out = tmp_path / f"fig.{ext}"
    res = CliRunner().invoke(main, ["plot", reports["one"], "-o", str(out)])
    assert res.exit_code == 0, res.stderr
    assert out.read_bytes().startswith(magic)
    res = CliRunner().invoke(main, ["plot", *reports["runs"], "-o", str(tmp_path / f"traj.{ext}")])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / f"traj.{ext}").read_bytes().startswith(magic)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".basins-")]  # no temporaries left


def test_cli_errors(reports: dict, tmp_path: Path) -> None:
    run = CliRunner()
    res = run.invoke(main, ["plot", reports["one"], "-o", str(tmp_path / "fig.jpg")])
    assert res.exit_code == 2 and ".png, .pdf or .svg" in res.stderr
    bad = tmp_path / "not.h5"
    bad.write_bytes(b"not hdf5")
    res = run.invoke(main, ["plot", str(bad), "-o", str(tmp_path / "f.png")])
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    res = run.invoke(main, ["plot", reports["one"]])
    assert res.exit_code == 2  # -o is required


def test_a_failed_render_leaves_no_file(reports: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from basins.cli.figures import panels

    def broken(ax, analysis):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setitem(panels.PANELS, "hessian", broken)
    out = tmp_path / "fig.png"
    res = CliRunner().invoke(main, ["plot", reports["one"], "-o", str(out)])
    assert res.exit_code == 1 and not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".basins-")]


def test_missing_matplotlib_is_a_clear_error(reports: dict, tmp_path: Path) -> None:
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
            "            raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from basins.cli.main import main\n"
            "main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", code, "plot", reports["one"], "-o", str(tmp_path / "f.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "basins plot needs matplotlib, which is not installed: pip install 'basins[plot]'" in r.stderr
    assert not (tmp_path / "f.png").exists()
