"""Recognise model and data files by their content (first bytes, zip member names), not their extension.

Shared by the model, data and bundle readers of :mod:`basins.files.loading`: what a file holds
(:func:`_sniff`), one-line descriptions for error messages, and the safe ``torch.load``
(``weights_only=True``) every reader uses.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from basins.errors import InputError
from basins.files.bounds import check_zip_declared

BUNDLE_FORMAT = "basins-bundle"

BUNDLE_VERSION = 1

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

_NPY_MAGIC = b"\x93NUMPY"

_HASH_CHUNK = 1 << 20

_EXPORT_HINT = (
    "torch.export.save(torch.export.export(model.eval(), (x[:2],), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2') "
    "with x a batch of inputs"
)



@dataclass
class _Sniffed:
    kind: str  # pt2 | aoti | torchscript | torch-save | legacy-pickle | npz | npy | hdf5 | ...
    detail: str = ""



_KIND_WORDS = {
    "pt2": "a torch.export archive (.pt2)",
    "aoti": "an AOTInductor compiled package",
    "torchscript": "a TorchScript archive (torch.jit.save)",
    "torch-save": "a torch.save file",
    "legacy-pickle": "a torch.save file in the legacy (non-zip) format",
    "npz": "a NumPy .npz archive",
    "npy": "a single NumPy .npy array",
    "hdf5": "an HDF5 file",
    "safetensors": "a .safetensors file of weights",
    "zip": "a zip archive of unknown content",
    "corrupt-zip": "a corrupt zip archive",
    "empty": "an empty file",
    "unknown": "a file of unknown format",
}



def _check_file(path: str, what: str) -> None:
    """Refuse anything but an existing, readable regular file (a FIFO or device would block or never end).

    A directory is refused by :func:`_refuse_directory`; a Hugging Face model directory is
    recognised before this check (:func:`basins.files.loading.hf.is_hf_directory`).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{what} file not found: {path}") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the {what} file ({err.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        _refuse_directory(path, what)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise InputError(f"{path} is {kind}, not a regular {what} file: write it to a file and pass that")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied, cannot read the {what} file")


def _refuse_directory(path: str, what: str) -> None:
    hint = " (a Hugging Face model directory needs its config.json)" if what == "model" else ""
    raise InputError(f"{path} is a directory, not a {what} file: pass the file itself{hint}")



def _sniff(path: str) -> _Sniffed:
    """Tell what a file holds from its first bytes and, for a zip, its member names."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        return _Sniffed("empty")
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            return _Sniffed("corrupt-zip", f"{err} (truncated or damaged?)")
        return _sniff_zip(names)
    if head.startswith(_HDF5_MAGIC):
        return _Sniffed("hdf5")
    if head.startswith(_NPY_MAGIC):
        return _Sniffed("npy")
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return _Sniffed("legacy-pickle")
    if _is_safetensors(path, head):
        return _Sniffed("safetensors")
    try:
        import h5py  # type: ignore[import-untyped]  # (a user block may precede the signature)

        if h5py.is_hdf5(path):
            return _Sniffed("hdf5")
    except (ImportError, OSError):
        pass
    return _Sniffed("unknown", f"starts with {head[:8]!r}")



def _is_safetensors(path: str, head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object of that length."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= min(os.path.getsize(path) - 8, 100 << 20)


def _sniff_zip(names: list[str]) -> _Sniffed:
    if names and all(name.endswith(".npy") for name in names):
        return _Sniffed("npz", ", ".join(name[:-4] for name in names[:6]))
    # torch archives put every member under one top-level folder named after the file
    relative = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "constants.pkl" in relative or any(name.startswith("code/") for name in relative):
        return _Sniffed("torchscript")
    has_program = any(
        (name.startswith("models/") and name.endswith(".json"))
        or name == "serialized_exported_program.json"
        for name in relative
    )
    if any("aotinductor" in name for name in relative) and not has_program:
        return _Sniffed("aoti")
    if has_program or "archive_format" in relative:
        return _Sniffed("pt2")
    if "data.pkl" in relative:
        return _Sniffed("torch-save")
    shown = ", ".join(sorted(names)[:4])
    return _Sniffed("zip", f"members {shown}{', ...' if len(names) > 4 else ''}")



def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()



def _one_line(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."



def _torch_load_safe(path: str | io.BytesIO, source: str) -> Any:
    """``torch.load(weights_only=True)``; an UnpicklingError means the file holds code. A zip file's
    declared member sizes are checked first (:func:`basins.files.bounds.check_zip_declared`): torch
    allocates a record by the size its directory declares."""
    if isinstance(path, str) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            check_zip_declared(zf, os.path.getsize(path), source)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise
    except Exception as err:  # torch raises RuntimeError, EOFError, ... on damaged files
        raise InputError(
            f"{source}: torch.load could not read it ({_one_line(err)}); "
            "the file may be truncated or corrupt"
        ) from err



def _unpickling_global(err: BaseException) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f"it references {match.group(1)}" if match else "it is not plain tensors"



def _not_readable(path: str, sniffed: _Sniffed, what: str) -> str:
    found = _KIND_WORDS.get(sniffed.kind, sniffed.kind)
    detail = f" ({sniffed.detail})" if sniffed.detail else ""
    if what == "model":
        expected = (
            "a .pt2 (torch.export.save), a state dict (.pt or .safetensors) with --arch, a Hugging Face "
            "model directory, or a bundle written by basins example"
        )
    else:
        expected = (
            'a .pt ({"inputs", "targets"}), .npz or .h5 file with inputs and targets, '
            "or module:factory"
        )
    noun = "a model" if what == "model" else "data"
    return f"{path} is {found}{detail}, not {noun} basins can read: expected {expected}"



def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:5]]
        more = ", ..." if len(obj) > 5 else ""
        return f"a dict with keys {', '.join(keys)}{more}" if keys else "an empty dict"
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"



def _check_bundle(obj: Mapping[str, Any], source: str) -> None:
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

