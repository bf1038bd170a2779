"""What a model or data path holds, found once, from its content: the first stage of every load.

:func:`sniff` looks at a path once and returns a :class:`Sniffed` whose ``tag`` names the format;
:mod:`.models` then runs the shared checks (:mod:`.checks`) and the one loader its table gives for
the tag. Files are recognised by their first bytes and, for zip archives, the names of their
members, never by their extension. What the sniff reads:

* a **file**: it must exist, be a regular file and be readable (a FIFO or device would block or
  never end); then its first 16 bytes, and for a zip archive its member names. A ``torch.save``
  file (a bundle, a state dict, a data dict, a pickled module all look alike) is read once with
  ``torch.load(weights_only=True)``, its zip directory's declared sizes checked first
  (:func:`basins.files.bounds.check_zip_declared`): what it holds gives the tag, and the content
  travels on in :attr:`Sniffed.content` (nothing is read twice). ``weights_only`` refusing it
  means the file holds code: the tag is ``pickle``, and nothing of it has run.
* a **directory**: ``adapter_config.json`` makes it a peft adapter, ``config.json`` a Hugging
  Face model directory; their JSON files are parsed with bounded size and depth
  (:func:`basins.files.bounds.load_json_file`), and the weight files are listed (a shard index's
  shards must be plain file names in the directory). An adapter's base model directory is sniffed
  too (:attr:`Sniffed.base`), and its ``adapter_model.bin``, if that is its weight file, read
  with ``weights_only``. Safetensors files are not read here: :mod:`.checks` checks their headers
  before anything maps them.

Tags: ``export``, ``bundle``, ``state_dict``, ``safetensors``, ``hf``, ``peft``, ``pickle`` (the
formats a model is loaded from), ``torch-data`` (a dict with inputs and targets), ``npz``,
``npy``, ``hdf5`` (data), and what no loader reads: ``torchscript``, ``aoti``, ``torch-save``
(other content), ``zip``, ``corrupt-zip``, ``empty``, ``unknown``.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from basins.errors import InputError
from basins.files.bounds import check_zip_declared, load_json_file

from .describe import BUNDLE_FORMAT, one_line

__all__ = ["ADAPTER_CONFIG", "Sniffed", "is_adapter_directory", "is_hf_directory", "sniff"]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

_NPY_MAGIC = b"\x93NUMPY"

ADAPTER_CONFIG = "adapter_config.json"

_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

#: other JSON files transformers reads from a model directory (parsed here first, bounded)
_OTHER_JSON = ("generation_config.json",)

_SAFE = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class Sniffed:
    """What :func:`sniff` found at ``path``.

    Attributes:
        tag: the format (module docstring).
        path: the path as given.
        detail: a few words for a message about an unreadable file (its first bytes, members).
        content: a ``torch.save`` file's content (``weights_only``); an adapter's
            ``adapter_model.bin`` state dict.
        error: for ``pickle``, the ``weights_only`` refusal (it names what the pickle references).
        config: the parsed ``config.json`` (``hf``) or ``adapter_config.json`` (``peft``).
        files: the weight files (names in ``path``): ``hf``, the files hashed; ``peft``, the one
            adapter weight file.
        safetensors: full paths of the safetensors files the load maps (their headers are checked
            by :mod:`.checks` first).
        pickled: ``hf``: the weights are ``pytorch_model.bin`` pickles.
        base: ``peft``: the base model directory's :class:`Sniffed`.
    """

    tag: str
    path: str
    detail: str = ""
    content: Any = None
    error: BaseException | None = None
    config: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    safetensors: list[str] = field(default_factory=list)
    pickled: bool = False
    base: Sniffed | None = None


def is_hf_directory(path: str) -> bool:
    """True for a directory holding a ``config.json``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def is_adapter_directory(path: str) -> bool:
    """True for a directory holding an ``adapter_config.json``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def sniff(path: str, *, what: str = "model", base_model: str | None = None) -> Sniffed:
    """What ``path`` holds (module docstring); ``what`` (``"model"`` or ``"data"``) words the errors.

    Args:
        base_model: for a peft adapter directory, its base model's directory (default: the one
            ``adapter_config.json`` names).

    Raises:
        InputError: a missing or unreadable path, a FIFO or device, a directory that is not a model
            directory, a damaged ``torch.save`` file, bad JSON beside a model, an adapter whose base
            model is not a local directory.
    """
    if what == "model" and is_adapter_directory(path):
        return _adapter(path, base_model)
    if what == "model" and is_hf_directory(path):
        return _hf(path)
    _check_file(path, what)
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        return Sniffed("empty", path)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            return Sniffed("corrupt-zip", path, f"{err} (truncated or damaged?)")
        tag, detail = _zip_tag(names)
        return _torch_save(path) if tag == "torch-save" else Sniffed(tag, path, detail)
    if head.startswith(_HDF5_MAGIC):
        return Sniffed("hdf5", path)
    if head.startswith(_NPY_MAGIC):
        return Sniffed("npy", path)
    if head[0] == 0x80 and 2 <= head[1] <= 5:  # torch.save's legacy (non-zip) format
        return _torch_save(path)
    if _is_safetensors(path, head):
        return Sniffed("safetensors", path, safetensors=[path])
    try:
        import h5py  # type: ignore[import-untyped]  # (a user block may precede the signature)

        if h5py.is_hdf5(path):
            return Sniffed("hdf5", path)
    except (ImportError, OSError):
        pass
    return Sniffed("unknown", path, f"starts with {head[:8]!r}")


def _check_file(path: str, what: str) -> None:
    """Refuse anything but an existing, readable regular file (``param="data"`` for a data file)."""
    param = "data" if what == "data" else None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{what} file not found: {path}", param=param) from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the {what} file ({err.strerror})", param=param) from None
    if stat.S_ISDIR(st.st_mode):
        hint = " (a Hugging Face model directory needs its config.json)" if what == "model" else ""
        raise InputError(f"{path} is a directory, not a {what} file: pass the file itself{hint}", param=param)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise InputError(f"{path} is {kind}, not a regular {what} file: write it to a file and pass that",
                         param=param)
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied, cannot read the {what} file", param=param)


def _is_safetensors(path: str, head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object of that length."""
    if len(head) < 10 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= min(os.path.getsize(path) - 8, 100 << 20)


def _zip_tag(names: list[str]) -> tuple[str, str]:
    if names and all(name.endswith(".npy") for name in names):
        return "npz", ", ".join(name[:-4] for name in names[:6])
    # torch archives put every member under one top-level folder named after the file
    relative = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "constants.pkl" in relative or any(name.startswith("code/") for name in relative):
        return "torchscript", ""
    has_program = any(
        (name.startswith("models/") and name.endswith(".json"))
        or name == "serialized_exported_program.json"
        for name in relative
    )
    if any("aotinductor" in name for name in relative) and not has_program:
        return "aoti", ""
    if has_program or "archive_format" in relative:
        return "export", ""
    if "data.pkl" in relative:
        return "torch-save", ""
    shown = ", ".join(sorted(names)[:4])
    return "zip", f"members {shown}{', ...' if len(names) > 4 else ''}"


def _torch_save(path: str) -> Sniffed:
    """A ``torch.save`` file, read once with ``weights_only``; its content gives the tag."""
    try:
        obj = _load_weights_only(path)
    except pickle.UnpicklingError as err:
        return Sniffed("pickle", path, error=err)
    tag = "torch-save"
    if isinstance(obj, Mapping) and obj.get("format") == BUNDLE_FORMAT:
        tag = "bundle"
    elif isinstance(obj, Mapping) and "inputs" in obj and "targets" in obj:
        tag = "torch-data"
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        tag = "state_dict"
    return Sniffed(tag, path, content=obj)


def _load_weights_only(path: str | io.BytesIO) -> Any:
    """``torch.load(weights_only=True)``; an UnpicklingError means the file holds code. A zip file's
    declared member sizes are checked first: torch allocates a record by the size its directory declares."""
    if isinstance(path, str) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            check_zip_declared(zf, os.path.getsize(path), path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise
    except Exception as err:  # torch raises RuntimeError, EOFError, ... on damaged files
        raise InputError(
            f"{path}: torch.load could not read it ({one_line(err)}); the file may be truncated or corrupt"
        ) from err


def _hf(path: str) -> Sniffed:
    """A Hugging Face model directory: its config, every JSON file transformers reads, its weight files."""
    config_path = os.path.join(path, "config.json")
    config = load_json_file(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"{config_path}: a Hugging Face config.json needs a string model_type")
    for name in _OTHER_JSON:
        if os.path.lexists(os.path.join(path, name)):
            load_json_file(os.path.join(path, name))
    names = sorted(os.listdir(path))
    safe = [n for n in names if n.endswith(".safetensors") or n == "model.safetensors.index.json"]
    if any(n in names for n in _SAFE) or safe:
        return Sniffed("hf", path, config=config, files=safe,
                       safetensors=[os.path.join(path, s) for s in _shards(path, safe)])
    pickled = [n for n in names if n.startswith("pytorch_model") and (n.endswith(".bin") or n.endswith(".json"))]
    if not pickled:
        raise InputError(
            f"{path} has a config.json but no weights (model.safetensors, its shards, or pytorch_model.bin)"
        )
    return Sniffed("hf", path, config=config, files=pickled,
                   pickled=True)


def _shards(path: str, files: list[str]) -> list[str]:
    """The safetensors files transformers will read: the index's shards (plain names of files in
    ``path``), else the ``.safetensors`` files."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.lexists(index):
        return [n for n in files if n.endswith(".safetensors")]
    content = load_json_file(index, max_bytes=64 << 20)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: a shard index needs a weight_map object")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        if os.path.basename(shard) != shard or shard.startswith(".") or not shard.endswith(".safetensors"):
            raise InputError(f"{index} names shard {shard!r}: shards must be .safetensors files in the same directory")
    return shards


def _adapter(path: str, base_model: str | None) -> Sniffed:
    """A peft adapter directory: its config, its weight file, and its base model directory, sniffed."""
    config_path = os.path.join(path, ADAPTER_CONFIG)
    config = load_json_file(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise InputError(f"{config_path}: an adapter config needs a string peft_type")
    base = _hf(_base_directory(path, config, base_model))
    for name in _ADAPTER_WEIGHTS:
        file = os.path.join(path, name)
        if not os.path.lexists(file):
            continue
        if not os.path.isfile(file):
            raise InputError(f"{file} is not a regular file")
        if name.endswith(".safetensors"):
            return Sniffed("peft", path, config=config, files=[name], safetensors=[file], base=base)
        try:
            state = _load_weights_only(file)
        except pickle.UnpicklingError as err:
            raise InputError(f"{file} holds Python objects, not only tensors: save the adapter with "
                             "safe_serialization=True (adapter_model.safetensors)") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{file} is not a dict of tensors (an adapter's state dict)")
        return Sniffed("peft", path, content=state, config=config, files=[name], base=base)
    raise InputError(f"{path} has an {ADAPTER_CONFIG} but no adapter weights ({' or '.join(_ADAPTER_WEIGHTS)})")


def _base_directory(path: str, config: dict[str, Any], base_model: str | None) -> str:
    """The local directory of an adapter's base model: ``base_model``, else the config's
    ``base_model_name_or_path`` as a path (absolute, relative to the working directory, or to the
    adapter directory). Nothing is fetched from a hub."""
    if base_model is not None:
        if not is_hf_directory(base_model):
            raise InputError(f"base_model {base_model}: not a local Hugging Face model directory (with config.json)",
                             param="base_model")
        return base_model
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise InputError(f"{os.path.join(path, ADAPTER_CONFIG)} names no base model (base_model_name_or_path): "
                         "pass base_model, the base model's local directory", param="base_model")
    for candidate in (named, os.path.join(path, named)):
        if is_hf_directory(candidate):
            return candidate
    raise InputError(
        f"{os.path.join(path, ADAPTER_CONFIG)} names base model {named!r}, which is not a local model directory; "
        "basins never downloads from a hub: pass base_model, the base model saved with save_pretrained",
        param="base_model",
    )
