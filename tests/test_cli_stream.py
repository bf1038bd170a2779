"""Streamed data through the command line: a Dataset, DataLoader or HDF5 file read a chunk at a time.

Each command over a streamed source must print the numbers it prints for the same data loaded
from a ``.pt`` file (float64, rtol 1e-10), with ``--stream`` (read on every pass) or without
(held after the first pass), and record the same data fingerprint for any batch size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from basins.cli.main import main
from basins.files.report import read_report

RTOL = 1e-10
COMMON = ["--dtype", "float64", "--device", "cpu", "--json"]


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def _close(a: list[float], b: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=RTOL, atol=1e-13)


@pytest.mark.parametrize("spec", ["factory_dataset", "factory_loader", "h5"])
@pytest.mark.parametrize("stream", [False, True], ids=["held", "streamed"])
def test_hessian_on_a_streamed_source_equals_the_file(spec: str, stream: bool, model_files: Any, data_files: Any,
                                                      tmp_path: Path) -> None:
    args = ["hessian", model_files.pt2, "-k", "3", "--which", "both", "--tol", "1e-10", "--trace", *COMMON]
    code, out, err = run(*args, "--data", data_files.pt)
    assert code == 0, err
    want = json.loads(out)
    report = tmp_path / "r.h5"
    extra = ["--stream"] if stream else []
    code, out, err = run(*args, "--data", getattr(data_files, spec), "--batch-size", "6", *extra, "-o", str(report))
    assert code == 0, err
    got = json.loads(out)
    err = " ".join(err.split())  # the log console wraps lines
    assert f"data: 20 examples streamed from {getattr(data_files, spec)} in chunks of 6" in err
    assert ("read again on every pass" in err) is stream
    for key in ("eigenvalues", "bottom_eigenvalues"):
        _close(got[key], want[key])
    assert got["loss_at_optimum"] == pytest.approx(want["loss_at_optimum"], rel=RTOL)
    problem = read_report(str(report))["problem"]
    assert bool(problem["data_streamed"]) and bool(problem["data_read_every_pass"]) is stream
    assert problem["batch_size"] == 6


def test_the_fingerprint_of_streamed_data_ignores_batch_size_and_stream_mode(model_files: Any, data_files: Any,
                                                                             tmp_path: Path) -> None:
    report = tmp_path / "r.h5"
    base = ["hessian", model_files.pt2, "--data", data_files.factory_loader, "-k", "1", *COMMON, "-o", str(report)]
    assert run(*base, "--batch-size", "3")[0] == 0
    first = read_report(str(report))["problem"]["data_sha256"]
    code, _, err = run(*base, "--batch-size", "20", "--stream")  # the same problem: the report is updated
    assert code == 0, err
    assert read_report(str(report))["problem"]["data_sha256"] == first
    code, _, err = run(*base[:3], "tests.models:classification_dataset", *base[4:])  # same examples, another source
    assert code == 0, err
    code, _, err = run(*base[:3], data_files.pt, *base[4:])  # the same examples held in memory: the same problem
    assert code == 0, err
    assert read_report(str(report))["problem"]["data_sha256"] == first
    code, _, err = run(*base[:3], data_files.pt, *base[4:], "--max-samples", "19")  # other examples: refused
    assert code == 2 and "--force" in err


def test_volume_and_nullity_on_a_streamed_source_equal_the_file(regression_files: Any, tmp_path: Path) -> None:
    h5 = tmp_path / "reg.h5"
    import h5py

    with h5py.File(h5, "w") as f:
        f["inputs"], f["targets"] = regression_files.inputs.numpy(), regression_files.targets.numpy()
    pt = tmp_path / "reg.pt"
    torch.save({"inputs": regression_files.inputs, "targets": regression_files.targets}, pt)
    for command in (["volume", "--samples", "10", "--epsilon", "1e-2"], ["nullity", "--method", "exact"]):
        args = [command[0], regression_files.pt2, *command[1:], *COMMON]
        code, out, err = run(*args, "--data", str(pt))
        assert code == 0, err
        want = json.loads(out)
        code, out, err = run(*args, "--data", str(h5), "--stream", "--batch-size", "7")
        assert code == 0, err
        got = json.loads(out)
        if command[0] == "volume":  # the same radii within the radius tolerance: log V = P·log r + ...
            slack = want["dimension"] * want["radius_rtol"]
            for a, b in zip(got["log_volume"], want["log_volume"], strict=True):
                assert abs(a - b) <= slack, (a, b)
        else:
            assert [c["count"] for c in got["counts"]] == [c["count"] for c in want["counts"]]


def test_a_bad_example_deep_in_a_stream_exits_2_naming_it(model_files: Any, tmp_path: Path) -> None:
    (tmp_path / "nan_data.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def make():\n"
        "    from tests.models import classification_data\n"
        "    x, y = classification_data()\n"
        "    x[17, 2] = float('nan')\n"
        "    return TensorDataset(x, y)\n"
    )
    code, out, err = run("hessian", model_files.pt2, "--data", f"{tmp_path / 'nan_data.py'}:make", "--batch-size", "5",
                         "-k", "1", "--json")
    assert code == 2 and out == ""
    assert "non-finite values (NaN or inf) in the inputs of example 17:" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
