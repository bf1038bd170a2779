"""Read a ``torch.export`` archive (``.pt2``) straight into a ``GraphModule``, without ``torch.export.load``.

Why: in torch 2.13 ``torch.export.load`` imports its serialiser, which imports ``torch._dynamo``,
``sympy``, ``torch.distributed`` and ``torch.onnx`` (about 840 modules): 1.2–1.4 s and 75 MiB of
resident memory per process on a small CPU machine, more than a whole Lanczos run on a 26k-parameter
MLP. The archive itself is plain JSON (the graph, schema ``8.x``) and raw tensor bytes, and the
programs basins reads use a small part of what that JSON can say.

What is read here (anything else makes :func:`read_export_archive` return ``None`` and the caller
uses ``torch.export.load``, so the two paths never disagree on what a file means):

* one model per archive, little-endian, schema major version :data:`SCHEMA_MAJOR`;
* parameters, buffers and tensor constants stored as raw bytes (never a pickle), on the CPU;
* one user input, a tensor with a static shape, and user outputs only (no mutations);
* nodes that call ``torch.ops.aten`` or ``torch.ops.prims`` operator overloads, with arguments that
  are tensors, lists of (optional) tensors, ``None``, numbers, booleans, strings, dtypes, layouts,
  memory formats and devices; single, listed and missing outputs.

The module returned behaves like ``ExportedProgram.module()``: the same parameter and buffer names
in the same order, the same graph (operators, arguments, positional/keyword split by the
operator's schema), the same pytree calling convention, and a check that the input has the
exported shape. ``tests/test_export_reader.py`` compares the two on a zoo of models, bit for bit.

Reference: the archive layout and schema are torch's ``torch/export/pt2_archive/_package.py`` and
``torch/_export/serde/schema.py`` (read for the format; no code is shared).
"""

from __future__ import annotations

import io
import json
import operator
import zipfile
from typing import IO, Any

import torch

from basins.errors import InputError

from .archive_safety import check_member_size

__all__ = ["read_export_archive", "SCHEMA_MAJOR"]

#: The export schema major version read here (torch 2.13 writes 8.20).
SCHEMA_MAJOR = 8

_DTYPES = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
    7: torch.float32, 8: torch.float64, 9: torch.complex32, 10: torch.complex64, 11: torch.complex128,
    12: torch.bool, 13: torch.bfloat16, 28: torch.uint16, 34: torch.uint32, 35: torch.uint64,
}
_LAYOUTS = {7: torch.strided}
_MEMORY_FORMATS = {1: torch.contiguous_format, 2: torch.channels_last, 3: torch.channels_last_3d,
                   4: torch.preserve_format}
_NAMESPACES = ("aten", "prims")
_POSITIONAL, _KEYWORD = 1, 2


class _Outside(Exception):
    """The archive uses something outside the subset read here (the message says what)."""


def read_export_archive(archive: str | bytes, source: str) -> tuple[torch.fx.GraphModule, tuple[int, ...]] | None:
    """The archive's program as a ``GraphModule`` and its input's shape, or None when it is
    outside the subset this reader handles (module docstring).

    Args:
        archive: path of a ``.pt2`` file, or its bytes (a bundle's embedded model).
        source: the name used in messages.

    Returns:
        ``(module, input_shape)`` with the module in the state ``ExportedProgram.module()`` would
        give (training flags untouched), or ``None``.

    Raises:
        InputError: a member's declared size is implausible (a zip bomb).
    """
    handle: IO[bytes] | str = io.BytesIO(archive) if isinstance(archive, bytes) else archive
    try:
        with zipfile.ZipFile(handle) as zf:
            return _read(zf, source)
    except InputError:
        raise
    except (_Outside, zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError, IndexError,
            RuntimeError, UnicodeDecodeError, OverflowError, RecursionError):
        return None  # torch.export.load reads it, or says what is wrong with it


def _read(zf: zipfile.ZipFile, source: str) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    infos = {info.filename: info for info in zf.infolist()}

    def member(name: str) -> bytearray:
        """A member's bytes, inflated straight into one writable buffer (the tensors share it)."""
        info = infos[name]
        check_member_size(info, source)
        buf = bytearray(info.file_size)
        view, got = memoryview(buf), 0
        with zf.open(info) as f:
            while got < len(buf):
                n = f.readinto(view[got:])  # type: ignore[attr-defined]
                if not n:
                    break
                got += n
            if got != len(buf) or f.read(1):  # (reading to the end also checks the CRC)
                raise _Outside("member size")
        return buf

    models = [n for n in infos if n.count("/") == 2 and n.split("/")[1] == "models" and n.endswith(".json")]
    if len(models) != 1:
        raise _Outside(f"{len(models)} models")
    root, _, file = models[0].split("/")
    name = file[: -len(".json")]
    if member(f"{root}/archive_format").decode().strip() != "pt2":
        raise _Outside("archive format")
    if f"{root}/byteorder" in infos and member(f"{root}/byteorder").decode().strip() != "little":
        raise _Outside("byte order")
    program = json.loads(member(models[0]))
    if int(program["schema_version"]["major"]) != SCHEMA_MAJOR:
        raise _Outside("schema version")
    state = _payload(member, f"{root}/data/weights", f"{name}_weights_config.json")
    constants = _payload(member, f"{root}/data/constants", f"{name}_constants_config.json")
    return _build(program["graph_module"], state, constants)


def _payload(member: Any, folder: str, config_name: str) -> dict[str, tuple[torch.Tensor, bool]]:
    """``{fqn: (tensor, is_param)}`` from a payload config and its raw files (storage shared as saved)."""
    config = json.loads(member(f"{folder}/{config_name}"))["config"]
    storages: dict[str, torch.Tensor] = {}
    out: dict[str, tuple[torch.Tensor, bool]] = {}
    for fqn, meta in config.items():
        path = str(meta["path_name"])
        if meta.get("use_pickle") or not path.startswith(("weight_", "tensor_")) or "/" in path:
            raise _Outside("pickled or object payload")
        tm = meta["tensor_meta"]
        dtype = _DTYPES[int(tm["dtype"])]
        if tm["device"]["type"] != "cpu" or int(tm["layout"]) != 7:
            raise _Outside("device or layout")
        size, stride = _ints(tm["sizes"]), _ints(tm["strides"])
        offset = _ints([tm["storage_offset"]])[0]
        if path not in storages:
            raw = member(f"{folder}/{path}")
            item = torch.empty((), dtype=dtype).element_size()
            if len(raw) % item:
                raise _Outside("payload size")
            storages[path] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        flat = storages[path]
        if flat.dtype != dtype:  # two dtypes over one storage: not what torch.export.save writes
            raise _Outside("payload dtypes")
        need = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
        if need > flat.numel():
            raise _Outside("payload shorter than its tensor")
        tensor = torch.as_strided(flat, size, stride, offset) if flat.numel() else torch.zeros(size, dtype=dtype)
        is_param = bool(meta.get("is_param"))
        if is_param:
            tensor = torch.nn.Parameter(tensor, requires_grad=bool(tm["requires_grad"]))
        out[str(fqn)] = (tensor, is_param)
    return out


def _ints(values: list[dict[str, Any]]) -> tuple[int, ...]:
    """Static sizes/strides (``{"as_int": n}``); a symbolic one is outside the subset."""
    out = []
    for v in values:
        if set(v) != {"as_int"}:
            raise _Outside("symbolic size")
        out.append(int(v["as_int"]))
    return tuple(out)


def _one_key(union: dict[str, Any]) -> tuple[str, Any]:
    """The (type, value) of a serialised union (a dict with one key)."""
    if len(union) != 1:
        raise _Outside("malformed union")
    return next(iter(union.items()))


def _build(gm: dict[str, Any], state: dict[str, tuple[torch.Tensor, bool]],
           constants: dict[str, tuple[torch.Tensor, bool]]) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
    from torch.utils._pytree import treespec_loads

    serial = gm["graph"]
    signature = gm["signature"]
    calls = gm["module_call_graph"]
    if not calls or calls[0]["fqn"] != "" or calls[0]["signature"] is None:
        raise _Outside("module call graph")
    top = calls[0]["signature"]
    in_spec, out_spec = treespec_loads(top["in_spec"]), treespec_loads(top["out_spec"])

    graph = torch.fx.Graph()
    root = torch.nn.Module()
    nodes: dict[str, torch.fx.Node] = {}
    user: list[str] = []
    non_persistent: list[str] = []
    constant_names: list[str] = []
    attrs: list[tuple[str, str]] = []  # (graph name, attribute path)
    for spec in signature["input_specs"]:
        kind, body = _one_key(spec)
        if kind == "user_input":
            arg_kind, arg = _one_key(body["arg"])
            if arg_kind != "as_tensor":
                raise _Outside("non-tensor user input")
            user.append(arg["name"])
            continue
        if kind == "parameter":
            target, (value, is_param) = body["parameter_name"], state[body["parameter_name"]]
            if not is_param:
                raise _Outside("parameter stored as a tensor")
            _assign(root, target, value, "parameter")
        elif kind == "buffer":
            target = body["buffer_name"]  # a non-persistent buffer is stored with the constants
            value, _ = state[target] if target in state else constants[target]
            _assign(root, target, value, "buffer")
            if not body.get("persistent", True):
                non_persistent.append(target)
        elif kind == "tensor_constant":
            target, (value, _) = body["tensor_constant_name"], constants[body["tensor_constant_name"]]
            _assign(root, target, value, "constant")
            constant_names.append(target)
        else:
            raise _Outside(f"input kind {kind}")
        attrs.append((body["arg"]["name"], target))
    graph_inputs = [_one_key(a) for a in serial["inputs"]]
    if len(user) != 1 or ("as_tensor", {"name": user[0]}) not in graph_inputs:
        raise _Outside("inputs")
    for spec in signature["output_specs"]:
        if _one_key(spec)[0] != "user_output":
            raise _Outside("output kind")
    meta = serial["tensor_values"][user[0]]
    input_shape = _ints(meta["sizes"])

    for graph_name, target in attrs:
        nodes[graph_name] = graph.get_attr(target)
    nodes[user[0]] = graph.placeholder(user[0])
    for node in serial["nodes"]:
        _add_node(graph, nodes, node)
    outputs = []
    for out in serial["outputs"]:
        kind, value = _one_key(out)
        if kind != "as_tensor":
            raise _Outside("non-tensor output")
        outputs.append(nodes[value["name"]])
    graph.output(tuple(outputs))
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(list(top["forward_arg_names"]), in_spec, out_spec))
    module = torch.fx.GraphModule(root, graph)
    for target in non_persistent:
        owner, _, leaf = target.rpartition(".")
        module.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
    for target in constant_names:  # GraphModule copied them as buffers; the exported module holds plain attributes
        owner, _, leaf = target.rpartition(".")
        sub = module.get_submodule(owner)
        setattr(sub, leaf, sub._buffers.pop(leaf))
    module.register_forward_pre_hook(_shape_check(user[0], input_shape))
    return module, input_shape


def _assign(root: torch.nn.Module, target: str, value: torch.Tensor, kind: str) -> None:
    """Register ``value`` at dotted ``target`` under ``root``, creating plain submodules on the way."""
    *path, leaf = target.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
        if not isinstance(owner, torch.nn.Module):
            raise _Outside("attribute path")
    if kind == "parameter":
        owner.register_parameter(leaf, value)  # type: ignore[arg-type]
    elif kind == "buffer":
        owner.register_buffer(leaf, value)
    else:
        setattr(owner, leaf, value)


def _operator(target: str) -> torch._ops.OpOverload:
    parts = target.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"] or parts[2] not in _NAMESPACES:
        raise _Outside(f"operator {target}")
    op = getattr(getattr(getattr(torch.ops, parts[2]), parts[3]), parts[4])
    if not isinstance(op, torch._ops.OpOverload):
        raise _Outside(f"operator {target}")
    return op


def _argument(arg: dict[str, Any], nodes: dict[str, torch.fx.Node]) -> Any:
    kind, value = _one_key(arg)
    if kind == "as_none":
        return None
    if kind == "as_tensor":
        return nodes[value["name"]]
    if kind == "as_tensors":
        return [nodes[v["name"]] for v in value]
    if kind == "as_optional_tensors":
        out = []
        for v in value:
            k, inner = _one_key(v)
            if k not in ("as_none", "as_tensor"):
                raise _Outside("optional tensor")
            out.append(None if k == "as_none" else nodes[inner["name"]])
        return out
    if kind in ("as_int", "as_float", "as_bool", "as_string"):
        if not isinstance(value, (int, float, str)):
            raise _Outside("scalar")
        return value
    if kind in ("as_ints", "as_floats", "as_bools", "as_strings"):
        return list(value)
    if kind == "as_scalar_type":
        return _DTYPES[int(value)]
    if kind == "as_layout":
        return _LAYOUTS[int(value)]
    if kind == "as_memory_format":
        return _MEMORY_FORMATS[int(value)]
    if kind == "as_device":
        return torch.device(value["type"]) if value.get("index") is None else torch.device(value["type"], value["index"])
    if kind == "as_complex":
        return complex(value["real"], value["imag"])
    raise _Outside(f"argument {kind}")


def _add_node(graph: torch.fx.Graph, nodes: dict[str, torch.fx.Node], node: dict[str, Any]) -> None:
    """One serialised call: its arguments placed by the operator's schema, its outputs named."""
    op = _operator(node["target"])
    given = {inp["name"]: inp for inp in node["inputs"]}
    schema_args = op._schema.arguments
    if set(given) - {a.name for a in schema_args}:
        raise _Outside("argument not in the schema")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    skipped = False  # an optional argument left out: a later positional one would land in its place
    for a in schema_args:
        if a.name not in given:
            if not a.has_default_value() and not a.kwarg_only:
                raise _Outside("missing argument")
            skipped = True
            continue
        value = _argument(given[a.name]["arg"], nodes)
        kind = given[a.name].get("kind")
        if kind == _POSITIONAL:
            if skipped:
                raise _Outside("positional argument after a left-out one")
            args.append(value)
        elif kind == _KEYWORD:
            kwargs[a.name] = value
        elif not a.has_default_value() and not a.kwarg_only:
            if skipped:
                raise _Outside("positional argument after a left-out one")
            args.append(value)
        else:
            kwargs[a.name] = value
    outputs = node["outputs"]
    single = len(outputs) == 1 and "as_tensor" in outputs[0]
    name = node.get("name") or (outputs[0]["as_tensor"]["name"] if single else None)
    fx_node = graph.create_node("call_function", op, tuple(args), kwargs, name)
    if not outputs:
        return
    if single:
        nodes[outputs[0]["as_tensor"]["name"]] = fx_node
        return
    if len(outputs) == 1 and "as_none" in outputs[0]:
        return
    items = outputs[0]["as_tensors"] if len(outputs) == 1 and "as_tensors" in outputs[0] else outputs
    for index, item in enumerate(items):
        if "name" in item and len(item) == 1:  # a TensorArgument inside as_tensors
            out_name = item["name"]
        else:
            kind, value = _one_key(item)
            if kind == "as_none":
                continue
            if kind != "as_tensor":
                raise _Outside(f"output {kind}")
            out_name = value["name"]
        nodes[out_name] = graph.create_node("call_function", operator.getitem, (fx_node, index), {}, out_name)


def _shape_check(name: str, shape: tuple[int, ...]) -> Any:
    """A forward pre-hook refusing an input of another shape, as the exported program's guard does."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and tuple(x.shape) != shape:
            raise RuntimeError(f"the exported program was exported for input {name} of shape "
                               f"{list(shape)}, got {list(x.shape)}")

    return hook
