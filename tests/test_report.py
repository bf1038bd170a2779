"""HDF5 reports (basins/report.py): round trip, atomic writes, replacement, identity and format checks."""

from __future__ import annotations

import math
import os
import stat

import h5py
import numpy as np
import pytest
import torch

from basins.errors import ReportError
from basins.files.report import (
    FORMAT,
    SCHEMA_VERSION,
    Array,
    check_report,
    check_writable,
    read_report,
    write_analysis,
)

PROBLEM = {
    "model": "model.pt", "model_sha256": "a" * 64, "data": "bundle", "data_sha256": "b" * 64,
    "num_params": 1234, "num_examples": 56, "loss": "cross-entropy", "loss_at_optimum": 0.125,
    "grad_norm": 3.5e-7, "dtype": "float64", "device": "cpu", "seed": 0, "max_samples": None,
}
OTHER = {**PROBLEM, "model_sha256": "c" * 64}


def _write(path: str, group: str = "hessian", problem: dict | None = None, **kw: object) -> None:
    attrs = {"tol": 1e-4, "which": "top", "num_hvps": 42, "is_saddle": False, "trace": None,
             "argv": "basins hessian model.pt -o r.h5", "settings": {"k": 10, "labels": ["a", "b"]}}
    arrays = {"eigenvalues": Array(np.array([3.0, 2.0, 1.0]), "Ritz values", "loss / parameter²"),
              "converged": Array(np.array([True, True, False]), "residual ≤ tol", None)}
    write_analysis(path, problem or PROBLEM, group, attrs, arrays, **kw)  # type: ignore[arg-type]


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_round_trip(tmp_path):
    path = str(tmp_path / "r.h5")
    attrs = {
        "int": 7, "float": 0.1 + 0.2, "str": "λ ± r", "bool": True, "none": None, "nan": math.nan,
        "floats": [1.5, 2.5], "mixed": [1, "two", None], "dict": {"a": 1, "b": [1, 2]}, "empty": [],
        "tensor": torch.tensor([1.0, 2.0], dtype=torch.float64),
    }
    vecs = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    arrays = {
        "values": Array(torch.tensor([4.0, -1.0], dtype=torch.float64), "Ritz values", "loss / parameter²"),
        "flags": Array(np.array([True, False]), "converged"),
        "vectors": Array(vecs, "unit vectors (P, k)"),
        "sub/x": Array(np.arange(3), "in a subgroup", "count"),
    }
    write_analysis(path, PROBLEM, "hessian", attrs, arrays, subgroup_attrs={"sub": {"note": "hello"}})
    r = read_report(path)

    assert r["attrs"]["format"] == FORMAT and r["attrs"]["schema_version"] == SCHEMA_VERSION
    for key in ("basins_version", "torch_version", "created"):
        assert isinstance(r["attrs"][key], str) and r["attrs"][key]
    assert r["problem"] == PROBLEM
    a = r["analyses"]["hessian"]["attrs"]
    for key, value in attrs.items():
        if key == "nan":
            assert math.isnan(a[key])
        elif key == "tensor":
            assert a[key] == [1.0, 2.0]
        else:
            assert a[key] == value, key
    assert a["replaced"] == 0 and isinstance(a["created"], str)
    ds = r["analyses"]["hessian"]["datasets"]
    np.testing.assert_array_equal(ds["values"]["values"], [4.0, -1.0])
    assert ds["values"]["values"].dtype == np.float64
    assert ds["values"]["description"] == "Ritz values" and ds["values"]["units"] == "loss / parameter²"
    np.testing.assert_array_equal(ds["flags"]["values"], [True, False])
    assert ds["flags"]["values"].dtype == np.bool_ and ds["flags"]["units"] is None
    np.testing.assert_array_equal(ds["vectors"]["values"], vecs)
    assert ds["vectors"]["values"].dtype == np.float32
    sub = r["analyses"]["hessian"]["groups"]["sub"]
    assert sub["attrs"] == {"note": "hello"}
    np.testing.assert_array_equal(sub["datasets"]["x"]["values"], [0, 1, 2])
    assert sub["datasets"]["x"]["units"] == "count"


def test_no_pickles_every_dataset_has_a_description(tmp_path):
    path = str(tmp_path / "r.h5")
    _write(path)
    with h5py.File(path, "r") as f:
        raw = f["hessian"].attrs["settings"]
        assert isinstance(raw, str) and raw.startswith("json:")  # lists/dicts as JSON text, not pickles

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                assert obj.dtype.kind in "biuf", (name, obj.dtype)
                assert obj.attrs["description"]
            for value in obj.attrs.values():  # type: ignore[attr-defined]
                assert not isinstance(value, np.void) and getattr(value, "dtype", np.dtype("f")).kind != "O"

        f.visititems(visit)


def test_exception_mid_write_leaves_previous_report_byte_identical(tmp_path, monkeypatch):
    path = str(tmp_path / "r.h5")
    _write(path)
    before = _bytes(path)

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(ReportError, match=r"disk on fire\); the old report, if any, is unchanged"):
        _write(path, group="spectrum")
    with pytest.raises(ReportError, match="disk on fire"):
        _write(path, group="hessian")  # replacing the group that exists
    assert _bytes(path) == before
    assert os.listdir(tmp_path) == ["r.h5"]  # no temporary file left behind


def test_interrupt_mid_write_leaves_previous_report(tmp_path, monkeypatch):
    path = str(tmp_path / "r.h5")
    _write(path)
    before = _bytes(path)

    def interrupt(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(h5py.Group, "create_dataset", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _write(path)
    assert _bytes(path) == before and os.listdir(tmp_path) == ["r.h5"]


def test_rerun_replaces_group_counts_and_keeps_others(tmp_path):
    path = str(tmp_path / "r.h5")
    _write(path, group="hessian")
    _write(path, group="spectrum")
    write_analysis(path, PROBLEM, "hessian", {"num_hvps": 99}, {"eigenvalues": Array([5.0], "new", "u")})
    r = read_report(path)
    assert set(r["analyses"]) == {"hessian", "spectrum"}
    h = r["analyses"]["hessian"]
    assert h["attrs"]["replaced"] == 1 and h["attrs"]["num_hvps"] == 99
    assert "tol" not in h["attrs"] and "converged" not in h["datasets"]  # replaced, not merged
    np.testing.assert_array_equal(h["datasets"]["eigenvalues"]["values"], [5.0])
    assert r["analyses"]["spectrum"]["attrs"]["replaced"] == 0
    np.testing.assert_array_equal(r["analyses"]["spectrum"]["datasets"]["eigenvalues"]["values"], [3.0, 2.0, 1.0])
    _write(path, group="hessian")
    assert read_report(path)["analyses"]["hessian"]["attrs"]["replaced"] == 2
    created = read_report(path)["attrs"]["created"]
    assert created == r["attrs"]["created"]  # the file's creation time survives rewrites


def test_report_of_another_problem_refused_unless_force(tmp_path):
    path = str(tmp_path / "r.h5")
    _write(path, group="spectrum")
    before = _bytes(path)
    with pytest.raises(ReportError, match="another problem.*model_sha256.*force=True"):
        _write(path, problem=OTHER)
    with pytest.raises(ReportError, match="another problem"):
        check_writable(path, OTHER)
    assert _bytes(path) == before
    check_writable(path, OTHER, force=True)
    check_writable(path, PROBLEM)
    _write(path, problem=OTHER, force=True)
    r = read_report(path)
    assert r["problem"]["model_sha256"] == "c" * 64
    assert set(r["analyses"]) == {"hessian"}  # the other problem's analyses are dropped


def test_data_hash_difference_also_refused(tmp_path):
    path = str(tmp_path / "r.h5")
    _write(path)
    with pytest.raises(ReportError, match="data_sha256"):
        _write(path, problem={**PROBLEM, "data_sha256": "d" * 64})


def test_random_file_rejected(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(os.urandom(4096))
    for call in (lambda: read_report(str(path)), lambda: check_report(str(path)), lambda: _write(str(path)),
                 lambda: check_writable(str(path), PROBLEM, force=True)):
        with pytest.raises(ReportError, match="not an HDF5 file"):
            call()
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(ReportError, match="not an HDF5 file"):
        read_report(str(empty))


def test_foreign_hdf5_rejected_even_with_force(tmp_path):
    path = str(tmp_path / "foreign.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("weights", data=np.ones(3))
        f.attrs["creator"] = "someone else"
    before = _bytes(path)
    with pytest.raises(ReportError, match="not a basins report"):
        read_report(path)
    with pytest.raises(ReportError, match="not a basins report"):
        _write(path, force=True)
    assert _bytes(path) == before


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "one"])
def test_unknown_schema_version_rejected(tmp_path, version):
    path = str(tmp_path / "r.h5")
    _write(path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = version
    with pytest.raises(ReportError, match="schema version"):
        read_report(path)
    with pytest.raises(ReportError, match="schema version"):
        _write(path)


def test_missing_paths(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        read_report(str(tmp_path / "nope.h5"))
    with pytest.raises(ReportError, match="directory"):
        _write(str(tmp_path / "no-such-dir" / "r.h5"))
    with pytest.raises(ReportError, match="directory"):
        check_writable(str(tmp_path / "no-such-dir" / "r.h5"), PROBLEM)
    with pytest.raises(ReportError, match="is a directory"):
        read_report(str(tmp_path))


def test_bad_group_name(tmp_path):
    with pytest.raises(ValueError, match="group name"):
        _write(str(tmp_path / "r.h5"), group="problem")


def test_file_mode_follows_umask_and_is_kept(tmp_path):
    path = str(tmp_path / "r.h5")
    old = os.umask(0o022)
    try:
        _write(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # not mkstemp's 0600
    os.chmod(path, 0o640)
    _write(path, group="spectrum")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_record_reads_back_as_the_same_record(tmp_path):
    """Record → group → Record: the attribute types that HDF5 would change (a list mixing ints and
    floats, an empty list, a string that looks like JSON text, an int past 64 bits, bools, nested
    values with non-finite floats) come back as they were; arrays keep dtype, ``in_json`` and
    ``json_values``; ``json_only`` and the report's own attributes are kept apart."""
    from basins.record import REPORT_ATTRS, Record, json_object

    attrs = {"mixed": [1, 2.5], "ints": [1, 2], "floats": [0.1, 0.2], "empty": [], "bools": [True, False],
             "text": "json:[1]", "big": 2**70, "nested": {"a": [1.0, math.inf], "b": None}, "nan": math.nan,
             "flag": False, "tensor": torch.tensor([0.1, 0.2], dtype=torch.float32)}
    arrays = {"ragged": Array(torch.tensor([[1.0, math.nan], [2.0, 3.0]], dtype=torch.float32), "padded", "u",
                              json_values=[[1.0], [2.0, 3.0]]),
              "vectors": Array(np.arange(6, dtype=np.int32).reshape(2, 3), "report only", in_json=False),
              "sub/x": Array([1, 2], "in a subgroup"), "flags": Array([True, False], "converged")}
    record = Record(attrs, arrays, json_only={"loadings": [{"index": 0, "per_example": [0.5, 0.5]}]})
    problem = {**PROBLEM, "step": 3}
    path = str(tmp_path / "r.h5")
    write_analysis(path, PROBLEM, "g", record.report_attrs(argv="basins g", problem=problem, warnings=["w"]),
                   record.arrays)
    group = read_report(path)["analyses"]["g"]
    back = Record.from_analysis(group)
    assert set(back.attrs) == set(attrs) and not set(back.attrs) & set(REPORT_ATTRS)
    for key in ("mixed", "ints", "floats", "empty", "bools", "text", "big", "flag"):
        assert back.attrs[key] == attrs[key] and type(back.attrs[key]) is type(attrs[key]), key
    assert [type(v) for v in back.attrs["mixed"]] == [int, float]
    assert back.attrs["nested"]["a"][1] == math.inf and math.isnan(back.attrs["nan"])
    assert back.attrs["tensor"] == [float(v) for v in attrs["tensor"]]  # the float32 values, exactly
    assert back.json_only == record.json_only and group["attrs"]["warnings"] == ["w"]
    assert group["attrs"]["problem"] == problem  # the run's own problem record
    assert back.arrays["vectors"].in_json is False and back.arrays["vectors"].values.dtype == np.int32
    assert back.arrays["ragged"].json_values == [[1.0], [2.0, 3.0]] and back.arrays["ragged"].units == "u"
    assert back.arrays["sub/x"].description == "in a subgroup"
    assert back.as_json() == record.as_json()
    assert json_object(problem, back, ["w"], report=path) == json_object(problem, record, ["w"], report=path)
    obj = record.as_json()
    assert obj["nan"] is None and obj["nested"]["a"][1] is None and "vectors" not in obj
    assert obj["ragged"] == [[1.0], [2.0, 3.0]] and obj["flags"] == [True, False] and obj["loadings"][0]["index"] == 0


def test_record_attributes_may_not_use_the_reports_names() -> None:
    from basins.record import Record

    with pytest.raises(ValueError, match="reserves"):
        Record({"warnings": []}).report_attrs()
    with pytest.raises(ValueError, match="unknown report attribute"):
        Record({}).report_attrs(extra=1)


def test_another_problem_names_the_force_parameter(tmp_path):
    path = str(tmp_path / "r.h5")
    _write(path)
    for attempt in (lambda: _write(path, problem=OTHER), lambda: check_writable(path, OTHER)):
        with pytest.raises(ReportError, match="another problem") as info:
            attempt()
        assert info.value.param == "force"  # the command line shows it as --force
