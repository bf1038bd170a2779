"""JSON from files that are not trusted: bounded in size and nesting depth before it is parsed.

Python's :func:`json.loads` recurses once per nesting level, so a document nested 100,000 deep
ends in a ``RecursionError`` (an internal error, not a message), and its size is bounded only by
memory. :func:`parse_json` first measures both: the size against ``max_bytes``, the depth by a
scan of the brackets outside strings (linear in the size), and only then parses. Used for every
JSON file basins reads next to a model (Hugging Face ``config.json``, ``adapter_config.json``,
the shard index, ``generation_config.json``) and for safetensors headers.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from basins.errors import InputError

__all__ = ["MAX_DEPTH", "parse_json", "read_json_file"]

#: Deepest nesting accepted (real configs nest a few levels; peft's and transformers' under 10).
MAX_DEPTH = 64
#: Largest config file read (bytes); safetensors headers pass their own limit.
MAX_CONFIG_BYTES = 16 << 20

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings in ``raw`` (0 for a scalar)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json(raw: bytes, source: str, *, max_bytes: int = MAX_CONFIG_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(raw)`` after checking its size and depth; ``source`` names it in messages.

    Raises:
        InputError: more than ``max_bytes`` bytes, nested deeper than ``max_depth``, not UTF-8,
            not JSON, or holding ``NaN``/``Infinity`` (not JSON).
    """
    if len(raw) > max_bytes:
        raise InputError(f"{source}: {len(raw):,} bytes of JSON, more than the {max_bytes:,} basins reads")
    depth = json_depth(raw)
    if depth > max_depth:
        raise InputError(f"{source}: JSON nested {depth} levels deep, more than the {max_depth} basins reads")

    def _constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        text = " ".join(str(err).split())[:200]
        raise InputError(f"{source}: not a readable JSON file ({text})") from None


def read_json_file(path: str, *, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """:func:`parse_json` of a regular file (a FIFO, device or directory is refused, never opened for reading).

    Raises:
        InputError: as :func:`parse_json`, or the path is missing or not a regular file.
    """
    try:
        if not os.path.isfile(path):
            raise InputError(f"{path} is not a regular file")
        size = os.path.getsize(path)
        if size > max_bytes:
            raise InputError(f"{path}: {size:,} bytes of JSON, more than the {max_bytes:,} basins reads")
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror})") from None
    return parse_json(raw, path, max_bytes=max_bytes)
