"""The command line's contract: exit codes, one-line messages, clean stdout, every loader path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from basins.cli.main import COMMANDS, main

FAST = ["--top-k", "1", "--json", "-q"]


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_version_and_help_of_every_command() -> None:
    code, out, _ = run("--version")
    assert code == 0 and "basins" in out
    code, out, _ = run("--help")
    assert code == 0
    for name in COMMANDS:
        assert name in out
        code, text, _ = run(name, "--help")
        assert code == 0 and "Usage" in text, name


@pytest.mark.parametrize("kind", ["pt2", "pt2_fixed", "state_dict", "pickle", "bundle"])
def test_each_model_format_runs(kind: str, model_files, data_files) -> None:  # type: ignore[no-untyped-def]
    path = getattr(model_files, kind)
    args = ["hessian", path, *FAST]
    if kind != "bundle":
        args += ["--data", data_files.npz]
    if kind == "state_dict":
        args += ["--arch", model_files.arch]
    if kind == "pickle":
        args += ["--trust-pickle"]
    code, out, err = run(*args)
    assert code == 0, err
    result = json.loads(out)  # stdout holds the data and nothing else
    assert result["num_params"] == 67 and result["num_examples"] == 20
    assert len(result["eigenvalues"]) == 1


@pytest.mark.parametrize("spec", ["pt", "h5", "factory_tensors", "factory_dataset", "factory_loader"])
def test_each_data_format_gives_the_same_loss(spec: str, model_files, data_files) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run("hessian", model_files.pt2, "--data", getattr(data_files, spec), *FAST)
    assert code == 0, err
    reference = torch.nn.functional.cross_entropy(model_files.module(data_files.inputs), data_files.targets).item()
    assert json.loads(out)["loss_at_optimum"] == pytest.approx(reference, rel=1e-6)


def test_inferred_loss_is_logged(model_files, data_files) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run("hessian", model_files.pt2, "--data", data_files.npz, "--top-k", "1", "--json")
    assert code == 0 and "loss: cross-entropy (inferred" in err


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing", r"does not exist|not found|No such file"),
        ("garbage", r"garbage\.pt"),
        ("torchscript", r"TorchScript.*torch\.export"),
        ("pickle", r"--trust-pickle.*runs code from the file"),
        ("state_dict_no_arch", r"--arch"),
        ("no_data", r"--data"),
    ],
)
def test_bad_model_inputs_exit_2(case: str, pattern: str, tmp_path: Path, model_files, data_files) -> None:  # type: ignore[no-untyped-def]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all" * 10)
    args = {
        "missing": [str(tmp_path / "nope.pt2"), "--data", data_files.npz],
        "garbage": [str(garbage), "--data", data_files.npz],
        "torchscript": [model_files.torchscript, "--data", data_files.npz],
        "pickle": [model_files.pickle, "--data", data_files.npz],
        "state_dict_no_arch": [model_files.state_dict, "--data", data_files.npz],
        "no_data": [model_files.pt2],
    }[case]
    code, out, err = run("hessian", *args, *FAST)
    assert code == 2, err
    assert out == ""
    assert err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert re.search(pattern, err, re.S), err


def test_bad_data_exit_2(tmp_path: Path, model_files, write_data) -> None:  # type: ignore[no-untyped-def]
    x, y = model_files.inputs.clone(), model_files.targets.clone()
    wrong_shape = write_data(tmp_path / "shape.npz", torch.randn(20, 5), y)
    x_nan = x.clone()
    x_nan[3, 1] = float("nan")
    nan = write_data(tmp_path / "nan.npz", x_nan, y)
    float_targets = write_data(tmp_path / "float.npz", x, y.double())
    for path, pattern in [
        (wrong_shape, "rejected inputs of shape"),
        (nan, "non-finite"),
        (float_targets, "needs integer class indices"),
    ]:
        code, out, err = run("hessian", model_files.pt2, "--data", path, "--loss", "cross-entropy", *FAST)
        assert code == 2 and out == "" and pattern in err, err


def test_non_finite_loss_with_finite_data_exits_1(tmp_path: Path, model_files) -> None:  # type: ignore[no-untyped-def]
    from basins.files.loading import save_bundle

    module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        module[0].weight.fill_(1e38)  # float32 overflow: inf logits on finite inputs
    bundle = str(tmp_path / "overflow.pt")
    save_bundle(bundle, module, model_files.inputs * 10, model_files.targets, "cross-entropy")
    code, out, err = run("hessian", bundle, *FAST)
    assert code == 1 and out == "", err
    assert err.startswith("failed: the loss at the saved parameters is nan although the data are finite")


def test_debug_shows_a_traceback(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["hessian", str(tmp_path / "missing.pt2"), "--data", "x.npz", "--debug"])
    assert r.exit_code != 0 and r.exception is not None  # re-raised, not swallowed


def test_python_dash_m_entry_point_and_clean_stdout(model_files) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "basins.cli", "hessian", model_files.bundle, "--top-k", "2", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["eigenvalues"]) == 2
    assert "P = 67 parameters" in proc.stderr  # logs go to stderr


def test_max_samples_is_recorded(model_files) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run("hessian", model_files.bundle, "--max-samples", "7", *FAST)
    assert code == 0, err
    assert json.loads(out)["num_examples"] == 7
