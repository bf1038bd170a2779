"""Crafted ``.pt2`` archives, one generated case per class of attack: every one is refused with exit 2
and one line naming the item, runs no code (a canary file is never created), reads nothing
outside the inputs (a secret never appears in the output) and allocates nothing big (the memory
classes run in a child process under an address-space limit, with a timeout for hangs).

Each archive is the conftest's dynamic-batch MLP export with its JSON or members edited the way
an attacker would (the classes of issue 23: sympy strings, names pasted into generated code, a
native library, higher-order operators hiding file reads, print and loops, RNG state, sizes that
promise more than the bytes hold, zip members that lie, deep JSON).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from basins.cli.main import main

FAST = ["--top-k", "1", "--json", "-q"]
Edit = Callable[[dict[str, Any], dict[str, bytes], str, str], None]  # (program, members, root, canary)


def _members(src: str) -> dict[str, bytes]:
    with zipfile.ZipFile(src) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _write(members: dict[str, bytes], dst: Path, extra: list[tuple[str, bytes]] = ()) -> str:  # type: ignore[assignment]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for name, data in list(members.items()) + list(extra):
            zf.writestr(name, data)
    return str(dst)


def craft(src: str, dst: Path, canary: str, edit: Edit) -> str:
    members = _members(src)
    root = next(iter(members)).split("/")[0]
    name = f"{root}/models/model.json"
    before = members[name]
    program = json.loads(before)
    edit(program, members, root, canary)
    if members.get(name) is before:  # (an edit may replace the member's bytes itself)
        members[name] = json.dumps(program).encode()
    return _write(members, dst)


SHELL = "__import__('os').system('touch {canary}')"


def _graph(p: dict[str, Any]) -> dict[str, Any]:
    return p["graph_module"]["graph"]


def _input_size(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    user = next(s["user_input"]["arg"]["as_tensor"]["name"] for s in p["graph_module"]["signature"]["input_specs"]
                if "user_input" in s)
    expr = f"Symbol('s0', integer=True) + 0*len(str({SHELL.format(canary=canary)}))"
    _graph(p)["tensor_values"][user]["sizes"][0] = {"as_expr": {"expr_str": expr, "hint": {"as_int": 2}}}


def _range_key(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    p["range_constraints"] = {f"s0+{SHELL.format(canary=canary)}": {"min_val": 0, "max_val": None}}


def _param_name(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    bad = f'w") or getattr(__import__("os"),"system")("touch {canary}") or getattr(self, "w'
    cfg_name = f"{root}/data/weights/model_weights_config.json"
    cfg = json.loads(m[cfg_name])
    old = next(iter(cfg["config"]))
    cfg["config"][bad] = cfg["config"].pop(old)
    m[cfg_name] = json.dumps(cfg).encode()
    for spec in p["graph_module"]["signature"]["input_specs"]:
        if spec.get("parameter", {}).get("parameter_name") == old:
            spec["parameter"]["parameter_name"] = bad


def _reserved_name(reserved: str) -> Edit:
    def edit(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
        cfg_name = f"{root}/data/weights/model_weights_config.json"
        cfg = json.loads(m[cfg_name])
        old = next(iter(cfg["config"]))
        cfg["config"][reserved] = cfg["config"].pop(old)
        m[cfg_name] = json.dumps(cfg).encode()
        for spec in p["graph_module"]["signature"]["input_specs"]:
            if spec.get("parameter", {}).get("parameter_name") == old:
                spec["parameter"]["parameter_name"] = reserved
    return edit


def _node_name(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    _graph(p)["nodes"][0]["name"] = f"x = {SHELL.format(canary=canary)}; y"


def _arg_name(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    top = p["graph_module"]["module_call_graph"][0]["signature"]
    top["forward_arg_names"] = [f"x=({SHELL.format(canary=canary)})"]


def _native_library(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    m[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF" + b"\0" * 60


def _hop(target: str, **extra: Any) -> Edit:
    """A higher-order operator node (cond, while_loop, print) whose subgraph would read a file."""

    def edit(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
        inner = {"nodes": [{"target": "torch.ops.aten.from_file.default", "name": "secret", "metadata": {},
                            "inputs": [{"name": "filename", "arg": {"as_string": canary}, "kind": 1}],
                            "outputs": [{"as_tensor": {"name": "secret"}}], "is_hop_single_tensor_return": None}],
                 "inputs": [], "outputs": [{"as_tensor": {"name": "secret"}}], "tensor_values": {},
                 "sym_int_values": {}, "sym_bool_values": {}, "sym_float_values": {}, "custom_obj_values": {},
                 "is_single_tensor_return": True}
        _graph(p)["nodes"].insert(0, {
            "target": target, "name": "hop", "metadata": {}, "is_hop_single_tensor_return": None,
            "inputs": [{"name": "", "arg": {"as_graph": {"name": "true_graph_0", "graph": inner}}, "kind": 1},
                       {"name": "", "arg": {"as_string": f"{{0.__class__}} {canary}"}, "kind": 1}],
            "outputs": [{"as_tensor": {"name": "hop_out"}}], **extra})
    return edit


def _aten(target: str, inputs: list[dict[str, Any]]) -> Edit:
    def edit(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
        _graph(p)["nodes"].insert(0, {"target": target, "name": "evil", "metadata": {},
                                      "is_hop_single_tensor_return": None, "inputs": inputs,
                                      "outputs": [{"as_tensor": {"name": "evil"}}]})
    return edit


def _sym_pow(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    _graph(p)["nodes"].insert(0, {"target": "_operator.pow", "name": "tower", "metadata": {},
                                  "is_hop_single_tensor_return": None,
                                  "inputs": [{"name": "a", "arg": {"as_sym_int": {"as_int": 10}}, "kind": 1},
                                             {"name": "b", "arg": {"as_sym_int": {"as_int": 10 ** 9}}, "kind": 1}],
                                  "outputs": [{"as_sym_int": {"as_name": "tower"}}]})


def _size_overflow(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    user = next(s["user_input"]["arg"]["as_tensor"]["name"] for s in p["graph_module"]["signature"]["input_specs"]
                if "user_input" in s)
    _graph(p)["nodes"][:0] = [
        {"target": "torch.ops.aten.sym_size.int", "name": "n", "metadata": {}, "is_hop_single_tensor_return": None,
         "inputs": [{"name": "self", "arg": {"as_tensor": {"name": user}}, "kind": 1},
                    {"name": "dim", "arg": {"as_int": 0}, "kind": 1}],
         "outputs": [{"as_sym_int": {"as_name": "n"}}]},
        {"target": "_operator.mul", "name": "big", "metadata": {}, "is_hop_single_tensor_return": None,
         "inputs": [{"name": "a", "arg": {"as_sym_int": {"as_name": "n"}}, "kind": 1},
                    {"name": "b", "arg": {"as_sym_int": {"as_int": 2 ** 62}}, "kind": 1}],
         "outputs": [{"as_sym_int": {"as_name": "big"}}]},
    ]


def _weight_meta(**change: Any) -> Edit:
    def edit(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
        cfg_name = f"{root}/data/weights/model_weights_config.json"
        cfg = json.loads(m[cfg_name])
        entry = next(iter(cfg["config"].values()))
        entry["tensor_meta"].update(change)
        m[cfg_name] = json.dumps(cfg).encode()
        if change.get("sizes") and "strides" not in change:  # an empty payload, declared huge
            m[f"{root}/data/weights/{entry['path_name']}"] = b""
    return edit


def _fixed_batch(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    user = next(s["user_input"]["arg"]["as_tensor"]["name"] for s in p["graph_module"]["signature"]["input_specs"]
                if "user_input" in s)
    _graph(p)["tensor_values"][user]["sizes"][0] = {"as_int": 10 ** 8}


def _guards(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    p["guards_code"] = [SHELL.format(canary=canary)]


def _namedtuple(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    p["graph_module"]["treespec_namedtuple_fields"] = {"os.system": {"field_names": ["a"]}}


def _spec_type(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    top = p["graph_module"]["module_call_graph"][0]["signature"]
    top["out_spec"] = json.dumps([1, {"type": "collections.namedtuple", "context": "null", "children_spec": []}])


def _unknown_field(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    p["graph_module"]["graph"]["nodes"][0]["default"] = SHELL.format(canary=canary)


def _extra_member(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    m[f"{root}/extra/evil.pkl"] = b"\x80\x04."


def _deep_json(p: dict[str, Any], m: dict[str, bytes], root: str, canary: str) -> None:
    m[f"{root}/models/model.json"] = b"[" * 100_000 + b"]" * 100_000


#: (edit, words the one-line error must contain)
CASES: dict[str, tuple[Edit, str]] = {
    "sympy-in-input-size": (_input_size, "not a bare symbol"),
    "sympy-in-range-constraint": (_range_key, "not a bare symbol"),
    "code-in-parameter-name": (_param_name, "not a dotted identifier"),
    "code-in-node-name": (_node_name, "not a plain identifier"),
    "code-in-forward-arg-name": (_arg_name, "not a plain identifier"),
    "param-named-forward": (_reserved_name("forward"), "'forward' is not a dotted identifier"),
    "param-named-training": (_reserved_name("training"), "'training'"),
    "param-named-_parameters": (_reserved_name("_parameters"), "'_parameters'"),
    "param-named-empty": (_reserved_name(""), "name '' is not"),
    "native-library": (_native_library, "native library"),
    "cond-reading-a-file": (_hop("torch.ops.higher_order.cond"), "higher_order.cond.*not an aten"),
    "while-loop": (_hop("torch.ops.higher_order.while_loop"), "higher_order.while_loop"),
    "print": (_hop("torch.ops.higher_order.print"), "higher_order.print"),
    "from-file": (_aten("torch.ops.aten.from_file.default",
                        [{"name": "filename", "arg": {"as_string": "/etc/passwd"}, "kind": 1}]), "aten::from_file"),
    "aten-print": (_aten("torch.ops.aten._print.default",
                         [{"name": "s", "arg": {"as_string": "{0.__class__}"}, "kind": 1}]), "aten::_print"),
    "rng-draw": (_aten("torch.ops.aten.rand.default",
                       [{"name": "size", "arg": {"as_ints": [2]}, "kind": 1}]), "draws random numbers"),
    "custom-namespace": (_aten("torch.ops.mylib.evil.default", []), "mylib.evil"),
    "meta-device-argument": (_aten("torch.ops.aten.zeros.default",
                                   [{"name": "size", "arg": {"as_ints": [2]}, "kind": 1},
                                    {"name": "device", "arg": {"as_device": {"type": "meta", "index": None}}, "kind": 2}]),
                             "device 'meta'"),
    "manual-seed": (_aten("torch.ops.aten.manual_seed.default", []), "manual_seed"),
    "size-power-tower": (_sym_pow, "_operator.pow"),
    "size-overflow-at-run-time": (_size_overflow, "overflows int64"),
    "meta-device-weight": (_weight_meta(device={"type": "meta", "index": None}), "not a strided CPU or CUDA tensor"),
    "guard-code": (_guards, "guard code"),
    "namedtuple-types": (_namedtuple, "namedtuple"),
    "pytree-type": (_spec_type, "collections.namedtuple"),
    "unknown-node-field": (_unknown_field, "unknown field 'default'"),
    "extra-member": (_extra_member, "extra/evil.pkl"),
    "deep-json": (_deep_json, "nested more than"),
}


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_pt2_class_is_refused(case: str, model_files, data_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    edit, words = CASES[case]
    canary = tmp_path / "canary"
    crafted = craft(model_files.pt2, tmp_path / "crafted.pt2", str(canary), edit)
    code, out, err = run("hessian", crafted, "--data", data_files.pt, *FAST)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and out == "" and len(lines) == 1, (code, out, err)
    assert lines[0].startswith("error: ")
    assert re.search(words, lines[0]), lines[0]
    assert not canary.exists()
    if "not a readable zip" not in lines[0]:
        assert "--trust-pickle" in lines[0] or "nested" in lines[0] or "overflows" in lines[0]


def test_duplicate_members_and_bad_crc_are_refused(model_files, data_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    members = _members(model_files.pt2)
    weight = next(n for n in members if n.endswith("weights/weight_0"))
    dup = _write(members, tmp_path / "dup.pt2", [(weight, bytes(len(members[weight])))])
    code, _, err = run("hessian", dup, "--data", data_files.pt, *FAST)
    assert code == 2 and "appears twice" in err and len(err.strip().splitlines()) == 1
    data = bytearray(Path(model_files.pt2).read_bytes())
    at = data.find(members[weight][:16])
    data[at + 3] ^= 0x55
    (tmp_path / "crc.pt2").write_bytes(bytes(data))
    code, _, err = run("hessian", str(tmp_path / "crc.pt2"), "--data", data_files.pt, *FAST)
    assert code == 2 and "CRC" in err and len(err.strip().splitlines()) == 1


def _fake_compressed_size(src: str, dst: Path) -> str:
    """A deflated 64 MiB member whose central directory claims a compressed size near its real size."""
    members = _members(src)
    root = next(iter(members)).split("/")[0]
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data, zipfile.ZIP_STORED)
        zf.writestr(f"{root}/data/weights/weight_9", b"\0" * (64 << 20), zipfile.ZIP_DEFLATED)
    raw = bytearray(dst.read_bytes())
    with zipfile.ZipFile(dst) as zf:
        info = zf.getinfo(f"{root}/data/weights/weight_9")
    name = info.filename.encode()
    at = raw.find(b"PK\x01\x02", 0)
    while at >= 0 and raw[at + 46: at + 46 + len(name)] != name:
        at = raw.find(b"PK\x01\x02", at + 4)
    assert at >= 0
    raw[at + 20: at + 24] = (info.file_size // 2).to_bytes(4, "little")  # compressed size: a lie
    dst.write_bytes(bytes(raw))
    return str(dst)


MEMORY_CASES: dict[str, tuple[Edit | None, str]] = {
    "empty-payload-declared-huge": (_weight_meta(sizes=[{"as_int": 100_000}, {"as_int": 100_000}]), "promises more"),
    "stride-0-weight": (_weight_meta(sizes=[{"as_int": 100_000}, {"as_int": 100_000}],
                                     strides=[{"as_int": 0}, {"as_int": 0}]), "promises more"),
    "fixed-batch-1e8": (_fixed_batch, "more than the .* bytes of memory"),
    "fake-compressed-size": (None, "zip bomb"),
}


@pytest.mark.slow
def test_memory_classes_refused_under_an_address_space_limit(model_files, data_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Small files that would make torch allocate gigabytes: refused before allocating, in a child
    process whose address space is limited to what it has plus 1 GiB (a timeout catches hangs)."""
    paths = {}
    for case, (edit, _) in MEMORY_CASES.items():
        dst = tmp_path / f"{case}.pt2"
        paths[case] = (_fake_compressed_size(model_files.pt2, dst) if edit is None
                       else craft(model_files.pt2, dst, str(tmp_path / "canary"), edit))
    script = (
        "import json, resource, sys\n"
        "from click.testing import CliRunner\n"
        "from basins.cli.main import main\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * 4096\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))\n"
        "out = {}\n"
        "for case, path in json.loads(sys.argv[1]).items():\n"
        "    r = CliRunner().invoke(main, ['hessian', path, '--data', sys.argv[2], '--top-k', '1', '--json', '-q'])\n"
        "    out[case] = [r.exit_code, r.stdout, r.stderr]\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(paths), data_files.pt], capture_output=True,
                          text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case, (_, words) in MEMORY_CASES.items():
        code, out, err = results[case]
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and out == "" and len(lines) == 1, (case, code, err)
        assert re.search(words, lines[0]), (case, lines[0])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sympy-in-input-size"])
def test_the_canary_works_under_plain_torch(case: str, model_files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The crafted archives are really hostile: plain ``torch.export.load(...).module()`` runs their
    code (so the canary checks above can fail)."""
    import torch

    canary = tmp_path / "canary"
    crafted = craft(model_files.pt2, tmp_path / "crafted.pt2", str(canary), CASES[case][0])
    try:
        torch.export.load(crafted).module()
    except Exception:
        pass
    assert canary.exists()
