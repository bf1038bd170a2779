"""Open an HDF5 file from elsewhere (data, a report) so that reading it stays inside it.

HDF5 can make a file read another: external links, virtual datasets and external raw storage
point at other files (a secret, a FIFO that hangs the reader, ``/dev/zero`` that fills the
memory). Soft links and hard-link cycles can make a walk never end, and a chunked dataset can
declare 1e8 rows it never stores. :func:`check_contained` walks a file without following any
link and refuses all of these before anything is read; :func:`open_contained` opens and checks.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import h5py

from basins.errors import InputError

from .bounds import check_allocation

__all__ = ["open_contained", "check_contained"]

#: a dataset may declare at most this many times the bytes it stores (plus :data:`_SPARSE_SLACK`)
MAX_SPARSE_RATIO = 1000
_SPARSE_SLACK = 1 << 20
_MAX_OBJECTS = 100_000
_MAX_DEPTH = 32
_MAX_ATTR_BYTES = 64 << 20


def open_contained(path: str, source: str, *, whole: bool, error: type[InputError] = InputError) -> h5py.File:
    """``h5py.File(path, "r")`` of a regular file, checked by :func:`check_contained`.

    Raises:
        error: not a regular file, not HDF5, or refused by :func:`check_contained`.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        raise error(f"{source}: cannot read it ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{source} is not a regular file (a FIFO, device or directory is never read)")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise error(f"{source} is not an HDF5 file (or it is corrupt): {str(err)[:160]}") from None
    try:
        check_contained(handle, source, whole=whole, error=error)
    except BaseException:
        handle.close()
        raise
    return handle


def _address(obj: Any) -> Any:
    info = h5py.h5o.get_info(obj.id)
    return getattr(info, "token", None) or info.addr


def check_contained(handle: h5py.File, source: str, *, whole: bool, error: type[InputError] = InputError) -> None:
    """Raise unless every object of ``handle`` is inside it and plausibly sized.

    Refused: external links, soft links, an object reached twice (hard-link cycles), nesting
    deeper than 32, more than 100,000 objects, virtual datasets, external raw storage, datasets
    of objects, references or opaque/compound types, a dataset declaring more than
    :data:`MAX_SPARSE_RATIO` times the bytes it stores, attributes over 64 MiB, and with
    ``whole`` (the file is read whole, as a report is) more declared bytes than the memory.
    """
    seen = {_address(handle)}
    total = 0
    stack: list[tuple[h5py.Group, str, int]] = [(handle, "", 0)]
    while stack:
        group, prefix, depth = stack.pop()
        if depth > _MAX_DEPTH or len(seen) > _MAX_OBJECTS:
            raise error(f"{source}: nested deeper than {_MAX_DEPTH} groups or more than {_MAX_OBJECTS:,} objects")
        _check_attrs(group, prefix or "/", source, error)
        for key in group.keys():
            name = f"{prefix}/{key}"
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise error(f"{source}: {name} is an external link to {link.filename!r}; an HDF5 file that reads "
                            "other files is refused: copy the data into it (h5py's Group.copy)")
            if isinstance(link, h5py.SoftLink):
                raise error(f"{source}: {name} is a soft link to {link.path!r}; store the object itself")
            obj = group.get(key)
            address = _address(obj)
            if address in seen:
                raise error(f"{source}: {name} is an object reached twice (a hard link or a cycle)")
            seen.add(address)
            if isinstance(obj, h5py.Group):
                stack.append((obj, name, depth + 1))
            elif isinstance(obj, h5py.Dataset):
                total += _check_dataset(obj, name, source, error)
                _check_attrs(obj, name, source, error)
            else:
                raise error(f"{source}: {name} is a {type(obj).__name__}, not a group or dataset")
    if whole:
        check_allocation(total, "its datasets", source)


def _check_attrs(obj: Any, name: str, source: str, error: type[InputError]) -> None:
    for key in obj.attrs.keys():
        try:
            size = obj.attrs.get_id(key).get_storage_size()
        except (RuntimeError, OSError, ValueError):  # an empty attribute stores 0 bytes (h5py reads 0 as a failure)
            size = 0
        if size > _MAX_ATTR_BYTES:
            raise error(f"{source}: attribute {key!r} of {name} is larger than {_MAX_ATTR_BYTES >> 20} MiB")


def _check_dataset(ds: h5py.Dataset, name: str, source: str, error: type[InputError]) -> int:
    """The dataset's declared bytes, after refusing what would read outside the file or inflate."""
    if ds.is_virtual:
        raise error(f"{source}: {name} is a virtual dataset (it reads other files); store the data itself")
    if ds.external:
        raise error(f"{source}: {name} keeps its data in external files {ds.external[0][0]!r}; store it in the file")
    if ds.dtype.kind in "OV" or h5py.check_dtype(vlen=ds.dtype) is not None or h5py.check_dtype(ref=ds.dtype):
        raise error(f"{source}: {name} holds {ds.dtype} values (objects, references or compound types are not read)")
    declared = int(ds.size or 0) * ds.dtype.itemsize
    try:
        stored = ds.id.get_storage_size()
    except (RuntimeError, OSError, ValueError):
        stored = 0
    if declared > MAX_SPARSE_RATIO * stored + _SPARSE_SLACK:
        raise error(f"{source}: {name} declares shape {ds.shape} ({declared:,} bytes) but stores {stored:,} bytes "
                    "(a sparse or crafted dataset); refusing to read it")
    return declared
