"""One serialiser: ``basins summary r.h5 --json`` prints, for each group, the very object the command
that wrote it printed with ``--json -o r.h5`` (key for key, floats exactly), for every command and
variant that writes a report; ``summary --csv`` keeps every per-eigenvalue column."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from basins.cli.main import main

# the cheapest settings of each command (and of each of its report groups) on a 67-parameter MLP
CASES: dict[str, tuple[str, list[str]]] = {
    "hessian": ("hessian", ["-k", "1", "--which", "both", "--trace", "--trace-hvps", "4", "--eigenvectors"]),
    "hessian_blocks": ("hessian", ["--per-block", "1", "--trace-hvps", "4"]),
    "spectrum": ("spectrum", ["--probes", "2", "--lanczos-steps", "4", "--points", "10"]),
    "nullity_exact": ("nullity", ["--method", "exact"]),
    "nullity_slq": ("nullity", ["--method", "slq", "--probes", "2", "--lanczos-steps", "4", "--deflate", "1"]),
    "features": ("features", ["--top", "1", "--gn-probes", "1"]),
    "volume": ("volume", ["--samples", "4", "--walls", "--family", "isotropic", "--family", "top", "--top-k", "1",
                          "--epsilon", "0.1"]),
    "llc": ("llc", ["--chains", "2", "--draws", "20", "--burnin", "10", "--minibatch", "8", "--no-quadratic"]),
    "llc_blocks": ("llc", ["--per-block", "1", "--chains", "2", "--draws", "10", "--burnin", "5", "--minibatch", "8",
                           "--no-quadratic"]),
    "evidence": ("evidence", ["--curvature", "both", "--prior-precision", "10"]),
    "evidence_slq": ("evidence", ["--curvature", "ggn", "--method", "slq", "--probes", "2", "--lanczos-steps", "4", "--deflate", "1"]),
    "landscape_1d": ("landscape", ["--points", "5"]),
    "landscape_2d": ("landscape", ["--dims", "2", "--points", "3"]),
    "landscape_line": ("landscape", ["--to", "{model}", "--points", "3"]),
}
#: the report group each case writes first (the one its --json object describes)
GROUP = {"evidence_slq": "evidence", "hessian_blocks": "hessian_blocks", "llc_blocks": "llc_blocks", "nullity_exact": "nullity",
         "nullity_slq": "nullity", "landscape_1d": "landscape", "landscape_2d": "landscape",
         "landscape_line": "landscape"}


def invoke(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    from basins.files.loading import save_bundle
    from tests.models import classification_data, mlp

    folder = tmp_path_factory.mktemp("roundtrip")
    inputs, targets = classification_data()
    save_bundle(folder / "model.pt", mlp().eval(), inputs, targets, "cross-entropy", {})
    return str(folder / "model.pt")


def summary_json(*reports: str) -> object:
    code, out, err = invoke("summary", *reports, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("case", list(CASES))
def test_summary_json_is_the_commands_json(case: str, bundle: str, tmp_path: Path) -> None:
    command, options = CASES[case]
    report = str(tmp_path / "r.h5")
    code, out, err = invoke(command, bundle, *[o.format(model=bundle) for o in options], "--json", "-q", "-o", report)
    assert code == 0, err
    printed = json.loads(out)
    doc = summary_json(report)
    group = GROUP.get(case, command)
    assert isinstance(doc, dict) and group in doc
    assert set(doc[group]) == set(printed), set(doc[group]) ^ set(printed)
    for key in printed:  # key for key: values equal, floats exactly
        assert doc[group][key] == printed[key], key
    assert printed["report"] == report and printed["num_params"] == 67
    assert printed["model_sha256"] and printed["data_sha256"] and "warnings" in printed  # the whole /problem record
    if case == "volume":  # the second group the command wrote: its own object, with the same problem
        assert set(doc) == {"volume", "walls"} and doc["walls"]["model_sha256"] == printed["model_sha256"]


def test_each_group_keeps_its_own_run(bundle: str, tmp_path: Path) -> None:
    """Two commands with other settings of the problem write one report: each group still reads
    back as its own command printed it (the /problem group holds only the last run's)."""
    report = str(tmp_path / "r.h5")
    code, out_h, err = invoke("hessian", bundle, "-k", "1", "--seed", "1", "--json", "-q", "-o", report)
    assert code == 0, err
    code, out_l, err = invoke("landscape", bundle, "--points", "3", "--seed", "2", "--json", "-q", "-o", report)
    assert code == 0, err
    doc = summary_json(report)
    assert doc == {"hessian": json.loads(out_h), "landscape": json.loads(out_l)}
    assert doc["hessian"]["seed"] == 1 and doc["landscape"]["seed"] == 2
    several = summary_json(report, report)
    assert several == [doc, doc]


def test_checkpoint_series_round_trip(bundle: str, tmp_path: Path) -> None:
    """A series of checkpoints (-o DIR/): each object of the JSON list is its report's object."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (10, 20):
        shutil.copy(bundle, folder / f"ckpt_{step}.pt")
    out_dir = tmp_path / "runs"
    code, out, err = invoke("spectrum", str(folder), "--probes", "2", "--lanczos-steps", "3", "--points", "10",
                            "--json", "-q", "-o", f"{out_dir}/")
    assert code == 0, err
    printed = json.loads(out)
    assert [p["step"] for p in printed] == [10, 20]
    for obj in printed:
        doc = summary_json(obj["report"])
        assert isinstance(doc, dict)
        assert doc["spectrum"] == obj


def test_csv_keeps_every_per_eigenvalue_column(bundle: str, tmp_path: Path) -> None:
    report = str(tmp_path / "r.h5")
    code, out, err = invoke("hessian", bundle, "-k", "2", "--which", "both", "--json", "-q", "-o", report)
    assert code == 0, err
    printed = json.loads(out)
    code, text, err = invoke("summary", report, "--csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["report", "end", "index", "eigenvalue", "residual", "error_bound", "converged"]
    for end, prefix in (("top", ""), ("bottom", "bottom_")):
        mine = [r for r in rows if r["end"] == end]
        assert [float(r["eigenvalue"]) for r in mine] == printed[prefix + "eigenvalues"]
        assert [float(r["residual"]) for r in mine] == printed[prefix + "residuals"]
        assert [float(r["error_bound"]) for r in mine] == printed[prefix + "error_bounds"]
        assert [r["converged"] == "true" for r in mine] == printed[prefix + "converged"]
