"""Refuse ``torch.export`` archives whose loading would unpickle something, before torch reads them.

``torch.export.load`` (torch 2.13, ``torch/export/pt2_archive/_package.py``) runs code from the
file in four places, although a ``.pt2`` looks like plain JSON and raw tensor bytes:

* ``data/sample_inputs/<model>.pt`` (and the legacy ``data/weights/<model>.pt`` and
  ``data/constants/<model>.pt``): read with ``torch.load(weights_only=True)`` and, when that
  fails, **again with** ``weights_only=False``;
* a weight or tensor constant whose entry in ``data/{weights,constants}/*_config.json`` says
  ``"use_pickle": true``: ``torch.load(weights_only=False)``;
* a constant named ``opaque_obj_*``: ``pickle.loads``;
* a constant named ``custom_obj_*``: the TorchScript object unpickler.

:func:`check_export_archive` reads the zip's directory and those small members with the
standard library (``zipfile``, ``json``) and ``torch.load(weights_only=True)`` (which never
runs code), and raises :class:`~basins.errors.InputError` naming the first member that torch
would unpickle. ``--trust-pickle`` skips the check. Implausible compression ratios (zip bombs)
are refused too, since torch inflates members whole.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import IO

import torch

from basins.errors import InputError

from .formats import _unpickling_global

__all__ = ["check_export_archive", "check_member_size", "SAFE_EXPORT_HINT"]

#: How to write an archive that loads with no pickle at all.
SAFE_EXPORT_HINT = (
    "re-export it with plain tensor weights and no custom objects, e.g. "
    "torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2'), or pass "
    "--trust-pickle (trust_pickle=True) only if you trust whoever wrote the file"
)

_MAX_RATIO = 200  # inflated/compressed size above which a member is treated as a zip bomb
_SLACK = 1 << 20


def check_export_archive(archive: str | bytes, source: str) -> None:
    """Raise unless ``torch.export.load`` can read ``archive`` without unpickling anything.

    Args:
        archive: path of a ``.pt2`` file, or its bytes (a bundle's embedded model).
        source: the name used in messages (a path, or ``"bundle.pt (embedded model)"``).

    Raises:
        InputError: a member would be unpickled (named, with how to re-export), or a member's
            declared size is implausible. A file that is no zip at all passes: torch refuses it.
    """
    handle: IO[bytes] | str = io.BytesIO(archive) if isinstance(archive, bytes) else archive
    try:
        with zipfile.ZipFile(handle) as zf:
            infos = zf.infolist()
            for info in infos:
                check_member_size(info, source)
            for info in infos:
                _check_member(zf, info, source)
    except zipfile.BadZipFile:
        return  # not a zip: torch's own reader fails on it before any unpickling, with its message


def check_member_size(info: zipfile.ZipInfo, source: str) -> None:
    """Raise unless the member's inflated size is plausible for its compressed size (no zip bomb)."""
    if info.file_size > _MAX_RATIO * max(info.compress_size, 1) + _SLACK:
        raise InputError(
            f"{source}: archive member {info.filename!r} declares {info.file_size:,} bytes from "
            f"{info.compress_size:,} compressed (a zip bomb?); refusing to read it"
        )


def _relative(name: str) -> str:
    """A member name without the archive's root folder (``model/data/x`` → ``data/x``)."""
    return name.split("/", 1)[1] if "/" in name else name


def _check_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> None:
    rel = _relative(info.filename)
    if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith("_config.json"):
        _check_payload_config(zf, info, rel, source)
    elif rel.endswith(".pt"):  # sample inputs, legacy weights/constants: torch falls back to a full unpickle
        if info.file_size == 0:
            return
        try:
            torch.load(io.BytesIO(zf.read(info)), weights_only=True, map_location="cpu")
        except Exception as err:
            raise InputError(
                f"{source}: archive member {rel!r} is a pickle that is not plain tensors "
                f"({_unpickling_global(err)}); torch.export.load would unpickle it, which runs code from "
                f"the file: {SAFE_EXPORT_HINT}"
            ) from None


def _check_payload_config(zf: zipfile.ZipFile, info: zipfile.ZipInfo, rel: str, source: str) -> None:
    try:
        config = json.loads(zf.read(info).decode())
        entries = config.get("config", {})
        items = list(entries.items())
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise InputError(f"{source}: archive member {rel!r} is not a valid payload config ({err})") from None
    folder = rel.rsplit("/", 1)[0]
    for fqn, meta in items:
        path_name = str((meta or {}).get("path_name", "")) if isinstance(meta, dict) else ""
        pickled = isinstance(meta, dict) and bool(meta.get("use_pickle"))
        is_object = path_name.startswith(("opaque_obj_", "custom_obj_"))
        if pickled or is_object:
            what = "a pickled Python object" if is_object else "a pickled tensor"
            raise InputError(
                f"{source}: archive member {folder}/{path_name!s} ({fqn!r}) is {what}; torch.export.load "
                f"would unpickle it, which runs code from the file: {SAFE_EXPORT_HINT}"
            )
