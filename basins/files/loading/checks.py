"""The checks every load shares, run once, after the sniff and before any loader builds a module.

:func:`check` takes what :func:`~.sniff.sniff` found and, for every format, in this order:

* **refuses what no loader reads**: TorchScript, AOTInductor packages, data files, unknown or
  damaged files, ``base_model`` for anything but a peft adapter;
* **trust**: a pickle (a pickled module, a directory's ``pytorch_model.bin``) only with
  ``trust_pickle``, and a Hugging Face config mapping its architecture to code shipped with the model
  (``auto_map``) never (basins never runs such code);
* **layout**: a bundle's fields (:func:`check_bundle`); a state dict's tensors dense, with values
  (no ``meta`` device);
* **weight files**: the header of every ``.safetensors`` file the load maps (a file given with
  ``arch``, a model directory's shards, an adapter's weights), read and checked against the file
  before the ``safetensors`` package maps it (:func:`safetensors_header`): bounded size and depth,
  known dtypes, non-negative shapes, data offsets that match the shapes and lie inside the file
  without overlapping. A header that lies about sizes is refused before anything is allocated;
* **parameter names** (:func:`check_names`): plain dotted identifiers
  (``transformer.h.0.attn.c_attn.weight``) whose parts are not attributes of ``nn.Module``
  (``forward``, ``training``, ``_parameters``, ...), which would shadow the module's machinery;
* **dtypes**: the floating dtypes narrower than float32 the files store (the model is upcast to
  float32 when it is wrapped, :mod:`.models`);
* **the hash**: SHA-256 of what the model is (the file; a bundle's embedded ``.pt2``; a model
  directory's ``config.json`` and weight files; an adapter's config and weights and its base's hash).

The weights of a ``.safetensors`` file given with ``arch`` and of an adapter are read here, after
their headers pass, so that a loader gets tensors that were checked.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from basins.errors import InputError
from basins.files.bounds import check_allocation, load_json

from .describe import (
    BUNDLE_VERSION,
    EXPORT_HINT,
    HF_EXTRA_HINT,
    KIND_WORDS,
    describe,
    not_readable,
    one_line,
    unpickling_global,
)
from .sniff import ADAPTER_CONFIG, Sniffed

__all__ = ["Checked", "check", "check_bundle", "check_names", "safetensors_header"]

_HASH_CHUNK = 1 << 20

_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)"
_DOTTED = re.compile(rf"{_PART}(?:\.{_PART})*")
_MAX_NAME = 1000
_MODULE_ATTRIBUTES = frozenset(dir(torch.nn.Module()))  # (an instance: training, _parameters, ...)

#: safetensors dtype codes -> bytes per element
_ST_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_ST_HALF = {"F16": "float16", "BF16": "bfloat16", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn"}
#: the safetensors package refuses headers over 100 MB; so does basins, before reading one
_ST_MAX_HEADER = 100_000_000

_LOADED = ("export", "bundle", "state_dict", "safetensors", "hf", "peft", "pickle")


@dataclass
class Checked:
    """What :func:`check` established.

    Attributes:
        sha256: hex SHA-256 of the model (module docstring).
        state: the tensors a loader puts into a module: a state dict's, a ``.safetensors``
            file's, an adapter's; None for the other formats.
        declared: ``hf``: the parameters the safetensors files declare and the number of layers
            their names reach (largest numbered part + 1); None when not known (pickled weights).
        stored_half: the floating dtypes narrower than float32 the files store (``{"bfloat16"}``), by
            torch name; empty when none or not known (pickled weights).
        base: ``peft``: the base model directory's :class:`Checked`.
        archive: ``bundle``: the bytes of the ``.pt2`` inside it.
    """

    sha256: str
    state: dict[str, torch.Tensor] | None = None
    declared: tuple[int, int] | None = None
    stored_half: frozenset[str] = frozenset()
    base: Checked | None = None
    archive: bytes | None = None


def check(sniffed: Sniffed, *, arch: str | None, trust_pickle: bool, base_model: str | None = None) -> Checked:
    """Run the shared checks (module docstring) on a sniffed model path.

    Raises:
        InputError: naming the file and what to do, with ``param`` the parameter that would
            change the outcome (``arch``, ``trust_pickle``, ``base_model``, ``data``) where there is one.
    """
    tag, path = sniffed.tag, sniffed.path
    if base_model is not None and tag != "peft":
        raise InputError(f"base_model is for a peft adapter directory (with adapter_config.json); {path} is not one",
                         param="base_model")
    if tag not in _LOADED:
        _refuse(sniffed)
    if tag == "pickle" and not trust_pickle:
        raise InputError(
            f"{path} is a pickled Python object ({unpickling_global(sniffed.error or Exception())}); loading a "
            "pickle runs code from the file: pass trust_pickle=True only if you trust its source, or save "
            "model.state_dict() and pass arch, or export a .pt2 with torch.export", param="trust_pickle")
    if tag == "bundle":
        check_bundle(sniffed.content, path)
        raw = sniffed.content["model"].contiguous().numpy().tobytes()
        return Checked(hashlib.sha256(raw).hexdigest(), archive=raw)
    if tag == "hf":
        return _directory(sniffed, trust_pickle)
    if tag == "peft":
        assert sniffed.base is not None  # (the sniff resolved the base directory or refused the adapter)
        base = _directory(sniffed.base, trust_pickle)
        state, half = _state(sniffed)
        digest = _named_sha256(path, [ADAPTER_CONFIG, *sniffed.files], b"base\0" + base.sha256.encode())
        return Checked(digest, state=state, stored_half=half | base.stored_half, base=base)
    if tag in ("state_dict", "safetensors"):
        state, half = _state(sniffed)
        if arch is None:
            first = next(iter(state), "")
            what = "a .safetensors file" if tag == "safetensors" else "a state dict"
            raise InputError(
                f"{path} is {what} ({len(state)} tensors, e.g. {first!r}): it holds weights but not the "
                "architecture; pass arch=\"module:factory\" naming a function that builds the nn.Module "
                "(e.g. mypkg.models:make_model), or export a .pt2 with torch.export"
                + (", or pass the Hugging Face model directory it came from" if tag == "safetensors" else ""),
                param="arch")
        return Checked(_file_sha256(path), state=state, stored_half=half)
    return Checked(_file_sha256(path))


def _refuse(sniffed: Sniffed) -> None:
    tag, path = sniffed.tag, sniffed.path
    if tag == "torchscript":
        raise InputError(
            f"{path} is a TorchScript archive (torch.jit.save): torch.func cannot differentiate "
            f"TorchScript; export the original nn.Module instead: {EXPORT_HINT}"
        )
    if tag == "aoti":
        raise InputError(
            f"{path} is an AOTInductor compiled package: compiled code cannot be differentiated; "
            f"save the ExportedProgram itself: {EXPORT_HINT}"
        )
    if tag in ("npz", "npy", "hdf5"):
        raise InputError(f"{path} is {KIND_WORDS[tag]}, which is data, not a model: pass it as data", param="data")
    if tag == "torch-data":
        raise InputError(f"{path} is a data file (a dict with inputs and targets), not a model: pass it as data",
                         param="data")
    if tag == "torch-save":
        raise InputError(
            f"{path} is a torch.save file holding {describe(sniffed.content)}, not a model: expected a "
            "state dict (name -> tensor) with arch, a pickled nn.Module, or a bundle"
        )
    raise InputError(not_readable(path, tag, sniffed.detail, "model"))


def check_bundle(obj: Mapping[str, Any], source: str) -> None:
    """Refuse a bundle of a newer version or whose fields are not what the format says."""
    version = obj.get("version")
    if not isinstance(version, int) or version < 1:
        raise InputError(f"{source}: corrupt basins bundle (version {version!r})")
    if version > BUNDLE_VERSION:
        raise InputError(
            f"{source} is a basins bundle of version {version}, newer than this basins reads "
            f"({BUNDLE_VERSION}); upgrade basins"
        )
    problems = []
    model = obj.get("model")
    if not (isinstance(model, torch.Tensor) and model.dtype == torch.uint8 and model.ndim == 1):
        problems.append("model is not a uint8 byte tensor")
    for key in ("inputs", "targets"):
        if not isinstance(obj.get(key), torch.Tensor):
            problems.append(f"{key} is not a tensor")
    if not (obj.get("loss") is None or isinstance(obj.get("loss"), str)):
        problems.append("loss is not a string")
    if not isinstance(obj.get("meta", {}), Mapping):
        problems.append("meta is not a dict")
    if problems:
        raise InputError(f"{source}: corrupt basins bundle ({'; '.join(problems)})")


def _directory(sniffed: Sniffed, trust_pickle: bool) -> Checked:
    """A Hugging Face model directory: code, pickles, shard headers, hash."""
    path, config = sniffed.path, sniffed.config
    config_path = os.path.join(path, "config.json")
    if config.get("auto_map"):
        raise InputError(
            f"{config_path} maps its architecture to code shipped with the model (auto_map); basins never "
            "runs such code (trust_remote_code): use a model whose class is part of transformers"
        )
    if sniffed.pickled and not trust_pickle:
        raise InputError(
            f"{path} holds its weights as {sniffed.files[0]}, a pickle: loading a pickle runs code from the file; "
            "pass trust_pickle=True only for files you trust, or convert it once with "
            "model.save_pretrained(path, safe_serialization=True)", param="trust_pickle")
    count, layers = 0, 0
    half: frozenset[str] = frozenset()
    for file in sniffed.safetensors:
        if not os.path.isfile(file):
            raise InputError(f"{file} is missing or not a regular file")
        header = safetensors_header(file)
        for name, (_, shape) in header.items():
            count += math.prod(shape)
            numbers = [int(part) for part in name.split(".") if part.isdigit()]
            layers = max([layers, *(k + 1 for k in numbers)])
        half |= _half_dtypes(header)
    declared = None if sniffed.pickled else (count, layers)
    return Checked(_named_sha256(path, ["config.json", *sniffed.files]), declared=declared, stored_half=half)


def _state(sniffed: Sniffed) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """The checked tensors of a state dict, ``.safetensors`` file or adapter, and their narrow dtypes."""
    if sniffed.safetensors:
        file = sniffed.safetensors[0]
        half = _half_dtypes(safetensors_header(file))
        return _read_safetensors(file), half
    state = dict(sniffed.content)
    source = os.path.join(sniffed.path, sniffed.files[0]) if sniffed.files else sniffed.path
    check_names(state, source)
    for name, tensor in state.items():
        if tensor.is_meta or tensor.layout != torch.strided:
            raise InputError(f"{source}: {name!r} is a {'meta' if tensor.is_meta else str(tensor.layout)} tensor; "
                             "a state dict must hold dense tensors with values")
    return state, frozenset(str(t.dtype).replace("torch.", "") for t in state.values()
                            if t.is_floating_point() and t.element_size() < 4)


def check_names(names: Iterable[object], source: str) -> None:
    """Refuse a parameter name that is not a plain dotted identifier, or has a part that is an
    attribute of ``nn.Module`` (``forward``, ``training``, ``_parameters``, ...).

    Raises:
        InputError: naming the first bad name (escaped) and ``source``.
    """
    for name in names:
        if not isinstance(name, str):
            raise InputError(f"{source}: a parameter name is a {type(name).__name__}, not a string")
        if len(name) > _MAX_NAME or not _DOTTED.fullmatch(name):
            shown = ascii(name[:80]) + ("..." if len(name) > 80 else "")
            raise InputError(f"{source}: parameter name {shown} is not a dotted identifier (e.g. layers.0.weight)")
        clash = next((part for part in name.split(".") if part in _MODULE_ATTRIBUTES), None)
        if clash is not None:
            raise InputError(f"{source}: parameter name {name!r} uses {clash!r}, an attribute of every nn.Module")


def safetensors_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a ``.safetensors`` file declares, ``{name: (dtype code, shape)}``, after checking
    the header against the file (module docstring). Reads only the header.

    Raises:
        InputError: a truncated file, a header that is not bounded JSON, an unknown dtype, a bad
            shape or name, or data offsets that do not match the shapes or the file's size.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > min(size - 8, _ST_MAX_HEADER):
                raise InputError(f"{path}: not a .safetensors file (header length {length} for a file of {size} bytes)")
            raw = handle.read(length)
    except OSError as err:
        raise InputError(f"{path}: cannot read the .safetensors file ({err.strerror})") from None
    header = load_json(raw, f"{path} (safetensors header)", max_bytes=_ST_MAX_HEADER, max_depth=4)
    if not isinstance(header, dict):
        raise InputError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    check_names(header, path)
    available = size - 8 - length
    spans: list[tuple[int, int, str]] = []
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        dtype, shape, offsets = _entry(entry)
        if dtype not in _ST_BYTES or shape is None or offsets is None:
            raise InputError(f"{path}: tensor {name!r} has a malformed safetensors entry (dtype, shape, data_offsets)")
        begin, end = offsets
        nbytes = math.prod(shape) * _ST_BYTES[dtype]
        if not 0 <= begin <= end <= available or end - begin != nbytes:
            raise InputError(
                f"{path}: tensor {name!r} declares shape {list(shape)} of {dtype} ({nbytes:,} bytes) at bytes "
                f"{begin}..{end}, but the file holds {available:,} bytes of data: the header does not match the file"
            )
        spans.append((begin, end, name))
        out[name] = (dtype, shape)
    check_allocation(sum(end - begin for begin, end, _ in spans), "its tensors", path)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise InputError(f"{path}: tensors {first!r} and {second!r} overlap in the file")
    return out


def _entry(entry: Any) -> tuple[Any, tuple[int, ...] | None, tuple[int, int] | None]:
    if not isinstance(entry, dict):
        return None, None, None
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    ok_shape = isinstance(shape, list) and all(type(d) is int and 0 <= d < 1 << 62 for d in shape)
    ok_offsets = (isinstance(offsets, list) and len(offsets) == 2
                  and all(type(o) is int and o >= 0 for o in offsets))
    return (entry.get("dtype"), tuple(shape) if ok_shape else None,
            (offsets[0], offsets[1]) if ok_offsets else None)


def _half_dtypes(header: dict[str, tuple[str, tuple[int, ...]]]) -> frozenset[str]:
    """The floating dtypes narrower than float32 that a :func:`safetensors_header` declares (torch names)."""
    return frozenset(_ST_HALF[dtype] for dtype, _ in header.values() if dtype in _ST_HALF)


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file whose header passed, on the CPU (no code runs: the
    format holds tensors only)."""
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise InputError(f"{path} is a .safetensors file: {HF_EXTRA_HINT}") from err
    try:
        return dict(load_file(path, device="cpu"))
    except Exception as err:
        raise InputError(f"{path}: cannot read the .safetensors file ({one_line(err, 300)})") from err


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    _feed(digest, path)
    return digest.hexdigest()


def _named_sha256(path: str, names: list[str], tail: bytes = b"") -> str:
    """SHA-256 over the files ``names`` in the directory ``path``, each preceded by its name and a NUL, then ``tail``."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        _feed(digest, os.path.join(path, name))
    digest.update(tail)
    return digest.hexdigest()


def _feed(digest: Any, file: str) -> None:
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
