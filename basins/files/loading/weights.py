"""Weights from files that are not trusted: names, safetensors headers, devices and precision.

* :func:`check_names`: every parameter name in a state dict or safetensors file is a plain dotted
  identifier (``transformer.h.0.attn.c_attn.weight``) whose parts are not attributes of
  ``nn.Module`` (``forward``, ``training``, ``_parameters``, ...): such a key would shadow the
  module's own machinery when loaded.
* :func:`safetensors_header`: the header of a ``.safetensors`` file, read and checked by basins
  before the ``safetensors`` package maps it: bounded size and depth, known dtypes, non-negative
  shapes, and data offsets that match the shapes and lie inside the file without overlapping.
  A header that lies about sizes is refused before anything is allocated.
* :func:`check_module_tensors`: a loaded module's parameters and buffers hold values (not the
  ``meta`` device) in the dense layout.
* :func:`upcast_half`: bfloat16/float16 (and float8) weights become float32, the analysis
  precision (``--dtype float64`` converts further): Hessians, Lanczos and error bounds are not
  computed in 8-bit-mantissa arithmetic. Upcasting is exact; the analysis is of the same function
  at the stored weights, evaluated in float32.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

from basins.errors import InputError
from basins.files.bounds import check_allocation, load_json

__all__ = [
    "check_module_tensors",
    "check_names",
    "load_safetensors_state",
    "safetensors_header",
    "upcast_half",
    "HF_EXTRA_HINT",
]

HF_EXTRA_HINT = "install the Hugging Face extra: pip install 'basins[hf]' (transformers and safetensors)"

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


def half_dtypes(header: dict[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """The floating dtypes narrower than float32 that a :func:`safetensors_header` declares (torch names)."""
    return sorted({_ST_HALF[dtype] for dtype, _ in header.values() if dtype in _ST_HALF})


def load_safetensors_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, on the CPU, after :func:`safetensors_header` (no code
    runs: the format holds tensors only).

    Raises:
        InputError: the ``safetensors`` package is missing (names the extra), or the file is damaged
            or its header refused.
    """
    safetensors_header(path)
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise InputError(f"{path} is a .safetensors file: {HF_EXTRA_HINT}") from err
    try:
        return dict(load_file(path, device="cpu"))
    except Exception as err:
        text = " ".join(str(err).split())[:300]
        raise InputError(f"{path}: cannot read the .safetensors file ({text})") from err


def check_module_tensors(module: torch.nn.Module, source: str) -> None:
    """Every parameter and buffer of ``module`` holds values on a real device, in the dense layout.

    Raises:
        InputError: a tensor on the ``meta`` device (shapes without values) or sparse, naming it.
    """
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_meta:
            raise InputError(f"{source}: {name!r} is on the meta device (a shape without values); save the real weights")
        if tensor.layout != torch.strided:
            raise InputError(f"{source}: {name!r} is a {tensor.layout} tensor; basins reads dense weights only "
                             "(save tensor.to_dense())")


def upcast_half(module: torch.nn.Module) -> str | None:
    """Convert ``module``'s floating parameters and buffers narrower than float32 to float32, in place.

    Returns:
        The stored dtypes that were converted (``"bfloat16"``, ``"float16"``, ``"bfloat16, float16"``),
        or None when there were none. Cost: one copy of those tensors.
    """
    found = sorted({str(t.dtype).replace("torch.", "")
                    for t in chain(module.parameters(), module.buffers()) if _narrow(t)})
    if not found:
        return None
    module._apply(lambda t: t.float() if _narrow(t) else t)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "dtype"):  # transformers reads it for masks and new tensors
        try:
            config.dtype = torch.float32
        except Exception:  # noqa: BLE001 - a config that refuses the attribute keeps its own
            pass
    return ", ".join(found)


def _narrow(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() < 4
