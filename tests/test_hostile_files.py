"""Crafted data files and reports (issue 23, beyond ``.pt2``): every class is exit 2 with one line,
reads nothing outside the inputs (a secret file never shows), allocates nothing big and never
follows a symlink it did not make.

Classes: ``.h5`` data and reports with external links, soft links, virtual datasets, external raw
storage, hard-link cycles and sparse datasets declaring 1e8 rows; ``.npz`` zip bombs and arrays
whose headers promise more than their bytes; big-endian arrays (read, converted); sparse and
``meta`` tensors; report attributes of deep JSON; a symlinked report lock; ``-o`` names too long;
a full disk (a file-size limit in a child process) with the old report intact.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from basins.cli.main import main
from basins.errors import ReportError
from basins.files.report import read_report, write_analysis

FAST = ["--top-k", "1", "--json", "-q"]
SECRET = "s3cret-0451"


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def one_line(code: int, out: str, err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and out == "" and len(lines) == 1, (code, out, err)
    assert SECRET not in err
    return lines[0]


def _other(tmp: Path) -> str:
    (tmp / "secret.txt").write_text(SECRET)
    path = tmp / "other.h5"
    with h5py.File(path, "w") as f:
        f["inputs"] = np.full((20, 4), 7.0, dtype=np.float32)
        f["targets"] = np.zeros(20, dtype=np.int64)
    return str(path)


def _external_link(tmp: Path, f: h5py.File) -> None:
    f["inputs"] = h5py.ExternalLink(_other(tmp), "/inputs")


def _external_fifo(tmp: Path, f: h5py.File) -> None:
    os.mkfifo(tmp / "fifo.h5")
    f["inputs"] = h5py.ExternalLink(str(tmp / "fifo.h5"), "/inputs")


def _virtual(tmp: Path, f: h5py.File) -> None:
    layout = h5py.VirtualLayout(shape=(20, 4), dtype="f4")
    layout[:] = h5py.VirtualSource(_other(tmp), "inputs", shape=(20, 4))
    f.create_virtual_dataset("inputs", layout)


def _external_raw(tmp: Path, f: h5py.File) -> None:
    _other(tmp)
    f.create_dataset("inputs", shape=(20, 4), dtype="u1", external=[(str(tmp / "secret.txt"), 0, 80)])


def _soft_loop(tmp: Path, f: h5py.File) -> None:
    f["inputs"] = h5py.SoftLink("/inputs")


def _hard_cycle(tmp: Path, f: h5py.File) -> None:
    g = f.create_group("inputs")
    g["again"] = g


def _sparse(tmp: Path, f: h5py.File) -> None:
    f.create_dataset("inputs", shape=(10 ** 8, 4), chunks=(1000, 4), dtype="f4")


H5_CASES: dict[str, tuple[Callable[[Path, h5py.File], None], str]] = {
    "external-link": (_external_link, "external link"),
    "external-link-to-a-fifo": (_external_fifo, "external link"),
    "virtual-dataset": (_virtual, "virtual dataset"),
    "external-raw-storage": (_external_raw, "external files"),
    "soft-link-to-itself": (_soft_loop, "soft link"),
    "hard-link-cycle": (_hard_cycle, "reached twice"),
    "sparse-1e8-rows": (_sparse, "declares shape \\(100000000, 4\\)"),
}


def _h5_data(tmp: Path, case: str) -> str:
    path = tmp / f"{case}.h5"
    with h5py.File(path, "w") as f:
        f["targets"] = np.zeros(20, dtype=np.int64)
        H5_CASES[case][0](tmp, f)
    return str(path)


@pytest.mark.parametrize("case", list(H5_CASES))
def test_crafted_h5_data_is_refused(case: str, model_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import re

    data = _h5_data(tmp_path, case)
    if "fifo" in case:  # a hang would be the failure: a child process with a timeout
        done = subprocess.run([sys.executable, "-m", "basins.cli", "hessian", model_files.pt2, "--data", data, *FAST],
                              capture_output=True, text=True, timeout=180)
        line = one_line(done.returncode, done.stdout, done.stderr)
    else:
        line = one_line(*run("hessian", model_files.pt2, "--data", data, *FAST))
    assert re.search(H5_CASES[case][1], line), line


@pytest.mark.parametrize("case", ["external-link", "virtual-dataset", "hard-link-cycle", "sparse-1e8-rows"])
@pytest.mark.parametrize("command", ["summary", "plot"])
def test_crafted_h5_report_is_refused(case: str, command: str, tmp_path: Path) -> None:
    import re

    report = tmp_path / "r.h5"
    write_analysis(str(report), {"model_sha256": "a", "data_sha256": "b"}, "hessian", {"top_k": 1})
    with h5py.File(report, "a") as f:
        H5_CASES[case][0](tmp_path, f["hessian"])
    args = [command, str(report)] + (["-o", str(tmp_path / "p.png")] if command == "plot" else [])
    line = one_line(*run(*args))
    assert re.search(H5_CASES[case][1], line), line


def test_report_attribute_of_deep_json_is_refused(tmp_path: Path) -> None:
    report = str(tmp_path / "r.h5")
    write_analysis(report, {"model_sha256": "a", "data_sha256": "b"}, "hessian", {"top_k": 1})
    with h5py.File(report, "a") as f:
        f["hessian"].attrs["settings"] = "json:" + "[" * 100_000 + "]" * 100_000
    with pytest.raises(ReportError, match="nested more than"):
        read_report(report)
    assert "nested more than" in one_line(*run("summary", report))


def _npy(shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def test_npz_bombs_are_refused(model_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    header = tmp_path / "header.npz"
    with zipfile.ZipFile(header, "w") as z:
        z.writestr("inputs.npy", _npy((10 ** 9, 4), b"\0" * 64))
        z.writestr("targets.npy", _npy((10 ** 9,)))
    assert "declares shape (1000000000, 4)" in one_line(*run("hessian", model_files.pt2, "--data", str(header), *FAST))
    deflated = tmp_path / "deflate.npz"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("inputs.npy", _npy((40 << 20,), b"\0" * (320 << 20)))
        z.writestr("targets.npy", _npy((1,), b"\0" * 8))
    assert "zip bomb" in one_line(*run("hessian", model_files.pt2, "--data", str(deflated), *FAST))


def test_big_endian_npz_is_read(model_files, data_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A big-endian .npz holds the same numbers: it is read (converted), with the same result."""
    with np.load(data_files.npz) as npz:
        x, y = npz["inputs"], npz["targets"]
    path = tmp_path / "big.npz"
    np.savez(path, inputs=x.astype(x.dtype.newbyteorder(">")), targets=y.astype(y.dtype.newbyteorder(">")))
    code, out, err = run("hessian", model_files.pt2, "--data", str(path), *FAST)
    code0, out0, _ = run("hessian", model_files.pt2, "--data", data_files.npz, *FAST)
    assert code == 0 == code0, err
    import json

    a, b = json.loads(out), json.loads(out0)
    assert a["eigenvalues"] == b["eigenvalues"] and a["data_sha256"] == b["data_sha256"]


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_and_meta_tensors_in_data_are_refused(kind: str, model_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(20, 4)
    x = x.to_sparse() if kind == "sparse" else torch.empty(20, 4, device="meta")
    torch.save({"inputs": x, "targets": torch.zeros(20, dtype=torch.int64)}, tmp_path / "d.pt")
    line = one_line(*run("hessian", model_files.pt2, "--data", str(tmp_path / "d.pt"), *FAST))
    assert ("sparse" if kind == "sparse" else "meta device") in line


def test_symlinked_lock_is_an_error_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    report = tmp_path / "r.h5"
    (tmp_path / ".r.h5.lock").symlink_to(victim)
    with pytest.raises(ReportError, match="lock file .* is a symbolic link"):
        write_analysis(str(report), {"model_sha256": "a", "data_sha256": "b"}, "hessian", {"top_k": 1})
    assert victim.read_text() == "keep" and not report.exists()
    dangling = tmp_path / ".d.h5.lock"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(ReportError, match="symbolic link"):
        write_analysis(str(tmp_path / "d.h5"), {"model_sha256": "a", "data_sha256": "b"}, "hessian", {"top_k": 1})
    assert not (tmp_path / "created-through-the-link").exists()


def test_output_name_too_long_and_output_directory(model_files, data_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    line = one_line(*run("hessian", model_files.pt2, "--data", data_files.pt, *FAST, "-o", str(tmp_path / ("a" * 300))))
    assert "name is longer" in line
    code, _, err = run("hessian", model_files.pt2, "--data", data_files.pt, *FAST, "-o", str(tmp_path))
    assert code == 0, err
    assert (tmp_path / "dynamic.h5").exists()  # -o DIR writes DIR/{name}.h5, as the README says


@pytest.mark.slow
def test_full_disk_keeps_the_old_report(tmp_path: Path) -> None:
    """Writing a report past a file-size limit (the disk is full for this process) is one line,
    exit 2, and the old report is byte for byte what it was."""
    report = tmp_path / "r.h5"
    write_analysis(str(report), {"model_sha256": "a", "data_sha256": "b"}, "hessian", {"top_k": 1})
    before = report.read_bytes()
    script = (
        "import resource, signal, sys, numpy as np\n"
        "from basins.errors import InputError\n"
        "from basins.files.report import write_analysis, Array\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    write_analysis(sys.argv[1], {'model_sha256': 'a', 'data_sha256': 'b'}, 'spectrum', {},\n"
        "                   {'big': Array(np.zeros(1 << 20), 'zeros')})\n"
        "except InputError as err:\n"
        "    print(err); sys.exit(2)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(report)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "File too large" in done.stdout and "unchanged" in done.stdout and len(done.stdout.strip().splitlines()) == 1
    assert report.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.h5"]


def test_torch_save_record_with_a_fake_size_is_refused(model_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A .pt data file whose zip directory declares a record far bigger than the file: refused
    before torch allocates it."""
    path = tmp_path / "d.pt"
    torch.save({"inputs": torch.randn(20, 4), "targets": torch.zeros(20, dtype=torch.int64)}, path)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    while at >= 0 and not raw[at + 46: at + 46 + 64].split(b"PK")[0].endswith(b"/data/0"):
        at = raw.find(b"PK\x01\x02", at + 4)
    assert at >= 0
    raw[at + 24: at + 28] = (0xFFFFFFF0).to_bytes(4, "little")  # uncompressed size: about 4 GB
    path.write_bytes(bytes(raw))
    line = one_line(*run("hessian", model_files.pt2, "--data", str(path), *FAST))
    assert "data/0" in line and "zip bomb" in line
