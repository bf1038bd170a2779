"""Read a ``torch.export`` archive (``.pt2``) into a ``GraphModule``: the only loader of untrusted archives.

Why this reader and not ``torch.export.load``: a ``.pt2`` is a program, and ``torch.export.load``
(torch 2.13) is not built for files from strangers. It parses symbolic-size strings with
``sympy.sympify`` (which evaluates Python), pastes names from the file into the Python source that
``torch.fx`` generates, evaluates default values, unpickles sample inputs and ``use_pickle``
payloads, ``dlopen``\\s an AOTInductor library it finds in the archive, and runs any operator the
graph names (``from_file``, ``print``, ``while_loop``, ``manual_seed`` ...), in every subgraph. A
validator in front of it would have to model each of those fields as torch reads them; this reader
instead reads only the fields it knows, and refuses (:class:`~basins.errors.InputError`, naming
the item and ``trust_pickle``) every archive that says anything else. ``torch.export.load``
is used only with ``trust_pickle`` (:mod:`.exports`). Nothing of ``torch._dynamo``, ``sympy`` or
the export serialiser is imported.

What is accepted (everything else is refused, never guessed):

* **the zip**: the members ``torch.export.save`` writes, one model, no others (no native
  library, no extra files, no duplicate names), each CRC-checked, with declared sizes that fit
  the file and the memory (:func:`basins.files.bounds.read_zip_members`); little-endian;
  schema version ``8.x`` with ``x <=`` :data:`SCHEMA_MINOR_MAX` (the versions tested here);
  every JSON text bounded in size and depth (:func:`basins.files.bounds.load_json`);
* **names**: every node, tensor and symbol name a plain identifier (not a Python keyword, no
  ``__`` prefix); parameter, buffer and constant names dotted identifiers (parts may be digits,
  as ``nn.Sequential`` makes), none naming an attribute of ``nn.Module``/``GraphModule``
  (``forward``, ``training``, ``_parameters`` ...). Only validated names reach ``torch.fx``;
* **sizes**: each dimension of the input an integer or a bare symbol, written
  ``Symbol('s7', positive=True, integer=True)`` (the grammar :data:`_SYMBOL`, matched by a
  regular expression, never evaluated), with integer bounds in ``range_constraints``; the
  model's call checks them, as the exported program's guards do. Other size annotations in the
  file are never read. Size arithmetic in the graph runs through checked functions that refuse
  results beyond int64 (no exponent towers);
* **payloads**: raw little-endian tensor bytes (saved from the CPU or a GPU, read onto the
  CPU), strided layout, no pickles; a
  tensor may not promise more elements than its bytes hold (no empty or stride-0 payload
  inflated to gigabytes); a static input may not ask for more memory than there is;
* **operators** (:mod:`.export_ops`, the allowlist and its rationale): overloads in ``torch.ops.aten`` and ``torch.ops.prims``
  only (so no higher-order operator: no ``cond``, ``while_loop``, ``print``, no subgraph at all,
  no custom namespace), whose arguments are tensors, numbers, booleans, strings, dtypes,
  layouts, memory formats and devices (no generator, storage or stream), that return values
  (or are shape assertions), that draw no random numbers except dropout (turned off in inference
  mode), and no file or print operator; plus the Python size arithmetic ``torch.export`` emits
  for dynamic shapes. Devices: ``cpu`` and ``cuda`` only;
* **calling convention**: one tensor user input, tensor outputs nested in tuples, lists and
  dicts; no default values, no custom objects, no namedtuples, no guard code.

The module returned behaves like ``ExportedProgram.module()``: the same parameter and buffer
names in the same order, the same graph (operators, arguments, positional/keyword split by the
operator's schema), the same pytree calling convention, and a check of the input's shape.
``tests/test_export_reader.py`` compares the two bit for bit, outputs and gradients, on a zoo of
fixed and dynamic-batch exports (an MLP, a CNN with batch norm, a tiny GPT-2 ...), and
``tests/test_hostile_inputs.py`` feeds it crafted archives.

Reference: the archive layout and schema are torch's ``torch/export/pt2_archive/_package.py`` and
``torch/_export/serde/schema.py`` (read for the format; no code is shared).
"""

from __future__ import annotations

import io
import keyword
import math
import operator
import os
import re
import zipfile
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch.utils._pytree import tree_map

from basins.errors import InputError
from basins.files.bounds import check_allocation, load_json, read_zip_members

from .export_ops import Refused, resolve_all

__all__ = ["read_export_archive", "ExportRead", "SCHEMA_MAJOR", "SCHEMA_MINOR_MAX", "TRUST_HINT"]

#: The export schema version read here (torch 2.13 writes 8.20).
SCHEMA_MAJOR = 8
SCHEMA_MINOR_MAX = 20

#: The end of every refusal: what the user can do.
TRUST_HINT = (
    "basins reads only plain exported programs without trust_pickle; re-export it with "
    "torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2'), or pass trust_pickle=True "
    "to load it with torch.export.load, which runs code from the file, only if you trust whoever wrote it"
)

_DTYPES = {
    1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
    7: torch.float32, 8: torch.float64, 9: torch.complex32, 10: torch.complex64, 11: torch.complex128,
    12: torch.bool, 13: torch.bfloat16, 28: torch.uint16, 34: torch.uint32, 35: torch.uint64,
}
_LAYOUTS = {7: torch.strided}
_MEMORY_FORMATS = {1: torch.contiguous_format, 2: torch.channels_last, 3: torch.channels_last_3d,
                   4: torch.preserve_format}
_DEVICES = ("cpu", "cuda")
_POSITIONAL, _KEYWORD = 1, 2
_INT64 = 1 << 63

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}\Z")
_FQN_PART = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,199}|[0-9]{1,9})\Z")
_SYMBOL_NAME = re.compile(r"[su][0-9]{1,9}\Z")
#: the one grammar for a symbolic size: a bare symbol with sympy's integer assumptions
_SYMBOL = re.compile(r"Symbol\('([su][0-9]{1,9})'(?:, (?:positive|integer|nonnegative)=True){0,3}\)\Z")

_RESERVED = frozenset(dir(torch.fx.GraphModule)) | frozenset(vars(torch.nn.Module()))
_SPEC_TYPES = (None, "builtins.tuple", "builtins.list", "builtins.dict")


@dataclass
class ExportRead:
    """What :func:`read_export_archive` returns.

    Attributes:
        module: the program as a ``GraphModule``, as ``ExportedProgram.module()`` gives it
            (training flags untouched).
        input_shape: the user input's exported shape, an int per static dimension and None per
            symbolic one.
    """

    module: torch.fx.GraphModule
    input_shape: tuple[int | None, ...]


def read_export_archive(archive: str | bytes, source: str) -> ExportRead:
    """Read and validate a ``.pt2`` (path or bytes) without running anything from it.

    Raises:
        InputError: the archive is damaged, too big for its declared sizes, or outside what this
            reader accepts (module docstring); one line naming the item and ``trust_pickle``
            (``param="trust_pickle"`` where passing it would load the archive).
    """
    handle: IO[bytes] | str = io.BytesIO(archive) if isinstance(archive, bytes) else archive
    size = len(archive) if isinstance(archive, bytes) else os.path.getsize(archive)
    try:
        with zipfile.ZipFile(handle) as zf:
            members = read_zip_members(zf, size, source)
        module, shape = _read(members, source)
    except InputError:
        raise
    except Refused as why:
        raise InputError(f"{source}: {why}; {TRUST_HINT}", param="trust_pickle") from None
    except zipfile.BadZipFile as err:
        raise InputError(f"{source}: not a readable zip archive ({str(err)[:100]}); the file is damaged "
                         "or not a torch.export.save archive") from None
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError, OverflowError,
            RecursionError) as err:
        raise InputError(f"{source}: malformed exported program ({type(err).__name__}: "
                         f"{str(err)[:120]}); {TRUST_HINT}", param="trust_pickle") from None
    return ExportRead(module, shape)


def _member_kinds(root: str, model: str) -> list[tuple[re.Pattern[str], str]]:
    r, m = re.escape(root), re.escape(model)
    return [(re.compile(p + r"\Z"), kind) for p, kind in [
        (rf"{r}/archive_format", "text"), (rf"{r}/archive_version", "text"), (rf"{r}/byteorder", "text"),
        (rf"{r}/\.data/version", "text"), (rf"{r}/\.data/serialization_id", "text"),
        (rf"{r}/models/{m}\.json", "program"),
        (rf"{r}/data/weights/{m}_weights_config\.json", "config"),
        (rf"{r}/data/constants/{m}_constants_config\.json", "config"),
        (rf"{r}/data/(?:weights|constants)/(?:weight|tensor)_[0-9]{{1,9}}", "payload"),
        (rf"{r}/data/sample_inputs/{m}\.pt", "unread"),  # (never read: CRC-checked only)
    ]]


def _read(members: dict[str, bytearray], source: str) -> tuple[torch.fx.GraphModule, tuple[int | None, ...]]:
    for name in members:
        if "aotinductor" in name or name.endswith((".so", ".dll", ".dylib")):
            raise Refused(f"archive member {name!r} is a native library (AOTInductor), which loading would run")
    models = [n for n in members if re.fullmatch(r"[^/]+/models/[^/]+\.json", n)]
    if len(models) != 1:
        raise Refused(f"the archive holds {len(models)} models (one is read)")
    root, _, file = models[0].split("/")
    model = file[: -len(".json")]
    if not _IDENT.match(model):  # (the folder, named after the file, is only compared, never used)
        raise Refused(f"model name {model[:60]!r} is not a plain identifier")
    kinds = _member_kinds(root, model)
    for name in members:
        if not any(p.match(name) for p, _ in kinds):
            raise Refused(f"archive member {name!r} is not one torch.export.save writes")
    if bytes(members.get(f"{root}/archive_format", b"")).strip() != b"pt2":
        raise Refused("archive_format is not 'pt2'")
    if bytes(members.get(f"{root}/byteorder", b"little")).strip() != b"little":
        raise Refused("the archive's byte order is not little-endian")
    program = load_json(members[models[0]], f"{source} ({models[0]})")
    _keys(program, {"graph_module", "opset_version", "range_constraints", "schema_version", "verifiers",
                    "torch_version", "guards_code"}, "the program")
    version = program["schema_version"]
    major, minor = version.get("major"), version.get("minor")
    if type(major) is not int or type(minor) is not int or major != SCHEMA_MAJOR or not 0 <= minor <= SCHEMA_MINOR_MAX:
        raise Refused(f"schema version {major}.{minor} (read: {SCHEMA_MAJOR}.0 to {SCHEMA_MAJOR}.{SCHEMA_MINOR_MAX})")
    if program.get("guards_code"):
        raise Refused("the program carries guard code")
    ranges = _ranges(program.get("range_constraints") or {})

    def payload(folder: str, config_name: str) -> dict[str, tuple[torch.Tensor, bool]]:
        name = f"{root}/data/{folder}/{config_name}"
        if name not in members:
            raise Refused(f"archive member {name!r} is missing")
        return _payload(members, f"{root}/data/{folder}", load_json(members[name], f"{source} ({name})"))

    state = payload("weights", f"{model}_weights_config.json")
    constants = payload("constants", f"{model}_constants_config.json")
    return _build(program["graph_module"], state, constants, ranges, source)


def _keys(obj: Any, allowed: set[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise Refused(f"{what} is not a JSON object")
    unknown = set(obj) - allowed
    if unknown:
        raise Refused(f"{what} has unknown field {sorted(unknown)[0]!r}")


def _int(value: Any, what: str, low: int = -_INT64, high: int = _INT64 - 1) -> int:
    if type(value) is not int or not low <= value <= high:
        raise Refused(f"{what} is {str(value)[:40]!r}, not an integer in [{low}, {high}]")
    return value


def _ident(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _IDENT.match(name) or keyword.iskeyword(name) or name.startswith("__"):
        raise Refused(f"{what} {str(name)[:60]!r} is not a plain identifier")
    return name


def _fqn(name: Any, what: str) -> str:
    parts = name.split(".") if isinstance(name, str) else [None]
    for part in parts:
        if (not isinstance(part, str) or not _FQN_PART.match(part) or keyword.iskeyword(part)
                or part.startswith("__") or part in _RESERVED):
            raise Refused(f"{what} name {str(name)[:60]!r} is not a dotted identifier free for a module attribute")
    return name  # type: ignore[no-any-return]


def _ranges(raw: Any) -> dict[str, tuple[int, int | None]]:
    """``{symbol: (min, max or None)}`` from ``range_constraints``: bare symbols with integer bounds."""
    if not isinstance(raw, dict):
        raise Refused("range_constraints is not an object")
    out: dict[str, tuple[int, int | None]] = {}
    for name, bounds in raw.items():
        if not _SYMBOL_NAME.match(name):
            raise Refused(f"range constraint on {name[:60]!r}, not a bare symbol")
        _keys(bounds, {"min_val", "max_val"}, f"range of {name}")
        low = _int(bounds.get("min_val") or 0, f"lower bound of {name}", 0)
        high = bounds.get("max_val")
        out[name] = (low, None if high is None else _int(high, f"upper bound of {name}", low))
    return out


def _payload(members: dict[str, bytearray], folder: str, config: Any) -> dict[str, tuple[torch.Tensor, bool]]:
    """``{fqn: (tensor, is_param)}`` from a payload config and its raw files (storage shared as saved)."""
    _keys(config, {"config"}, "payload config")
    entries = config["config"]
    if not isinstance(entries, dict):
        raise Refused("payload config is not an object")
    storages: dict[str, torch.Tensor] = {}
    out: dict[str, tuple[torch.Tensor, bool]] = {}
    for fqn, meta in entries.items():
        _fqn(fqn, "tensor")
        _keys(meta, {"path_name", "is_param", "use_pickle", "tensor_meta"}, f"payload entry {fqn}")
        path = meta["path_name"]
        if meta.get("use_pickle") or not isinstance(path, str) or not re.fullmatch(r"(?:weight|tensor)_[0-9]{1,9}", path):
            raise Refused(f"payload {folder.rsplit('/', 1)[-1]}/{str(path)[:40]} ({fqn!r}) is a pickled object, "
                           "which torch.export.load would unpickle")
        tm = meta["tensor_meta"]
        _keys(tm, {"dtype", "sizes", "requires_grad", "device", "strides", "storage_offset", "layout"}, f"tensor {fqn}")
        dtype = _DTYPES.get(tm["dtype"]) if type(tm["dtype"]) is int else None
        if dtype is None:
            raise Refused(f"tensor {fqn!r} has unknown dtype {str(tm['dtype'])[:20]}")
        device = tm["device"]  # (a GPU export's weights are read onto the CPU; basins moves the model)
        if not isinstance(device, dict) or device.get("type") not in _DEVICES or tm["layout"] != 7:
            raise Refused(f"tensor {fqn!r} is not a strided CPU or CUDA tensor")
        size, stride = _static(tm["sizes"], f"size of {fqn}"), _static(tm["strides"], f"stride of {fqn}")
        offset = _static([tm["storage_offset"]], f"offset of {fqn}")[0]
        if len(size) != len(stride) or len(size) > 64:
            raise Refused(f"tensor {fqn!r} has {len(size)} sizes and {len(stride)} strides")
        item = torch.empty((), dtype=dtype).element_size()
        if path not in storages:
            raw = members.get(f"{folder}/{path}")
            if raw is None:
                raise Refused(f"payload {path!r} of {fqn!r} is missing")
            if len(raw) % item:
                raise Refused(f"payload {path!r} is not a whole number of {dtype} elements")
            storages[path] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        flat = storages[path]
        if flat.dtype != dtype:  # two dtypes over one storage: not what torch.export.save writes
            raise Refused(f"payload {path!r} is read under two dtypes")
        numel = math.prod(size)
        need = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if numel else 0
        if need > flat.numel() or numel > flat.numel() or any(st == 0 and s > 1 for s, st in zip(size, stride)):
            raise Refused(f"tensor {fqn!r} of shape {list(size)} promises more elements than payload "
                           f"{path!r} holds ({flat.numel()})")
        tensor = torch.as_strided(flat, size, stride, offset)
        is_param = meta.get("is_param")
        if type(is_param) is not bool or type(tm["requires_grad"]) is not bool:
            raise Refused(f"payload entry {fqn!r} has non-boolean flags")
        if is_param:
            tensor = torch.nn.Parameter(tensor, requires_grad=tm["requires_grad"])
        out[fqn] = (tensor, is_param)
    return out


def _static(values: Any, what: str) -> tuple[int, ...]:
    """Static sizes/strides (``[{"as_int": n}, ...]``), each in [0, 2**63)."""
    if not isinstance(values, list):
        raise Refused(f"{what} is not a list")
    out = []
    for v in values:
        if not isinstance(v, dict) or set(v) != {"as_int"}:
            raise Refused(f"{what} is symbolic")
        out.append(_int(v["as_int"], what, 0))
    return tuple(out)


def _one_key(union: Any, what: str = "a value") -> tuple[str, Any]:
    """The (type, value) of a serialised union (a dict with one key)."""
    if not isinstance(union, dict) or len(union) != 1:
        raise Refused(f"{what} is not a tagged value")
    return next(iter(union.items()))


def _tensor_name(value: Any, what: str) -> str:
    _keys(value, {"name"}, what)
    return _ident(value["name"], what)


def _input_shape(meta: Any, ranges: dict[str, tuple[int, int | None]], name: str, source: str
                 ) -> tuple[tuple[int | None, ...], list[tuple[int, str, int, int | None]]]:
    """The user input's shape (None for a symbolic dimension), and the symbolic dimensions'
    ``(dim, symbol, min, max)``. A static input larger than the memory is refused."""
    if not isinstance(meta, dict) or not isinstance(meta.get("sizes"), list):
        raise Refused(f"input {name!r} has no sizes")
    code = meta.get("dtype")
    dtype = _DTYPES.get(code) if isinstance(code, int) else None
    if dtype is None:
        raise Refused(f"input {name!r} has an unknown dtype")
    shape: list[int | None] = []
    symbols: list[tuple[int, str, int, int | None]] = []
    for dim, item in enumerate(meta["sizes"]):
        kind, value = _one_key(item, f"size of input {name}")
        if kind == "as_int":
            shape.append(_int(value, f"size of input {name}", 0))
            continue
        if kind != "as_expr" or not isinstance(value, dict) or not isinstance(value.get("expr_str"), str):
            raise Refused(f"size {dim} of input {name!r} is neither an integer nor a symbol")
        match = _SYMBOL.match(value["expr_str"])
        if match is None:
            raise Refused(f"size {dim} of input {name!r} is {value['expr_str'][:80]!r}, not a bare "
                           "symbol such as Symbol('s0', positive=True, integer=True)")
        symbol = match.group(1)
        if symbol not in ranges:
            raise Refused(f"symbol {symbol} of input {name!r} has no range constraint")
        shape.append(None)
        symbols.append((dim, symbol, *ranges[symbol]))
    if len(shape) > 64:
        raise Refused(f"input {name!r} has {len(shape)} dimensions")
    static = math.prod(s for s in shape if s is not None)  # (a fixed batch is padded to: the engine needs
    # several times the input's bytes, so an eighth of the memory is the most a fixed input may take)
    check_allocation(8 * static * torch.empty((), dtype=dtype).element_size(), f"the input {name!r} of shape "
                     f"{[s if s is not None else '*' for s in shape]} (8 x its bytes)", source)
    return tuple(shape), symbols


def _spec(text: Any, what: str) -> Any:
    """A pytree spec from its JSON text, after checking it names only tuples, lists, dicts and leaves."""
    from torch.utils._pytree import treespec_loads

    spec = load_json(text if isinstance(text, str) else "", what, max_depth=40)
    if not isinstance(spec, list) or len(spec) != 2 or spec[0] != 1:
        raise Refused(f"{what} is not a protocol-1 pytree spec")
    count = 0

    def walk(node: Any) -> None:
        nonlocal count
        count += 1
        _keys(node, {"type", "context", "children_spec"}, what)
        if node.get("type") not in _SPEC_TYPES or not isinstance(node.get("children_spec"), list) or count > 100_000:
            raise Refused(f"{what} holds {str(node.get('type'))[:60]!r}, not a tuple, list, dict or tensor")
        context = node.get("context")
        if node["type"] == "builtins.dict":
            keys = load_json(context if isinstance(context, str) else "", what, max_depth=2)
            if not isinstance(keys, list) or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
                raise Refused(f"{what} has dict keys that are not strings")
        elif context not in (None, "null"):
            raise Refused(f"{what} has a context on a {node['type']}")
        for child in node["children_spec"]:
            walk(child)

    walk(spec[1])
    return treespec_loads(text)


def _build(gm: Any, state: dict[str, tuple[torch.Tensor, bool]], constants: dict[str, tuple[torch.Tensor, bool]],
           ranges: dict[str, tuple[int, int | None]], source: str
           ) -> tuple[torch.fx.GraphModule, tuple[int | None, ...]]:
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    _keys(gm, {"graph", "signature", "module_call_graph", "metadata", "treespec_namedtuple_fields"}, "graph_module")
    if gm.get("treespec_namedtuple_fields"):
        raise Refused("the program declares namedtuple types")
    serial, signature, calls = gm["graph"], gm["signature"], gm["module_call_graph"]
    _keys(serial, {"inputs", "outputs", "nodes", "tensor_values", "sym_int_values", "sym_bool_values",
                   "is_single_tensor_return", "custom_obj_values", "sym_float_values"}, "the graph")
    if serial.get("custom_obj_values"):
        raise Refused("the graph holds custom objects")
    _keys(signature, {"input_specs", "output_specs"}, "the signature")
    if not isinstance(calls, list) or not calls or not isinstance(calls[0], dict) or calls[0].get("fqn") != "":
        raise Refused("the module call graph has no top-level entry")
    top: dict[str, Any] = calls[0].get("signature") or {}  # (its keys checked by _keys)
    _keys(top, {"inputs", "outputs", "in_spec", "out_spec", "forward_arg_names"}, "the call signature")
    arg_names = top.get("forward_arg_names")
    if not isinstance(arg_names, list) or not arg_names:
        raise Refused("the model's forward arguments are not listed")
    for arg_name in arg_names:
        _ident(arg_name, "forward argument")
    if len(arg_names) != 1:
        raise InputError(f"{source}: the exported model takes {len(arg_names)} inputs ({', '.join(arg_names)}); "
                         "basins calls model(x) with one batch tensor x: export a wrapper whose forward takes one tensor")
    in_spec, out_spec = _spec(top["in_spec"], "in_spec"), _spec(top["out_spec"], "out_spec")
    if in_spec.num_leaves != 1 or in_spec.num_children != 2 or in_spec.child(1).num_children != 0:
        raise Refused("the model takes other inputs than one tensor (keyword arguments, defaults)")

    graph = torch.fx.Graph()
    root = torch.nn.Module()
    nodes: dict[str, torch.fx.Node] = {}
    user: list[str] = []
    non_persistent: list[str] = []
    constant_names: list[str] = []
    attrs: list[tuple[str, str]] = []  # (graph name, attribute path)
    for spec in signature["input_specs"]:
        kind, body = _one_key(spec, "an input spec")
        if kind == "user_input":
            _keys(body, {"arg"}, "user input")
            arg_kind, arg = _one_key(body["arg"], "user input")
            if arg_kind != "as_tensor":
                raise Refused(f"a user input is {arg_kind}, not a tensor")
            user.append(_tensor_name(arg, "user input"))
            continue
        if kind == "parameter":
            _keys(body, {"arg", "parameter_name"}, "parameter")
            target = _fqn(body["parameter_name"], "parameter")
            value, is_param = state[target]
            if not is_param:
                raise Refused(f"parameter {target!r} is stored as a plain tensor")
            _assign(root, target, value, "parameter")
        elif kind == "buffer":
            _keys(body, {"arg", "buffer_name", "persistent"}, "buffer")
            target = _fqn(body["buffer_name"], "buffer")  # a non-persistent buffer is stored with the constants
            value, _ = state[target] if target in state else constants[target]
            _assign(root, target, value, "buffer")
            if body.get("persistent", True) is False:
                non_persistent.append(target)
        elif kind == "tensor_constant":
            _keys(body, {"arg", "tensor_constant_name"}, "tensor constant")
            target = _fqn(body["tensor_constant_name"], "constant")
            value, _ = constants[target]
            _assign(root, target, value, "constant")
            constant_names.append(target)
        else:
            raise Refused(f"an input of kind {str(kind)[:40]!r} (read: parameters, buffers, constants, one tensor)")
        attrs.append((_tensor_name(body["arg"], kind), target))
    graph_inputs = [_one_key(a, "a graph input") for a in serial["inputs"]]
    if len(user) != 1 or ("as_tensor", {"name": user[0]}) not in graph_inputs:
        raise Refused(f"the exported model takes {len(user)} inputs; basins calls model(x) with one batch "
                       "tensor x: export a wrapper whose forward takes one tensor")
    if len(graph_inputs) != len(attrs) + 1:
        raise Refused("the graph's inputs differ from its signature")
    for spec in signature["output_specs"]:
        if _one_key(spec, "an output spec")[0] != "user_output":
            raise Refused("the program mutates its inputs or buffers (an output that is not a user output)")
    input_shape, symbols = _input_shape(serial["tensor_values"].get(user[0]), ranges, user[0], source)
    if not input_shape:
        raise Refused(f"the input {user[0]!r} is a scalar, it has no batch dimension")

    for graph_name, target in attrs:
        if graph_name in nodes:
            raise Refused(f"name {graph_name!r} is defined twice")
        nodes[graph_name] = graph.get_attr(target)
    nodes[user[0]] = graph.placeholder(user[0])
    if not isinstance(serial["nodes"], list):
        raise Refused("the graph's nodes are not a list")
    ops = resolve_all(serial["nodes"])
    for node in serial["nodes"]:
        _add_node(graph, nodes, node, ops)
    outputs = []
    for out in serial["outputs"]:
        kind, value = _one_key(out, "a graph output")
        if kind != "as_tensor":
            raise Refused(f"a graph output is {kind}, not a tensor")
        outputs.append(nodes[_tensor_name(value, "graph output")])
    if len(outputs) != out_spec.num_leaves:
        raise Refused("the graph's outputs differ from its output spec")
    graph.output(tuple(outputs))
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo([arg_names[0]], in_spec, out_spec))
    module = torch.fx.GraphModule(root, graph)
    for target in non_persistent:
        owner, _, leaf = target.rpartition(".")
        module.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
    for target in constant_names:  # GraphModule copied them as buffers; the exported module holds plain attributes
        owner, _, leaf = target.rpartition(".")
        sub = module.get_submodule(owner)
        setattr(sub, leaf, sub._buffers.pop(leaf))
    check, unpad = _shape_check(user[0], input_shape, symbols)
    module.register_forward_pre_hook(check)
    module.register_forward_hook(unpad)
    return module, input_shape


def _assign(root: torch.nn.Module, target: str, value: torch.Tensor, kind: str) -> None:
    """Register ``value`` at dotted ``target`` under ``root``, creating plain submodules on the way."""
    *path, leaf = target.split(".")
    owner = root
    for part in path:
        if part not in owner._modules:
            if hasattr(owner, part):
                raise Refused(f"{kind} {target!r} sits under a tensor")
            owner.add_module(part, torch.nn.Module())
        owner = owner._modules[part]  # type: ignore[assignment]
    if hasattr(owner, leaf):
        raise Refused(f"{kind} {target!r} is defined twice")
    if kind == "parameter":
        owner.register_parameter(leaf, value)  # type: ignore[arg-type]
    elif kind == "buffer":
        owner.register_buffer(leaf, value)
    else:
        setattr(owner, leaf, value)



def _sym(value: Any, nodes: dict[str, torch.fx.Node], what: str, plain: type) -> Any:
    kind, inner = _one_key(value, what)
    if kind == "as_name":
        return nodes[_ident(inner, what)]
    if kind in ("as_int", "as_float", "as_bool") and type(inner) in (plain, int):
        return _int(inner, what) if isinstance(inner, int) and not isinstance(inner, bool) else inner
    raise Refused(f"{what} is {kind}")


def _argument(arg: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    kind, value = _one_key(arg, "an argument")
    if kind == "as_none":
        return None
    if kind == "as_tensor":
        return nodes[_tensor_name(value, "tensor argument")]
    if kind == "as_tensors":
        return [nodes[_tensor_name(v, "tensor argument")] for v in value]
    if kind == "as_optional_tensors":
        out = []
        for v in value:
            k, inner = _one_key(v, "an optional tensor")
            if k not in ("as_none", "as_tensor"):
                raise Refused(f"an optional tensor is {k}")
            out.append(None if k == "as_none" else nodes[_tensor_name(inner, "tensor argument")])
        return out
    if kind in ("as_sym_int", "as_sym_bool", "as_sym_float"):
        return _sym(value, nodes, kind, {"as_sym_int": int, "as_sym_bool": bool, "as_sym_float": float}[kind])
    if kind == "as_sym_ints":
        return [_sym(v, nodes, kind, int) for v in value]
    if kind == "as_int":
        return _int(value, "an int argument")
    if kind == "as_float":
        if type(value) not in (int, float):
            raise Refused("a float argument is not a number")
        return value
    if kind in ("as_bool", "as_string"):
        if type(value) is not (bool if kind == "as_bool" else str) or len(str(value)) > 1000:
            raise Refused(f"{kind} argument is not one")
        return value
    if kind in ("as_ints", "as_floats", "as_bools", "as_strings"):
        plain = {"as_ints": (int,), "as_floats": (int, float), "as_bools": (bool,), "as_strings": (str,)}[kind]
        if not isinstance(value, list) or not all(type(v) in plain for v in value):
            raise Refused(f"{kind} argument is not one")
        return list(value)
    if kind == "as_scalar_type":
        return _DTYPES[value]
    if kind == "as_layout":
        return _LAYOUTS[value]
    if kind == "as_memory_format":
        return _MEMORY_FORMATS[value]
    if kind == "as_device":
        _keys(value, {"type", "index"}, "a device")
        if value.get("type") not in _DEVICES:
            raise Refused(f"device {str(value.get('type'))[:20]!r} (read: {', '.join(_DEVICES)})")
        index = value.get("index")
        return torch.device(value["type"]) if index is None else torch.device(value["type"], _int(index, "device index", 0, 1024))
    if kind == "as_complex":
        _keys(value, {"real", "imag"}, "a complex")
        return complex(float(value["real"]), float(value["imag"]))
    raise Refused(f"an argument of kind {str(kind)[:40]!r} (graphs, operators and custom objects are not read)")


def _add_node(graph: torch.fx.Graph, nodes: dict[str, torch.fx.Node], node: Any, ops: dict[str, Any]) -> None:
    """One serialised call: its arguments placed by the operator's schema, its outputs named."""
    _keys(node, {"target", "inputs", "outputs", "metadata", "is_hop_single_tensor_return", "name"}, "a node")
    op = ops[node["target"]]
    given: dict[str, Any] = {}
    for inp in node["inputs"]:
        _keys(inp, {"name", "arg", "kind"}, "a node input")
        if inp["name"] in given:
            raise Refused(f"argument {str(inp['name'])[:40]!r} given twice")
        given[_ident(inp["name"], "argument name")] = inp
    name = _ident(node.get("name"), "node name") if node.get("name") else None
    if not isinstance(op, torch._ops.OpOverload):  # size arithmetic: positional, as torch writes it
        operands = tuple(_argument(inp["arg"], nodes) for inp in node["inputs"])
        if len(operands) > 3:
            raise Refused("size arithmetic with more than three arguments")
        kind, value = _one_key(node["outputs"][0] if len(node["outputs"]) == 1 else None, "a size output")
        if kind not in ("as_sym_int", "as_sym_bool", "as_sym_float"):
            raise Refused(f"size arithmetic returns {kind}")
        out_kind, out_name = _one_key(value, "a size output")
        if out_kind != "as_name":
            raise Refused("size arithmetic output has no name")
        _define(nodes, _ident(out_name, "node name"), graph.create_node("call_function", op, operands, {}, name or out_name))
        return
    schema_args = op._schema.arguments
    if set(given) - {a.name for a in schema_args}:
        raise Refused(f"an argument of {op._schema.name} is not in its schema")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    skipped = False  # an optional argument left out: a later positional one would land in its place
    for a in schema_args:
        if a.name not in given:
            if not a.has_default_value() and not a.kwarg_only:
                raise Refused(f"argument {a.name} of {op._schema.name} is missing")
            skipped = True
            continue
        value = _argument(given[a.name]["arg"], nodes)
        kind = given[a.name].get("kind")
        if kind == _POSITIONAL or (kind != _KEYWORD and not a.has_default_value() and not a.kwarg_only):
            if skipped:
                raise Refused("a positional argument after a left-out one")
            args.append(value)
        else:
            kwargs[a.name] = value
    outputs = node["outputs"]
    if not isinstance(outputs, list):
        raise Refused("a node's outputs are not a list")
    if len(outputs) == 1 and set(outputs[0]) == {"as_sym_int"}:  # sym_size
        out_kind, out_name = _one_key(outputs[0]["as_sym_int"], "a size output")
        if out_kind != "as_name":
            raise Refused("a size output has no name")
        _define(nodes, _ident(out_name, "node name"), graph.create_node("call_function", op, tuple(args), kwargs, name or out_name))
        return
    single = len(outputs) == 1 and set(outputs[0]) == {"as_tensor"}
    if single:
        out_name = _tensor_name(outputs[0]["as_tensor"], "node output")
    fx_node = graph.create_node("call_function", op, tuple(args), kwargs, name or (out_name if single else None))
    if not outputs:
        return
    if single:
        _define(nodes, out_name, fx_node)
        return
    if len(outputs) == 1 and set(outputs[0]) == {"as_none"}:
        return
    items = outputs[0]["as_tensors"] if len(outputs) == 1 and set(outputs[0]) == {"as_tensors"} else outputs
    for index, item in enumerate(items):
        if isinstance(item, dict) and set(item) == {"name"}:  # a TensorArgument inside as_tensors
            out_name = _ident(item["name"], "node output")
        else:
            kind, value = _one_key(item, "a node output")
            if kind == "as_none":
                continue
            if kind != "as_tensor":
                raise Refused(f"a node output is {kind}")
            out_name = _tensor_name(value, "node output")
        _define(nodes, out_name, graph.create_node("call_function", operator.getitem, (fx_node, index), {}, out_name))


def _define(nodes: dict[str, torch.fx.Node], name: str, node: torch.fx.Node) -> None:
    if name in nodes:
        raise Refused(f"name {name!r} is defined twice")
    nodes[name] = node


def _shape_check(name: str, shape: tuple[int | None, ...], symbols: list[tuple[int, str, int, int | None]]
                 ) -> tuple[Any, Any]:
    """A forward pre-hook refusing an input of another shape, as the exported program's guards do:
    static sizes equal, symbolic ones within their range and equal where they share a symbol.

    A batch smaller than a symbolic batch dimension's minimum (``torch.export`` makes every dynamic
    dimension at least 2, so a dynamic-batch export refuses one example) is padded up to it by
    repeating its first example; the forward hook returned beside it cuts the outputs back to the
    real rows (in eval mode the examples do not interact, so their outputs are unchanged).
    Returns ``(pre-hook, forward hook)``."""
    only_at_0 = {sym for d, sym, _, _ in symbols if d == 0} - {sym for d, sym, _, _ in symbols if d != 0}
    #: (real rows, padded rows) or None per call in flight, from the pre-hook to the forward hook
    pending: list[tuple[int, int] | None] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return None
        got = tuple(x.shape)
        shown = ", ".join(str(s) if s is not None else "*" for s in shape)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            raise RuntimeError(f"the exported program was exported for input {name} of shape [{shown}], got {list(got)}")
        padded = None
        for dim, symbol, low, _high in symbols:
            if dim == 0 and symbol in only_at_0 and 0 < got[0] < low:
                padded = (got[0], low)
                x = torch.cat([x, x[:1].expand(low - got[0], *got[1:])])
                got = tuple(x.shape)
        seen: dict[str, int] = {}
        for dim, symbol, low, high in symbols:
            if got[dim] < low or (high is not None and got[dim] > high) or seen.setdefault(symbol, got[dim]) != got[dim]:
                bound = f"[{low}, {high if high is not None else 'inf'}]"
                raise RuntimeError(f"the exported program takes input {name} with size {dim} in {bound} "
                                   f"(symbol {symbol}), got shape {list(got)}")
        pending.append(padded)
        return (x, *args[1:]) if padded is not None else None

    def unpad(module: torch.nn.Module, _args: Any, output: Any) -> Any:
        padded = pending.pop() if pending else None
        if padded is None:
            return None
        real, rows = padded
        return tree_map(lambda t: t[:real] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == rows else t,
                        output)

    return hook, unpad
