"""``basins plot`` and the panels of ``basins.cli.figures``.

Figures are compared with committed baselines (``tests/baseline_images/``) by
:func:`matplotlib.testing.compare.compare_images` at an RMS tolerance of :data:`TOL` (0-255 grey
levels), drawn from the deterministic synthetic analysis dicts of ``tests/figure_cases.py``. The
plotted numbers are checked against the dicts (and, end to end, against the HDF5 datasets read
with h5py), and the axis scales against the rule of :func:`~basins.cli.figures.style.set_scale`.

Regenerate the baselines after an intended change of a figure (and look at them)::

    BASINS_REGENERATE_BASELINES=1 python -m pytest tests/test_plot.py -q

They are rendered with the matplotlib pinned in ``constraints-cpu.txt``; another version may
move pixels (text rendering) beyond the tolerance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.testing.compare import compare_images  # noqa: E402

from basins.cli.figures import trajectory  # noqa: E402
from basins.cli.figures.layout import PANELS, report_figure, single_panel  # noqa: E402
from basins.cli.figures.style import figure_style, save_figure, set_scale  # noqa: E402
from basins.cli.main import main  # noqa: E402
from basins.errors import InputError  # noqa: E402
from basins.files.report import read_report  # noqa: E402
from tests import figure_cases as cases  # noqa: E402

BASELINES = Path(__file__).resolve().parent / "baseline_images"
REGENERATE = os.environ.get("BASINS_REGENERATE_BASELINES", "") not in ("", "0")
TOL = 2.0
MISSING = "error: basins plot needs matplotlib, which is not installed: pip install 'basins[plot]'"


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def draw(make: Any, path: Path) -> Any:
    """Build a figure with ``make()`` and save it to ``path``, both under the basins style."""
    with figure_style():
        fig = make()
        save_figure(fig, str(path))
    return fig


def check_baseline(name: str, image: Path) -> None:
    baseline = BASELINES / f"{name}.png"
    if REGENERATE:
        BASELINES.mkdir(exist_ok=True)
        shutil.copyfile(image, baseline)
        return
    assert baseline.exists(), f"no baseline {baseline}; make it with BASINS_REGENERATE_BASELINES=1"
    result = compare_images(str(baseline), str(image), tol=TOL)
    assert result is None, result


def report(analyses: dict[str, Any], **problem: Any) -> dict[str, Any]:
    return {"path": "synthetic.h5", "attrs": {}, "problem": {**cases.PROBLEM, **problem}, "analyses": analyses}


# ---------------------------------------------------------------------- baselines
@pytest.mark.parametrize("kind", list(cases.CASES))
def test_panel_matches_baseline(kind: str, tmp_path: Path) -> None:
    notes: list[str] = []
    fig = draw(lambda: report_figure(report(cases.CASES[kind]()), notes, debug=True), tmp_path / f"{kind}.png")
    assert notes == []
    assert len(fig.axes) >= len(cases.CASES[kind]())
    check_baseline(kind, tmp_path / f"{kind}.png")


def test_trajectory_matches_baseline(tmp_path: Path) -> None:
    draw(lambda: trajectory.trajectory_figure(cases.trajectory_reports()), tmp_path / "trajectory.png")
    check_baseline("trajectory", tmp_path / "trajectory.png")


@pytest.mark.parametrize("group", ["walls", "volume"])
def test_record_shape_draws_what_the_report_shape_draws(group: str, tmp_path: Path) -> None:
    """A fresh record's ``family/name`` keys and a report's subgroups give the same pixels."""
    analysis = getattr(cases, group)()
    if group == "volume":  # give the volume group per-family datasets, as a report has
        analysis["groups"] = {"isotropic": cases.group({}, {"radii": cases.ds(np.ones((4, 3)))})}
    draw(lambda: single_panel(group, analysis, cases.PROBLEM), tmp_path / "report.png")
    draw(lambda: single_panel(group, cases.flat(analysis), cases.PROBLEM), tmp_path / "record.png")
    assert compare_images(str(tmp_path / "report.png"), str(tmp_path / "record.png"), tol=0) is None


# ---------------------------------------------------------------------- what the panels draw
def _axes(kind: str) -> Any:
    with figure_style():
        return report_figure(report(cases.CASES[kind]()), debug=True).axes


def test_hessian_panel_draws_each_end_with_its_error_bounds() -> None:
    h = cases.hessian()
    ax = _axes("hessian")[0]
    top, bottom = (c for c in ax.containers)  # one ErrorbarContainer per end
    np.testing.assert_array_equal(top.lines[0].get_ydata(), h["datasets"]["eigenvalues"]["values"])
    np.testing.assert_array_equal(bottom.lines[0].get_ydata(), h["datasets"]["bottom_eigenvalues"]["values"])
    # the error bar of λ_1 spans λ_1 ± its bound
    seg = top.lines[2][0].get_segments()[0]
    assert np.allclose(sorted(p[1] for p in seg), [12.5 - 1e-4, 12.5 + 1e-4])
    # both signs over 7 decades: symmetric log, linear within the largest error bound
    assert ax.get_yscale() == "symlog"
    assert ax.yaxis.get_transform().linthresh == pytest.approx(3e-3)
    assert "loss / parameter²" in ax.get_ylabel()
    assert "trace 41.5 ± 0.75" in " ".join(t.get_text() for t in ax.texts)


def test_nullity_panel_draws_counts_with_intervals_and_P() -> None:
    ax = _axes("nullity")[0]
    (bars,) = ax.containers
    np.testing.assert_array_equal(bars.lines[0].get_xdata(), [1e-8, 1e-6, 1e-4, 1e-2])
    np.testing.assert_array_equal(bars.lines[0].get_ydata(), [2.0, 14.5, 60.0, 96.0])
    spans = [sorted(p[1] for p in s) for s in bars.lines[2][0].get_segments()]
    assert spans == [[0.0, 6.0], [9.0, 20.0], [52.0, 66.0], [90.0, 101.0]]
    assert ax.get_xscale() == "log"
    assert any(np.allclose(line.get_ydata(), 120) for line in ax.lines)  # P = 120 as a ceiling
    assert ax.get_yscale() == "linear"  # nonzero counts 2 … 120: under two decades


def test_volume_panel_marks_lower_bounds_and_ci() -> None:
    ax = _axes("volume")[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("lower bound" in label for label in labels)
    assert any("quadratic baseline" in label for label in labels)
    triangles = [line for line in ax.lines if line.get_marker() == "^"]
    np.testing.assert_array_equal(triangles[0].get_ydata(), [-95.0])  # ε = 0.1 of isotropic: a lower bound
    assert ax.get_xscale() == "log" and "loss units" in ax.get_xlabel()


def test_landscape_panels() -> None:
    (ax2,) = [a for a in _axes("landscape_2d") if a.get_label() != "<colorbar>"]
    star = [line for line in ax2.lines if line.get_marker() == "*"]
    assert star and (star[0].get_xdata()[0], star[0].get_ydata()[0]) == (0, 0)  # θ* at the origin
    assert len(_axes("landscape_2d")) == 2  # the panel and its colour bar
    (ax,) = _axes("landscape_line")
    line = cases.landscape_line()
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), line["datasets"]["loss"]["values"])
    barrier = [m for m in ax.lines if m.get_marker() == "v"][0]
    a = line["attrs"]
    assert barrier.get_xdata()[0] == a["barrier_t"]
    assert barrier.get_ydata()[0] == pytest.approx(max(a["loss_a"], a["loss_b"]) + a["barrier"])
    assert "two basins" in ax.get_title() and "ckpt_000400.pt" in ax.get_title()


def test_set_scale_rule() -> None:
    ax = Figure().subplots()
    assert set_scale(ax, "y", [1.0, 50.0]) == "linear"
    assert set_scale(ax, "y", [1e-4, 1.0, np.nan]) == "log" and ax.get_yscale() == "log"
    assert set_scale(ax, "x", [-1e-5, 0.0, 3.0]) == "symlog"
    assert ax.xaxis.get_transform().linthresh == 1e-5
    assert set_scale(ax, "x", [0.0, 0.0]) == "linear"


def test_title_names_model_and_short_hashes() -> None:
    with figure_style():
        fig = report_figure(report(cases.CASES["llc"]()))
    title = fig.get_suptitle()
    assert "ckpt_000300.pt" in title and "P = 120" in title
    assert "model sha256 01234567 " in title + " " and "data sha256 fedcba98" in title


def test_unknown_groups_get_no_panel_and_a_note() -> None:
    notes: list[str] = []
    mystery = cases.group({"x": 1}, {"y": cases.ds([1.0, 2.0])})
    with figure_style():
        fig = report_figure(report({"mystery": mystery, "llc": cases.llc()}), notes)
    assert len(fig.axes) == 1 and notes == ["/mystery: no panel for this group; not drawn"]
    with figure_style(), pytest.raises(InputError, match="nothing to draw"):
        report_figure(report({"mystery": mystery}))


def test_a_failing_panel_is_noted_not_fatal() -> None:
    broken = cases.hessian()
    broken["datasets"]["error_bounds"] = cases.ds([1.0, 2.0])  # 2 bounds for 5 eigenvalues
    notes: list[str] = []
    with figure_style():
        fig = report_figure(report({"hessian": broken, "llc": cases.llc()}), notes)
    assert len(fig.axes) == 2 and len(notes) == 1 and notes[0].startswith("/hessian: its panel failed (ValueError")
    with figure_style(), pytest.raises(ValueError):
        report_figure(report({"hessian": broken}), debug=True)


# ---------------------------------------------------------------------- several reports
def test_trajectory_orders_by_step_and_draws_stored_error_bars() -> None:
    reports = cases.trajectory_reports()
    x, label = trajectory.steps(reports)
    assert label == "training step" and list(x) == [1000, 0, 100]
    with figure_style():
        fig = trajectory.trajectory_figure(reports)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["λ_max ± error bound", "Hessian trace ± s.e.", "near-zero eigenvalues [interval]",
                      "probed log-volume [95% CI], ▲ lower bound", "local learning coefficient ± s.e.",
                      "Laplace log evidence [interval]"]
    lam = fig.axes[0].containers[0]
    np.testing.assert_array_equal(lam.lines[0].get_xdata(), [0, 100, 1000])
    np.testing.assert_array_equal(lam.lines[0].get_ydata(), [0.9, 4.5, 12.5])
    spans = [sorted(p[1] for p in s) for s in lam.lines[2][0].get_segments()]
    assert np.allclose(spans, [[0.9 * 0.99, 0.9 * 1.01], [4.5 * 0.99, 4.5 * 1.01], [12.5 * 0.99, 12.5 * 1.01]])
    assert fig.axes[0].get_xlabel() == "training step"
    vol = fig.axes[3]
    tri = [line for line in vol.lines if line.get_marker() == "^"]  # ε = 0.01 at step 1000: a lower bound
    np.testing.assert_array_equal(tri[0].get_xdata(), [1000]) and np.testing.assert_array_equal(tri[0].get_ydata(), [-150])
    assert "3 reports: ckpt_0.pt … ckpt_1000.pt" in fig.get_suptitle()
    assert "model sha256 00000000 … 00001000" in fig.get_suptitle()
    assert "data sha256 fedcba98" in fig.get_suptitle()


def test_trajectory_x_falls_back_to_file_names_then_position() -> None:
    reports = cases.trajectory_reports()
    for r in reports:
        r["problem"]["step"] = None
    x, label = trajectory.steps(reports)
    assert list(x) == [1000, 0, 100] and label == "step (digits in the model file name)"
    reports[1]["problem"]["model"] = "final.pt"
    x, label = trajectory.steps(reports)
    assert list(x) == [0, 1, 2] and label == "report (position in the list)"


# ---------------------------------------------------------------------- formats and writes
@pytest.mark.parametrize("fmt", ["pdf", "svg"])
def test_vector_formats_are_valid_and_byte_identical_across_runs(fmt: str, tmp_path: Path) -> None:
    make = lambda: report_figure(report(cases.CASES["hessian"]()))  # noqa: E731
    draw(make, tmp_path / f"a.{fmt}")
    draw(make, tmp_path / f"b.{fmt}")
    data = (tmp_path / f"a.{fmt}").read_bytes()
    assert data == (tmp_path / f"b.{fmt}").read_bytes()  # no dates, fixed hash salt
    if fmt == "pdf":
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    else:
        assert ET.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg"


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def real(model_files: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Reports written by the CLI on the conftest bundle: one with every analysis, three
    checkpoints (steps 0, 100, 200) with /hessian and /nullity."""
    root = tmp_path_factory.mktemp("plot")
    b = model_files.bundle
    one = str(root / "all.h5")
    for args in (["hessian", b, "--which", "both", "--trace", "--top-k", "3"],
                 ["spectrum", b, "--probes", "3", "--lanczos-steps", "20"], ["nullity", b], ["features", b],
                 ["volume", b, "--samples", "20", "--walls"],
                 ["llc", b, "--chains", "2", "--draws", "30", "--burnin", "10"], ["evidence", b, "--curvature", "ggn"],
                 ["landscape", b, "--points", "9"]):
        code, _, err = run(*args, "-o", one, "-q")
        assert code == 0, err
    steps = []
    for step in (200, 0, 100):
        path = str(root / f"step{step}.h5")
        for args in (["hessian", b, "--trace", "--top-k", "2"], ["nullity", b]):
            code, _, err = run(*args, "--train-steps", str(step), "-o", path, "-q")
            assert code == 0, err
        steps.append(path)
    return {"root": root, "one": one, "steps": steps}


def test_cli_one_report_draws_a_panel_per_group(real: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "fig.png"
    code, stdout, err = run("plot", real["one"], "-o", str(out))
    assert code == 0, err
    assert stdout == "" and f"wrote {out}" in err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the temporary's 0600
    out.chmod(0o640)
    assert run("plot", real["one"], "-o", str(out))[0] == 0 and out.stat().st_mode & 0o777 == 0o640  # mode kept
    d = read_report(real["one"])
    assert set(d["analyses"]) == {"hessian", "spectrum", "nullity", "features", "volume", "walls", "llc",
                                  "evidence", "landscape"}
    with figure_style():
        fig = report_figure(d, debug=True)
    assert len(fig.axes) == 9
    from matplotlib.image import imread

    h, w = imread(str(out)).shape[:2]
    assert (w, h) == (1100, round(5 * 3.6 * 110 + 0.35 * 110))  # 2 columns × 5 rows of panels at 110 dpi
    with h5py.File(real["one"], "r") as f:  # the numbers drawn are the report's, read independently
        top = f["hessian/eigenvalues"][()]
        bottom = f["hessian/bottom_eigenvalues"][()]
        grid, dens = f["spectrum/grid"][()], f["spectrum/density"][()]
    hess = fig.axes[0].containers
    np.testing.assert_array_equal(hess[0].lines[0].get_ydata(), top)
    np.testing.assert_array_equal(hess[1].lines[0].get_ydata(), bottom)
    curve = [line for line in fig.axes[1].lines if len(line.get_xdata()) == grid.size][0]
    np.testing.assert_array_equal(curve.get_xdata(), grid)
    np.testing.assert_array_equal(curve.get_ydata(), dens)


def test_cli_several_reports_draw_against_step(real: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "trajectory.png"
    code, _, err = run("plot", *real["steps"], "-o", str(out))
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = [read_report(p) for p in real["steps"]]
    with figure_style():
        fig = trajectory.trajectory_figure(data)
    assert [ax.get_title() for ax in fig.axes] == ["λ_max ± error bound", "Hessian trace ± s.e.",
                                                   "near-zero eigenvalues [interval]"]
    lam = fig.axes[0].containers[0].lines[0]
    np.testing.assert_array_equal(lam.get_xdata(), [0, 100, 200])
    expected = []
    for p in sorted(real["steps"], key=lambda p: int(Path(p).stem[4:])):
        with h5py.File(p, "r") as f:
            expected.append(f["hessian/eigenvalues"][0])
            assert f["problem"].attrs["step"] == int(Path(p).stem[4:])
    np.testing.assert_array_equal(lam.get_ydata(), expected)
    assert fig.axes[0].get_xlabel() == "training step"


@pytest.mark.parametrize("fmt", ["pdf", "svg"])
def test_cli_pdf_and_svg(real: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"fig.{fmt}"
    code, _, err = run("plot", *real["steps"], "-o", str(out))
    assert code == 0, err
    data = out.read_bytes()
    if fmt == "pdf":
        assert data.startswith(b"%PDF-")
    else:
        assert ET.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg"


def test_cli_without_matplotlib_says_how_to_install(real: dict[str, Any], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    code, out, err = run("plot", real["one"], "-o", str(tmp_path / "fig.png"))
    assert (code, out, err.strip()) == (2, "", MISSING)
    assert not (tmp_path / "fig.png").exists()


def test_cli_without_matplotlib_in_a_fresh_interpreter(tmp_path: Path) -> None:
    probe = ("import sys\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
             "            raise ImportError('blocked')\n"
             "sys.meta_path.insert(0, Block())\n"
             "from basins.cli.main import main\n"
             "main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", probe, "plot", "missing.h5", "-o", str(tmp_path / "f.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == MISSING


def test_cli_bad_extension_and_missing_output(real: dict[str, Any], tmp_path: Path) -> None:
    code, _, err = run("plot", real["one"], "-o", str(tmp_path / "fig.jpg"))
    assert code == 2 and "has .jpg; a figure is written as one of .png, .pdf, .svg" in err
    assert not (tmp_path / "fig.jpg").exists()
    code, _, err = run("plot", real["one"])
    assert code == 2 and "Missing option '-o'" in err


def test_cli_refuses_what_is_not_a_basins_report(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=[1.0])
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    for path in (foreign, text, tmp_path / "absent.h5"):
        code, _, err = run("plot", str(path), "-o", str(tmp_path / "fig.png"))
        assert code == 2 and err.startswith("error: ") and str(path) in err, err
    assert not (tmp_path / "fig.png").exists()


def test_cli_failed_render_leaves_no_file(real: dict[str, Any], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_fail(self: Any, handle: Any, **kw: Any) -> None:
        handle.write(b"\x89PNG half a figure")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    out = tmp_path / "fig.png"
    code, _, err = run("plot", real["one"], "-o", str(out))
    assert code == 1 and "disk on fire" in err
    assert list(tmp_path.iterdir()) == []  # neither the figure nor a temporary
    out.write_bytes(b"the old figure")
    code, _, _ = run("plot", real["one"], "-o", str(out))
    assert code == 1 and out.read_bytes() == b"the old figure" and list(tmp_path.iterdir()) == [out]


def test_spectrum_plot_option_draws_the_plot_panel(model_files: Any, tmp_path: Path) -> None:
    """``basins spectrum --plot`` (a fresh record) and the report's /spectrum drawn again give the same pixels."""
    report_path, png = tmp_path / "s.h5", tmp_path / "s.png"
    code, _, err = run("spectrum", model_files.bundle, "--probes", "3", "--lanczos-steps", "15", "-o", str(report_path),
                       "--plot", str(png), "-q")
    assert code == 0, err
    again = tmp_path / "again.png"
    draw(lambda: single_panel("spectrum", read_report(str(report_path))["analyses"]["spectrum"], {}), again)
    assert compare_images(str(png), str(again), tol=0) is None
    code, _, err = run("spectrum", model_files.bundle, "--plot", str(tmp_path / "s.gif"))
    assert code == 2 and "--plot" in err and ".png, .pdf, .svg" in err


def test_panels_cover_the_summary_renderers() -> None:
    from basins.cli.summary import RENDERERS

    assert set(RENDERERS) <= set(PANELS)


@pytest.mark.parametrize("args", [["--help"], ["plot", "--help"]])
def test_help_imports_neither_torch_nor_matplotlib(args: list[str]) -> None:
    probe = ("import sys\nfrom basins.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, 'matplotlib' in sys.modules, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Usage" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == "False False"


def test_plotting_a_report_imports_no_torch(real: dict[str, Any], tmp_path: Path) -> None:
    """Drawing reads HDF5 and draws: torch (seconds to import) stays out."""
    probe = ("import sys\nfrom basins.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    assert not e.code, e.code\nprint('torch' in sys.modules, file=sys.stderr)\n")
    out = tmp_path / "fig.svg"
    r = subprocess.run([sys.executable, "-c", probe, "plot", real["one"], "-o", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "False" and out.exists()
