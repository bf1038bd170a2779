"""JSON files beside a model (Hugging Face ``config.json``, ``generation_config.json``, the shard
index, ``adapter_config.json``), read from regular files only and parsed with their size and
nesting depth bounded first (:func:`basins.files.bounds.load_json`): a document nested 100,000
deep is a one-line error, not a ``RecursionError``.
"""

from __future__ import annotations

import os
from typing import Any

from basins.errors import InputError
from basins.files.bounds import load_json

__all__ = ["MAX_CONFIG_BYTES", "read_json_file"]

#: Largest config file read (bytes)
MAX_CONFIG_BYTES = 16 << 20


def read_json_file(path: str, *, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """The JSON in ``path``, bounded (a FIFO, device or directory is refused, never opened for reading).

    Raises:
        InputError: the path is missing or not a regular file, larger than ``max_bytes``, nested too
            deep, not UTF-8 or not JSON.
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
    return load_json(raw, path, max_bytes=max_bytes)
