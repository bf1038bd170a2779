"""``basins summary``: tables for one report, one row per report for several, JSON, CSV, error paths.

Reports are written here with :func:`basins.files.report.write_analysis` (no model needed), shaped as
``basins hessian -o`` writes them, plus groups no renderer knows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import types

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from basins.cli.main import main
from basins.files.report import Array, write_analysis

UNITS = "loss / parameter²"


def problem(model: str = "model.pt", sha: str = "a") -> dict:
    return {"model": model, "model_sha256": sha * 64, "data": "bundle", "data_sha256": "b" * 64,
            "num_params": 4_515, "num_examples": 1_500, "loss": "cross-entropy", "loss_at_optimum": 0.0625,
            "grad_norm": 2.5e-6, "dtype": "float32", "device": "cpu", "seed": 0}


def write_hessian(path: str, lam_max: float = 12.5, which: str = "both", trace: float | None = 99.5,
                  sha: str = "a", model: str = "model.pt") -> None:
    top = np.array([lam_max, 3.25, 1.125])
    bottom = np.array([-0.5, -1e-3, 0.0])
    attrs = {"which": which, "top_k": 3, "tol": 1e-4, "lambda_max": lam_max, "lambda_min": -0.5,
             "is_saddle": True, "all_converged": False, "num_converged": 5, "num_wanted": 6,
             "trace": trace, "trace_stderr": 0.25 if trace is not None else None, "trace_method": "hutch++",
             "num_trace_hvps": 99, "num_hvps": 141, "num_restarts": 0, "wall_seconds": 1.5,
             "argv": "basins hessian model.pt -o r.h5"}
    arrays = {"eigenvalues": Array(top, "top", UNITS), "residuals": Array(np.array([1e-9, 2e-8, math.nan]), "r", UNITS),
              "converged": Array(np.array([True, True, False]), "c")}
    if which == "both":
        arrays.update({"bottom_eigenvalues": Array(bottom, "bottom", UNITS),
                       "bottom_residuals": Array(np.array([1e-9, 1e-9, 1e-9]), "r", UNITS),
                       "bottom_converged": Array(np.array([True, True, True]), "c")})
    write_analysis(path, problem(model, sha), "hessian", attrs, arrays)


def write_other(path: str, group: str = "probe", sha: str = "a") -> None:
    write_analysis(path, problem(sha=sha), group, {"method": "rays", "epsilon": [0.1, 0.01], "num_loss_evals": 1200,
                                                   "radius": math.inf, "note": None},
                   {"radii": Array(np.ones((4, 2)), "distance to the wall per ray and ε", "parameter units")})


def invoke(*args: str):
    return CliRunner().invoke(main, ["summary", *args])


@pytest.fixture
def reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_hessian("a.h5", lam_max=12.5)
    write_other("a.h5")
    write_hessian("b.h5", lam_max=7.75, which="top", trace=None, model="ckpt2.pt", sha="c")
    write_other("c.h5", sha="d")  # no hessian group at all
    return tmp_path


def test_one_report_tables(reports):
    r = invoke("a.h5")
    assert r.exit_code == 0, r.output
    out = r.stdout
    for text in ("problem", "model.pt", "aaaaaaaaaaaa", "4,515", "1,500", "cross-entropy", "0.0625", "2.5e-06",
                 "float32", "λ_max", "12.5 ± 1.0e-09", "λ_min", "-0.5", "99.5 ± 2.5e-01", "saddle", "5/6",
                 "141 HVPs", "top eigenvalues", "bottom eigenvalues", "3.25"):
        assert text in out, text
    assert "a" * 13 not in out  # hashes shortened
    # the probe group has no renderer: generic key/value rows and the dataset listed
    for text in ("/probe", "method", "rays", "num_loss_evals", "1200", "radii", "4×2", "distance to the wall",
                 "parameter units"):
        assert text in out, text


def test_several_reports_one_row_each(reports):
    r = invoke("a.h5", "b.h5", "c.h5")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    for name in ("a.h5", "b.h5", "c.h5"):
        assert sum(name in line for line in lines) == 1, name
    row_a = next(line for line in lines if "a.h5" in line)
    row_b = next(line for line in lines if "b.h5" in line)
    assert "12.5" in row_a and "99.5" in row_a and "ckpt2.pt" in row_b and "7.75" in row_b
    header = "\n".join(lines[:4])
    for col in ("model", "P", "n", "L(θ*)", "‖∇L‖", "λ_max", "trace", "probe"):
        assert col in header, col


def test_json_one_and_several(reports):
    r = invoke("a.h5", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"hessian", "probe"}  # {group: the --json object of the command that wrote it}
    h = doc["hessian"]
    assert h["report"] == "a.h5" and h["num_params"] == 4515 and h["model_sha256"] == "a" * 64  # /problem's keys
    assert h["warnings"] == []  # a group written without its own warnings
    assert h["eigenvalues"] == [12.5, 3.25, 1.125]
    assert h["residuals"][2] is None  # NaN → null
    assert h["converged"] == [True, True, False] and h["lambda_max"] == 12.5
    assert "argv" not in h and "created" not in h and "replaced" not in h  # report-only attributes
    assert doc["probe"]["radius"] is None  # inf → null
    assert doc["probe"]["radii"] == [[1.0, 1.0]] * 4

    r = invoke("a.h5", "b.h5", "--json")
    docs = json.loads(r.stdout)
    assert isinstance(docs, list) and [d["hessian"]["report"] for d in docs] == ["a.h5", "b.h5"]


def test_csv(reports):
    r = invoke("a.h5", "b.h5", "c.h5", "--csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert list(rows[0]) == ["report", "end", "index", "eigenvalue", "residual", "error_bound", "converged"]
    a = [row for row in rows if row["report"] == "a.h5"]
    assert [(row["end"], row["index"]) for row in a] == [("top", "1"), ("top", "2"), ("top", "3"),
                                                         ("bottom", "1"), ("bottom", "2"), ("bottom", "3")]
    assert float(a[0]["eigenvalue"]) == 12.5 and a[2]["residual"] == "" and a[2]["converged"] == "false"
    assert a[0]["error_bound"] == ""  # a report written before error bounds: none, not the residual
    assert float(a[4]["eigenvalue"]) == -1e-3
    assert len([row for row in rows if row["report"] == "b.h5"]) == 3
    assert "c.h5" in r.stderr  # noted: no hessian group

    r = invoke("c.h5", "--csv")
    assert r.exit_code == 2 and "no /hessian group" in r.stderr


def test_json_and_csv_exclusive(reports):
    r = invoke("a.h5", "--json", "--csv")
    assert r.exit_code == 2 and "exclusive" in r.stderr


def test_specialised_renderers_used_and_broken_ones_tolerated(reports, monkeypatch):
    from rich.table import Table

    def tables(analysis, prob):
        t = Table(title="custom probe view")
        t.add_column("x")
        t.add_row(str(analysis["attrs"]["num_loss_evals"]) + " evals for " + prob["model"])
        return [t]

    from basins.cli import summary

    monkeypatch.setitem(summary.RENDERERS, "probe", "probe")  # a new analysis registers its renderer module
    fake = types.ModuleType("basins.cli.probe")
    fake.summary_tables = tables  # type: ignore[attr-defined]
    fake.summary_row = lambda analysis: {"probe ε": str(analysis["attrs"]["epsilon"])}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "basins.cli.probe", fake)
    r = invoke("a.h5")
    assert "custom probe view" in r.stdout and "1200 evals for model.pt" in r.stdout
    assert "distance to the wall" not in r.stdout
    r = invoke("a.h5", "b.h5")
    assert "probe ε" in r.stdout and "[0.1, 0.01]" in r.stdout

    def broken(*_):
        raise KeyError("epsilon")

    fake.summary_tables = broken  # type: ignore[attr-defined]
    fake.summary_row = broken  # type: ignore[attr-defined]
    r = invoke("a.h5")
    assert r.exit_code == 0 and "distance to the wall" in r.stdout and "generically" in r.stderr
    r = invoke("a.h5", "b.h5")
    assert r.exit_code == 0 and "generically" in r.stderr

    empty = types.ModuleType("basins.cli.probe")  # the module exists, exports nothing: generic
    monkeypatch.setitem(sys.modules, "basins.cli.probe", empty)
    r = invoke("a.h5")
    assert r.exit_code == 0 and "distance to the wall" in r.stdout and r.stderr == ""


def test_walls_group_drawn_by_the_volume_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_other("r.h5", group="walls")
    fake = types.ModuleType("basins.cli.volume")
    fake.summary_tables = lambda analysis, prob: ["walls drawn by volume"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "basins.cli.volume", fake)
    monkeypatch.setitem(sys.modules, "basins.cli.walls", None)  # import fails: no such module
    r = invoke("r.h5")
    assert r.exit_code == 0 and "walls drawn by volume" in r.stdout


def test_unlisted_group_drawn_generically(reports, monkeypatch):
    """Only the groups listed in ``RENDERERS`` get a renderer: a module of the group's name is not enough."""
    fake = types.ModuleType("basins.cli.probe")
    fake.summary_tables = lambda analysis, prob: ["never drawn"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "basins.cli.probe", fake)
    r = invoke("a.h5")
    assert r.exit_code == 0 and "never drawn" not in r.stdout and "distance to the wall" in r.stdout


def test_empty_report_and_odd_group(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_other("r.h5", group="common")  # a group named like a non-renderer module
    r = invoke("r.h5")
    assert r.exit_code == 0 and "/common" in r.stdout and "radii" in r.stdout


@pytest.mark.parametrize("kind", ["random", "foreign", "schema", "missing"])
def test_bad_reports_exit_2(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    if kind == "random":
        (tmp_path / "bad.h5").write_bytes(b"\x89not hdf5 at all" * 100)
        message = "not an HDF5 file"
    elif kind == "foreign":
        with h5py.File("bad.h5", "w") as f:
            f.create_dataset("x", data=np.arange(3))
        message = "not a basins report"
    elif kind == "schema":
        write_hessian("bad.h5")
        with h5py.File("bad.h5", "a") as f:
            f.attrs["schema_version"] = 99
        message = "schema version 99"
    else:
        message = "does not exist"
    write_hessian("good.h5")
    for args in (["bad.h5"], ["good.h5", "bad.h5"], ["bad.h5", "--json"]):
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""
    r = CliRunner().invoke(main, ["--debug", "summary", "bad.h5"])
    assert r.exit_code == 1 and type(r.exception).__name__ == "ReportError"  # --debug: the exception propagates


def test_help_has_examples():
    r = CliRunner().invoke(main, ["summary", "--help"])
    assert r.exit_code == 0 and "basins summary runs/*.h5" in r.stdout and "--csv" in r.stdout
