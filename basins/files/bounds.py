"""Bounds on what a file from elsewhere may make this process do: memory, JSON depth, zip members.

Every reader of an input file (``.pt2`` archives, bundles, ``.npz`` data, ``.h5`` data and
reports) checks a size the file *declares* here before allocating it, so that a 10 KB file
cannot ask for gigabytes (a zip bomb, a sparse HDF5 dataset of 1e8 rows, a weight whose shape
promises more elements than its bytes hold). Every JSON text from a file is parsed by
:func:`load_json`, which refuses deep nesting before ``json`` recurses into it.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any

from basins.errors import InputError

__all__ = ["memory_budget", "check_allocation", "load_json", "load_json_file", "read_zip_members",
           "check_zip_declared", "MAX_JSON_DEPTH", "MAX_CONFIG_BYTES"]

#: deepest JSON nesting accepted from a file (torch's export schema needs about 12)
MAX_JSON_DEPTH = 64
#: largest JSON text accepted from a file
MAX_JSON_BYTES = 256 << 20
#: largest JSON file beside a model read by :func:`load_json_file` (a config, an index)
MAX_CONFIG_BYTES = 16 << 20
#: inflated/compressed size above which a deflated zip member is treated as a zip bomb
MAX_ZIP_RATIO = 200
_ZIP_SLACK = 1 << 20
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def memory_budget() -> int:
    """Bytes this process may still allocate: the system's available memory, and below the
    address-space limit (``RLIMIT_AS``) when one is set. A guess on the high side where unknown."""
    budget = 1 << 62
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    budget = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        try:
            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as handle:
                used = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            budget = min(budget, soft - used)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return max(budget, 0)


def check_allocation(nbytes: int, what: str, source: str) -> None:
    """Raise :class:`InputError` when ``nbytes`` (declared by ``source`` for ``what``) exceeds the
    memory this process has (:func:`memory_budget`)."""
    budget = memory_budget()
    if nbytes > budget:
        raise InputError(
            f"{source}: {what} declares {nbytes:,} bytes, more than the {budget:,} bytes of memory "
            "available; refusing to allocate it (a damaged or crafted file?)"
        )


def json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> int:
    """The deepest nesting of arrays/objects in ``text`` (strings skipped); stops counting past ``limit``."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def load_json(data: bytes | bytearray | str, source: str, *, max_depth: int = MAX_JSON_DEPTH,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """``json.loads`` of text from a file, with its size and nesting bounded first.

    Raises:
        InputError: not UTF-8, not JSON, longer than ``max_bytes`` or nested deeper than ``max_depth``.
    """
    if len(data) > max_bytes:
        raise InputError(f"{source}: the JSON is {len(data):,} bytes, more than the {max_bytes:,} accepted")
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{source}: the JSON is not UTF-8 text") from None
    if json_depth(text, max_depth) > max_depth:
        raise InputError(f"{source}: the JSON is nested more than {max_depth} levels deep; refusing to parse it")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise InputError(f"{source}: not valid JSON ({str(err)[:120]})") from None


def load_json_file(path: str, *, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """The JSON in the file ``path`` (a Hugging Face ``config.json``, a shard index,
    ``adapter_config.json``), by :func:`load_json`; a FIFO, device or directory is refused, never
    opened for reading.

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


def read_zip_members(zf: zipfile.ZipFile, size: int, source: str) -> dict[str, bytearray]:
    """Every member of an open zip, inflated and CRC-checked, after its declared sizes are checked.

    Refused (:class:`InputError`): duplicate names, encrypted or other-than-stored/deflated
    members, compressed sizes that run past the file (``size`` bytes) or overlap, a stored member
    whose sizes differ, a deflated member inflating more than :data:`MAX_ZIP_RATIO` times, more
    bytes in all than :func:`memory_budget`, a member whose bytes are not its declared size, and
    a CRC mismatch.
    """
    infos = check_zip_declared(zf, size, source)
    out: dict[str, bytearray] = {}
    for info in infos:
        buf = bytearray(info.file_size)
        view, got = memoryview(buf), 0
        try:
            with zf.open(info) as f:
                while got < len(buf):
                    n = f.readinto(view[got:])  # type: ignore[attr-defined]
                    if not n:
                        break
                    got += n
                extra = f.read(1)  # reading to the end checks the CRC
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
            raise InputError(f"{source}: archive member {info.filename!r} is damaged ({str(err)[:120]})") from None
        if got != len(buf) or extra:
            raise InputError(f"{source}: archive member {info.filename!r} does not hold the "
                             f"{info.file_size:,} bytes it declares")
        out[info.filename] = buf
    return out


def check_zip_declared(zf: zipfile.ZipFile, size: int, source: str) -> list[zipfile.ZipInfo]:
    """The members of an open zip, after refusing what :func:`read_zip_members` refuses from the
    directory alone (no member is read): duplicates, encryption, unknown compression, declared
    sizes that do not fit the file or inflate too much, more bytes than the memory."""
    infos = zf.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{source}: archive member {dup!r} appears twice; refusing an ambiguous archive")
    total = compressed = 0
    for info in infos:
        if info.flag_bits & 0x1:
            raise InputError(f"{source}: archive member {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(f"{source}: archive member {info.filename!r} uses compression method "
                             f"{info.compress_type} (only stored and deflated are read)")
        fake = info.header_offset + info.compress_size > size or (
            info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size)
        if fake or info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1) + _ZIP_SLACK:
            raise InputError(
                f"{source}: archive member {info.filename!r} declares {info.file_size:,} bytes from "
                f"{info.compress_size:,} compressed in a file of {size:,} bytes (a zip bomb?); refusing to read it"
            )
        total += info.file_size
        compressed += info.compress_size
    if compressed > size:
        raise InputError(f"{source}: the archive's members declare more compressed bytes ({compressed:,}) "
                         f"than the file holds ({size:,}); refusing to read it")
    check_allocation(total, "the archive's members", source)
    return infos
