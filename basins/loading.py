"""Load a model and its data from the files users have, and write self-contained bundles.

Files are recognised by their **content**, not their extension: the first bytes and, for zip
archives, the names of the members. ``torch.save`` files, ``torch.export`` archives, TorchScript
archives and ``.npz`` files are all zip archives, so a ``.pt`` file may hold a bundle, a state
dict, a pickled module or TorchScript; errors say which one was found. Every failure raises
:class:`~basins.errors.InputError` with a one-line message naming the file, what it holds and
what to do. Nothing here prints.

Models (:func:`load_model`)
    * ``.pt2`` written by ``torch.export.save``: loaded with ``torch.export.load`` (no pickle,
      safe). The exported program is turned into inference mode: batch-norm layers use their
      running statistics and dropout is off, even if the model was exported in training mode,
      and the module's ``eval()`` is a no-op rather than the error exported modules raise. If
      the batch dimension of the input was exported as static, ``fixed_batch_size`` is that
      size (the model can only be called on batches of exactly that many examples).
    * a state dict (``torch.save(model.state_dict(), path)``), read with ``weights_only=True``,
      plus ``arch="module:factory"``: ``factory()`` builds the ``nn.Module`` and the weights are
      loaded with ``strict=True``.
    * a pickled ``nn.Module`` (``torch.save(model, path)``): loading it runs code from the file,
      so it is refused unless ``trust_pickle=True`` (``--trust-pickle``).
    * TorchScript (``torch.jit.save``) is always refused: ``torch.func`` cannot differentiate it.
      The error gives the ``torch.export`` one-liner to use instead.

Data (:func:`load_data`)
    ``spec`` is a file or ``module:factory``:

    * ``.pt``: ``torch.save({"inputs": X, "targets": Y}, path)``, read with ``weights_only=True``;
    * ``.npz``: ``numpy.savez(path, inputs=X, targets=Y)`` (read with ``allow_pickle=False``);
    * ``.h5``/``.hdf5``: datasets named ``inputs`` and ``targets`` at the root;
    * a bundle (its data);
    * ``module:factory`` or ``path/to/file.py:factory``: the attribute, called with no
      arguments if it is callable, gives ``(inputs, targets)`` (tensors or arrays), a dict with
      those keys, a map-style ``Dataset`` of ``(x, y)`` pairs, or a ``DataLoader`` of
      ``(x, y)`` batches (iterated once, in order; a shuffling or ``drop_last`` loader is
      refused because the data would change from run to run).

    Inputs have shape ``(n, ...)`` and targets ``(n, ...)`` with the same ``n ≥ 1``; dtypes are
    kept as stored (integer class labels stay integer, float targets stay float); NumPy arrays
    become tensors. Floating-point inputs and targets must be finite.
    ``max_samples=k`` keeps the **first** ``k`` examples, in stored order: a fixed subset,
    nothing random, so the same file and ``k`` always give the same problem (and the same data
    hash). ``seed`` only seeds ``torch``, ``numpy`` and ``random`` while a factory runs and its
    dataset or loader is materialised (global generator states are restored afterwards), so a
    factory that draws random numbers gives the same data on every run.

Bundle format (version 1)
    One ``torch.save`` file, readable with ``torch.load(path, weights_only=True)`` (no code
    runs when it is loaded), holding a dict::

        {
            "format": "basins-bundle",       # str, identifies the file
            "version": 1,                    # int, this layout
            "model": uint8 tensor (m,),      # the bytes of a torch.export.save (.pt2) archive
            "inputs": tensor (n, ...),       # the data, dtypes as given
            "targets": tensor (n, ...),
            "loss": "cross-entropy" | None,  # a loss name (mse, cross-entropy, nll, bce) or
                                             # "module:function"; None: infer from the targets
            "meta": {str: str | int | float | bool | None | list of these},
        }

    ``basins example`` writes one (:mod:`basins.example`), :func:`save_bundle` writes one from
    a module or an ``ExportedProgram``, and any command accepts it as ``MODEL`` with no other
    option (``--data``/``--loss`` override what it carries). Readers refuse other ``format``
    values and newer versions. ``LoadedModel.sha256`` of a bundle is the hash of the embedded
    ``.pt2`` bytes. (It differs from the hash of a ``.pt2`` file of the same program: the
    archive's member names start with the file's name, ``archive/`` in a bundle.)

Example:
    >>> from basins.loading import resolve_inputs
    >>> model, data, loss = resolve_inputs("basins-example/model.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import numbers
import os
import pickle
import random
import re
import sys
import tempfile
import types
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from basins.datasource import StreamSpec, hdf5_stream, stream_from_object
from basins.errors import InputError

_T = TypeVar("_T")

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "Bundle",
    "LoadedData",
    "LoadedModel",
    "import_object",
    "load_bundle",
    "load_data",
    "load_model",
    "resolve_inputs",
    "save_bundle",
]

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
class LoadedModel:
    """A model ready for ``torch.func.functional_call(module, (params, buffers), x)``.

    Attributes:
        module: The ``nn.Module``, in eval mode; for a ``.pt2`` the ``ExportedProgram``'s
            ``.module()`` rewritten to inference mode (its ``eval()`` is a no-op).
        kind: ``"export"``, ``"state_dict"``, ``"pickle"`` or ``"bundle"``.
        fixed_batch_size: For an export whose batch dimension is static, that size (the module
            only accepts batches of exactly this many examples); otherwise ``None``.
        source: The path as given.
        sha256: Hex SHA-256 of the model file's bytes (of a bundle: of the embedded ``.pt2``).
    """

    module: torch.nn.Module
    kind: str
    fixed_batch_size: int | None
    source: str
    sha256: str


@dataclass
class LoadedData:
    """A whole dataset in memory, on the CPU.

    Attributes:
        inputs: Tensor ``(n, ...)``, dtype as stored.
        targets: Tensor ``(n, ...)``, dtype as stored (class labels integer, values float).
        source: The path or ``module:factory`` spec as given.
        sha256: Hex SHA-256 of the content: names, dtypes, shapes and bytes of inputs and
            targets (after ``max_samples``), independent of the file format.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    source: str
    sha256: str


@dataclass
class Bundle:
    """A model, its data and its loss, from one bundle file (see the module docstring)."""

    model: LoadedModel
    data: LoadedData
    loss: str | None
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Sniffing


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
    "zip": "a zip archive of unknown content",
    "corrupt-zip": "a corrupt zip archive",
    "empty": "an empty file",
    "unknown": "a file of unknown format",
}


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not a {what} file: pass the file itself")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied, cannot read the {what} file")


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
    try:
        import h5py  # type: ignore[import-untyped]  # (a user block may precede the signature)

        if h5py.is_hdf5(path):
            return _Sniffed("hdf5")
    except (ImportError, OSError):
        pass
    return _Sniffed("unknown", f"starts with {head[:8]!r}")


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
    """``torch.load(weights_only=True)``; an UnpicklingError means the file holds code."""
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


# --------------------------------------------------------------------------------------------
# Models


def load_model(path: str, *, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load a model file (``.pt2``, state dict + ``arch``, trusted pickle, or bundle).

    Args:
        path: The model file; its format is recognised from its content.
        arch: ``"module:factory"`` building the ``nn.Module`` for a state dict (the factory is
            called with no arguments; an ``nn.Module`` instance is used as is). Ignored for
            self-contained formats.
        trust_pickle: Allow loading a pickled ``nn.Module``, which runs code from the file.

    Returns:
        The :class:`LoadedModel`, in eval mode.

    Raises:
        InputError: missing file, directory, unknown or corrupt content, TorchScript, a pickle
            without ``trust_pickle``, a state dict without ``arch`` or that does not fit it.
    """
    model, _ = _load_model_file(path, arch=arch, trust_pickle=trust_pickle)
    return model


def _load_model_file(
    path: str, *, arch: str | None, trust_pickle: bool
) -> tuple[LoadedModel, dict[str, Any] | None]:
    """The model, and the raw bundle dict when the file is a bundle."""
    _check_file(path, "model")
    sniffed = _sniff(path)
    kind = sniffed.kind
    if kind == "pt2":
        try:
            program = torch.export.load(path)
        except Exception as err:
            raise InputError(
                f"{path} looks like a torch.export archive (.pt2) but torch.export.load failed "
                f"({_one_line(err)}); re-export it with this torch version ({torch.__version__})"
            ) from err
        module, fixed = _prepare_exported(program, path)
        return LoadedModel(module, "export", fixed, path, _file_sha256(path)), None
    if kind == "torchscript":
        raise InputError(
            f"{path} is a TorchScript archive (torch.jit.save): torch.func cannot differentiate "
            f"TorchScript; export the original nn.Module instead: {_EXPORT_HINT}"
        )
    if kind == "aoti":
        raise InputError(
            f"{path} is an AOTInductor compiled package: compiled code cannot be differentiated; "
            f"save the ExportedProgram itself: {_EXPORT_HINT}"
        )
    if kind in ("torch-save", "legacy-pickle"):
        return _load_torch_save_model(path, arch=arch, trust_pickle=trust_pickle)
    if kind in ("npz", "npy", "hdf5"):
        raise InputError(
            f"{path} is {_KIND_WORDS[kind]}, which is data, not a model: pass it with --data"
        )
    raise InputError(_not_readable(path, sniffed, "model"))


def _not_readable(path: str, sniffed: _Sniffed, what: str) -> str:
    found = _KIND_WORDS.get(sniffed.kind, sniffed.kind)
    detail = f" ({sniffed.detail})" if sniffed.detail else ""
    if what == "model":
        expected = (
            "a .pt2 (torch.export.save), a state dict with --arch, or a bundle written by "
            "basins example"
        )
    else:
        expected = (
            'a .pt ({"inputs", "targets"}), .npz or .h5 file with inputs and targets, '
            "or module:factory"
        )
    noun = "a model" if what == "model" else "data"
    return f"{path} is {found}{detail}, not {noun} basins can read: expected {expected}"


def _load_torch_save_model(
    path: str, *, arch: str | None, trust_pickle: bool
) -> tuple[LoadedModel, dict[str, Any] | None]:
    try:
        obj = _torch_load_safe(path, path)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise InputError(
                f"{path} is a pickled Python object ({_unpickling_global(err)}); loading a "
                "pickle runs code from the file: pass --trust-pickle (trust_pickle=True) only "
                "if you trust its source, or save model.state_dict() and pass --arch, or "
                "export a .pt2 with torch.export"
            ) from err
        return _load_trusted_pickle(path), None
    if isinstance(obj, Mapping) and obj.get("format") == BUNDLE_FORMAT:
        return _bundle_model(obj, path), dict(obj)
    if isinstance(obj, Mapping) and "inputs" in obj and "targets" in obj:
        raise InputError(
            f"{path} is a data file (a dict with inputs and targets), not a model: "
            "pass it with --data"
        )
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _load_state_dict(path, obj, arch), None
    raise InputError(
        f"{path} is a torch.save file holding {_describe(obj)}, not a model: expected a "
        "state dict (name -> tensor) with --arch, a pickled nn.Module, or a bundle"
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:5]]
        more = ", ..." if len(obj) > 5 else ""
        return f"a dict with keys {', '.join(keys)}{more}" if keys else "an empty dict"
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _load_trusted_pickle(path: str) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise InputError(
            f"{path}: unpickling failed ({type(err).__name__}: {_one_line(err)}); the classes "
            "it references must be importable (run from the project that defines them)"
        ) from err
    if not isinstance(obj, torch.nn.Module):
        raise InputError(
            f"{path} unpickled to {_describe(obj)}, not an nn.Module: save the model itself "
            "(torch.save(model, path)) or, better, export a .pt2 with torch.export"
        )
    obj.eval()
    return LoadedModel(obj, "pickle", None, path, _file_sha256(path))


def _load_state_dict(path: str, state: Mapping[str, Any], arch: str | None) -> LoadedModel:
    first = next(iter(state))
    if arch is None:
        raise InputError(
            f"{path} is a state dict ({len(state)} tensors, e.g. {first!r}): it holds weights "
            "but not the architecture; pass --arch module:factory naming a function that builds "
            "the nn.Module (e.g. --arch mypkg.models:make_model), or export a .pt2 with "
            "torch.export"
        )
    module = _build_module(arch)
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(
            f"{path}: the state dict does not fit the model built by --arch {arch} "
            f"({_one_line(err)})"
        ) from err
    module.eval()
    return LoadedModel(module, "state_dict", None, path, _file_sha256(path))


def _build_module(arch: str) -> torch.nn.Module:
    factory = import_object(arch)
    if isinstance(factory, torch.nn.Module):
        return factory
    if not callable(factory):
        raise InputError(
            f"--arch {arch} is a {type(factory).__name__}, not a function returning an nn.Module"
        )
    try:
        module = factory()
    except Exception as err:
        raise InputError(
            f"--arch {arch}: calling it with no arguments raised {type(err).__name__} "
            f"({_one_line(err)}); it must build the model without arguments"
        ) from err
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"--arch {arch} returned {_describe(module)}, not an nn.Module")
    return module


# Inference-mode rewrite of exported graphs ----------------------------------------------------

_TRAINING_FLAG_ARG = {  # op -> (position, name) of its "training" flag
    "aten::batch_norm": (5, "training"),
    "aten::dropout": (2, "train"),
    "aten::feature_dropout": (2, "train"),
    "aten::alpha_dropout": (2, "train"),
    "aten::feature_alpha_dropout": (2, "train"),
}


def _prepare_exported(
    program: torch.export.ExportedProgram, source: str
) -> tuple[torch.nn.Module, int | None]:
    """``program.module()`` in inference mode, and its static batch size (or None)."""
    from torch.export.graph_signature import InputKind, TensorArgument

    user_inputs = [
        spec for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT
    ]
    tensors = [spec for spec in user_inputs if isinstance(spec.arg, TensorArgument)]
    if len(user_inputs) != 1 or len(tensors) != 1:
        names = ", ".join(getattr(spec.arg, "name", "?") for spec in user_inputs) or "none"
        raise InputError(
            f"{source}: the exported model takes {len(user_inputs)} inputs ({names}); basins "
            "calls model(x) with one batch tensor x: export a wrapper whose forward takes one "
            "tensor"
        )
    name = tensors[0].arg.name
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    value = node.meta.get("val")
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) == 0:
        raise InputError(
            f"{source}: the exported model's input is a scalar, it has no batch dimension: "
            f"export it with a batch of examples: {_EXPORT_HINT}"
        )
    first = shape[0]
    fixed = int(first) if isinstance(first, int) else None
    module = program.module()
    _to_inference_mode(module, source)
    return module, fixed


def _to_inference_mode(module: torch.fx.GraphModule, source: str) -> None:
    """Rewrite training-mode ops of an unlifted exported graph to eval behaviour, in place.

    ``torch.export`` bakes train/eval into the graph, and the module it returns refuses
    ``eval()``. Batch norm and dropout carry a ``training`` flag that is set to ``False``, and
    the ``num_batches_tracked += 1`` of batch norm is dropped. Any other op that mutates state
    means the model is not a function of its parameters: refused.
    """
    graph = module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        flag = _TRAINING_FLAG_ARG.get(schema.name)
        if flag is not None:
            position, keyword = flag
            if len(node.args) > position and node.args[position] is True:
                args = list(node.args)
                args[position] = False
                node.args = tuple(args)
                changed = True
            elif node.kwargs.get(keyword) is True:
                node.kwargs = {**node.kwargs, keyword: False}
                changed = True
            continue
        if schema.is_mutable:
            target = node.args[0] if node.args else None
            if (
                isinstance(target, torch.fx.Node)
                and target.op == "get_attr"
                and str(target.target).endswith("num_batches_tracked")
                and not node.users
            ):
                graph.erase_node(node)
                changed = True
                continue
            raise InputError(
                f"{source}: the exported model updates its own state when called "
                f"({schema.name}); export it in eval mode, after model.eval(): {_EXPORT_HINT}"
            )
    if changed:  # (no dead-code elimination: it could drop the input-guard call)
        module.recompile()
    for submodule in module.modules():
        submodule.training = False

    def _eval(self: torch.nn.Module) -> torch.nn.Module:
        return self

    def _train(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
        if mode:
            raise NotImplementedError(
                "basins loaded this exported program in inference mode; it cannot be trained"
            )
        return self

    module.eval = types.MethodType(_eval, module)  # type: ignore[method-assign]
    module.train = types.MethodType(_train, module)  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------
# Data


def load_data(spec: str, *, max_samples: int | None = None, seed: int = 0) -> LoadedData:
    """Load ``(inputs, targets)`` from a file or a ``module:factory`` (see module docstring).

    Args:
        spec: A ``.pt``/``.npz``/``.h5``/``.hdf5`` file or bundle (recognised by content), or
            ``module:factory`` / ``path/to/file.py:factory``.
        max_samples: Keep the first ``max_samples`` examples (all if there are fewer).
        seed: Seeds torch/numpy/random while a factory runs; unused for files.

    Returns:
        The :class:`LoadedData`, on the CPU, dtypes as stored.

    Raises:
        InputError: missing/unknown/corrupt file, missing keys, mismatched ``n``, ``n = 0``,
            non-finite values, or a factory that fails or returns something else.
    """
    _check_max_samples(max_samples)
    if os.path.exists(spec):
        _check_file(spec, "data")
        inputs, targets = _load_data_file(spec, max_samples)
    elif ":" in spec and not spec.lower().endswith((".pt", ".pth", ".npz", ".h5", ".hdf5")):
        inputs, targets = _load_data_factory(spec, max_samples, seed)
    else:
        raise InputError(
            f"data file not found: {spec} (for a Python function write module:function or "
            "path/to/file.py:function)"
        )
    return _finish_data(inputs, targets, spec, max_samples)


def open_data(spec: str, *, max_samples: int | None = None, seed: int = 0) -> LoadedData | StreamSpec:
    """Like :func:`load_data`, but data that can be read a part at a time are not read yet.

    A ``module:factory`` giving a map-style ``Dataset`` or an ordered ``DataLoader``, and an
    HDF5 file, come back as a :class:`~basins.datasource.StreamSpec`: their size, and how to
    open any contiguous part of them as a stream (:mod:`basins.datasource`). Everything else
    is loaded, as by :func:`load_data`.

    Raises:
        InputError: as :func:`load_data`.
    """
    _check_max_samples(max_samples)
    if os.path.exists(spec):
        _check_file(spec, "data")
        if _sniff(spec).kind == "hdf5":
            return _reading(spec, lambda: hdf5_stream(spec, max_samples), seed)
    elif ":" in spec and not spec.lower().endswith((".pt", ".pth", ".npz", ".h5", ".hdf5")):
        obj = _call_factory(spec, seed)
        from torch.utils.data import DataLoader

        if isinstance(obj, DataLoader):
            _check_ordered_loader(obj, spec)
        stream = _reading(spec, lambda: stream_from_object(obj, spec, max_samples), seed)
        if stream is not None:
            return stream
        inputs, targets = _reading(spec, lambda: _materialise(obj, spec, max_samples), seed)
        return _finish_data(inputs, targets, spec, max_samples)
    return load_data(spec, max_samples=max_samples, seed=seed)


def _check_max_samples(max_samples: int | None) -> None:
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise InputError(f"max_samples must be a positive integer, got {max_samples!r}")


def _load_data_file(path: str, max_samples: int | None) -> tuple[Any, Any]:
    sniffed = _sniff(path)
    kind = sniffed.kind
    if kind in ("torch-save", "legacy-pickle"):
        try:
            obj = _torch_load_safe(path, path)
        except pickle.UnpicklingError as err:
            raise InputError(
                f"{path} holds pickled Python objects ({_unpickling_global(err)}); a data file "
                'must hold plain tensors: torch.save({"inputs": X, "targets": Y}, path)'
            ) from err
        if isinstance(obj, Mapping) and obj.get("format") == BUNDLE_FORMAT:
            _check_bundle(obj, path)
        return _pair_from_mapping(obj, path, "a torch.save file")
    if kind == "npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.files)
                if "inputs" not in keys or "targets" not in keys:
                    raise InputError(
                        f"{path} is an .npz with arrays {keys}; it needs arrays named inputs "
                        "and targets: numpy.savez(path, inputs=X, targets=Y)"
                    )
                return archive["inputs"], archive["targets"]
        except InputError:
            raise
        except Exception as err:  # object arrays (ValueError), damaged members, ...
            raise InputError(f"{path}: cannot read the .npz ({_one_line(err)})") from err
    if kind == "hdf5":
        return _load_hdf5(path, max_samples)
    if kind == "npy":
        raise InputError(
            f"{path} is a single .npy array; data needs inputs and targets: "
            "numpy.savez(path, inputs=X, targets=Y)"
        )
    if kind in ("pt2", "torchscript", "aoti"):
        raise InputError(
            f"{path} is {_KIND_WORDS[kind]}, a model, not data: pass it as MODEL and the data "
            "with --data"
        )
    raise InputError(_not_readable(path, sniffed, "data"))


def _pair_from_mapping(obj: Any, source: str, found: str) -> tuple[Any, Any]:
    if isinstance(obj, Mapping) and "inputs" in obj and "targets" in obj:
        return obj["inputs"], obj["targets"]
    raise InputError(
        f"{source} is {found} holding {_describe(obj)}; data needs keys inputs and targets: "
        'torch.save({"inputs": X, "targets": Y}, path)'
    )


def _load_hdf5(path: str, max_samples: int | None) -> tuple[Any, Any]:
    import h5py  # type: ignore[import-untyped]

    try:
        with h5py.File(path, "r") as handle:
            arrays = []
            for key in ("inputs", "targets"):
                item = handle.get(key)
                if not isinstance(item, h5py.Dataset):
                    found = ", ".join(sorted(handle.keys())[:8]) or "nothing"
                    raise InputError(
                        f"{path} is an HDF5 file without a dataset named {key} at its root "
                        f"(found: {found}); store datasets inputs and targets"
                    )
                if item.ndim == 0:
                    arrays.append(item[()])
                else:
                    arrays.append(item[:max_samples] if max_samples is not None else item[()])
            return arrays[0], arrays[1]
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{path}: cannot read the HDF5 file ({_one_line(err)})") from err


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch, numpy and random; restore their global states afterwards."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _call_factory(spec: str, seed: int) -> Any:
    """The object ``module:factory`` names, called (seeded) when it is a function."""
    obj = import_object(spec)
    if callable(obj) and not isinstance(obj, torch.utils.data.Dataset):
        with _seeded(seed):
            try:
                obj = obj()
            except InputError:
                raise
            except Exception as err:
                raise InputError(
                    f"data factory {spec} raised {type(err).__name__}: {_one_line(err)}"
                ) from err
    return obj


def _reading(spec: str, fn: Callable[[], _T], seed: int) -> _T:
    """``fn()`` seeded, with a failure while reading the user's data reported as bad input."""
    with _seeded(seed):
        try:
            return fn()
        except InputError:
            raise
        except Exception as err:
            raise InputError(
                f"{spec}: reading the data failed with {type(err).__name__}: {_one_line(err)}"
            ) from err


def _load_data_factory(spec: str, max_samples: int | None, seed: int) -> tuple[Any, Any]:
    obj = _call_factory(spec, seed)
    return _reading(spec, lambda: _materialise(obj, spec, max_samples), seed)


def _check_ordered_loader(loader: Any, spec: str) -> None:
    from torch.utils.data import RandomSampler

    if isinstance(loader.sampler, RandomSampler) or loader.drop_last:
        why = "shuffles" if isinstance(loader.sampler, RandomSampler) else "drops its last batch"
        raise InputError(
            f"{spec}: the DataLoader {why}, so the data would change between runs; return "
            "it with shuffle=False and drop_last=False, or return the Dataset"
        )


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor | np.ndarray)


def _materialise(obj: Any, spec: str, max_samples: int | None) -> tuple[Any, Any]:
    from torch.utils.data import DataLoader, Dataset

    if isinstance(obj, tuple | list) and len(obj) == 2 and all(_is_array(v) for v in obj):
        return obj[0], obj[1]
    if isinstance(obj, Mapping):
        return _pair_from_mapping(obj, spec, "a factory result")
    if isinstance(obj, DataLoader):
        _check_ordered_loader(obj, spec)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        count = 0
        for index, batch in enumerate(obj):
            x, y = _pair(batch, spec, f"batch {index}")
            xs.append(torch.as_tensor(x))
            ys.append(torch.as_tensor(y))
            count += xs[-1].shape[0] if xs[-1].ndim else 1
            if max_samples is not None and count >= max_samples:
                break
        if not xs:
            raise InputError(f"{spec}: the DataLoader yielded no batches")
        return _cat(xs, spec, "inputs"), _cat(ys, spec, "targets")
    duck_dataset = hasattr(obj, "__len__") and hasattr(obj, "__getitem__")
    if isinstance(obj, Dataset) or (
        duck_dataset and not isinstance(obj, str | bytes | torch.Tensor | np.ndarray)
    ):
        if not hasattr(obj, "__len__"):
            raise InputError(
                f"{spec} returned an iterable dataset without a length; wrap it in a DataLoader "
                "(shuffle=False) or return tensors"
            )
        size = len(obj)  # type: ignore[arg-type]
        if size == 0:
            raise InputError(f"{spec}: the dataset is empty (n = 0)")
        count = size if max_samples is None else min(size, max_samples)
        pairs = [_pair(obj[i], spec, f"item {i}") for i in range(count)]
        return (
            _stack([p[0] for p in pairs], spec, "inputs"),
            _stack([p[1] for p in pairs], spec, "targets"),
        )
    raise InputError(
        f"{spec} returned {_describe(obj)}; expected (inputs, targets) tensors, a Dataset of "
        "(x, y) pairs, or a DataLoader"
    )


def _pair(item: Any, spec: str, where: str) -> tuple[Any, Any]:
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1]
    raise InputError(f"{spec}: {where} is {_describe(item)}, not an (x, y) pair")


def _stack(values: list[Any], spec: str, name: str) -> torch.Tensor:
    try:
        return torch.stack([torch.as_tensor(v) for v in values])
    except Exception as err:
        raise InputError(f"{spec}: cannot stack the {name} ({_one_line(err)})") from err


def _cat(values: list[torch.Tensor], spec: str, name: str) -> torch.Tensor:
    try:
        return torch.cat([v if v.ndim else v.reshape(1) for v in values])
    except Exception as err:
        raise InputError(
            f"{spec}: cannot concatenate the {name} batches ({_one_line(err)})"
        ) from err


def _as_tensor(value: Any, source: str, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous()
    array = np.asarray(value)
    if array.dtype.kind not in "biufc":
        raise InputError(
            f"{source}: {name} has NumPy dtype {array.dtype}, not numbers; store numeric arrays"
        )
    try:
        return torch.from_numpy(np.array(array, copy=True, order="C"))
    except TypeError as err:  # dtypes torch lacks, e.g. uint32 on older torch
        raise InputError(f"{source}: {name} has unsupported dtype {array.dtype}") from err


def _finish_data(inputs: Any, targets: Any, source: str, max_samples: int | None) -> LoadedData:
    x = _as_tensor(inputs, source, "inputs")
    y = _as_tensor(targets, source, "targets")
    for name, tensor in (("inputs", x), ("targets", y)):
        if tensor.ndim == 0:
            raise InputError(
                f"{source}: {name} is a scalar; it needs a first dimension of n examples"
            )
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"{source}: inputs have {x.shape[0]} examples but targets have {y.shape[0]}; "
            "both need the same first dimension n"
        )
    if x.shape[0] == 0:
        raise InputError(f"{source}: the data has no examples (n = 0)")
    if max_samples is not None and max_samples < x.shape[0]:
        x, y = x[:max_samples].clone(), y[:max_samples].clone()
    _check_finite(x, y, source)
    return LoadedData(x, y, source, _data_sha256(x, y))


def _check_finite(inputs: torch.Tensor, targets: torch.Tensor, source: str) -> None:
    problems = []
    for name, tensor in (("inputs", inputs), ("targets", targets)):
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                problems.append(f"{bad} in {name}")
    if problems:
        raise InputError(
            f"{source}: data contains non-finite values (NaN or inf): {' and '.join(problems)}; "
            "clean them"
        )


def _data_sha256(inputs: torch.Tensor, targets: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for name, tensor in (("inputs", inputs), ("targets", targets)):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Bundles


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


def _bundle_model(obj: Mapping[str, Any], source: str) -> LoadedModel:
    _check_bundle(obj, source)
    raw = obj["model"].contiguous().numpy().tobytes()
    try:
        program = torch.export.load(io.BytesIO(raw))
    except Exception as err:
        raise InputError(
            f"{source}: the model inside the bundle could not be loaded by torch.export.load "
            f"({_one_line(err)}); rewrite the bundle with this torch version"
        ) from err
    module, fixed = _prepare_exported(program, source)
    return LoadedModel(module, "bundle", fixed, source, hashlib.sha256(raw).hexdigest())


def load_bundle(path: str) -> Bundle:
    """Load a bundle (see the module docstring); needs no trust flag, runs no code from it.

    Raises:
        InputError: the file is missing, not a bundle (the error names what it is), corrupt,
            or of a newer version.
    """
    model, raw = _load_model_file(path, arch=None, trust_pickle=False)
    if raw is None:
        raise InputError(
            f"{path} is not a basins bundle (it is a {model.kind} model); pass the data with "
            "--data, or write a bundle with save_bundle"
        )
    return _bundle_from_raw(model, raw, path, None)


def _bundle_from_raw(
    model: LoadedModel, raw: Mapping[str, Any], path: str, max_samples: int | None
) -> Bundle:
    data = _finish_data(raw["inputs"], raw["targets"], path, max_samples)
    return Bundle(model, data, raw.get("loss"), dict(raw.get("meta") or {}))


def _plain_meta(key: Any, value: Any) -> Any:
    """``value`` as a plain ``str``/``int``/``float``/``bool``/``None``/list, for weights_only.

    Subclasses such as ``torch.__version__`` (a ``TorchVersion``) or NumPy scalars would be
    pickled as globals that ``torch.load(weights_only=True)`` refuses.
    """
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain_meta(key, v) for v in value]
    raise InputError(
        f"bundle meta {key!r}: {type(value).__name__} is not allowed; use str, int, float, "
        "bool, None or lists of these"
    )


def save_bundle(
    path: str | os.PathLike[str],
    module_or_exported: torch.nn.Module | torch.export.ExportedProgram,
    inputs: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    loss: str | None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a bundle (format in the module docstring) atomically.

    An ``nn.Module`` is exported in eval mode with a dynamic batch dimension, using the first
    two inputs as the example batch (its train/eval mode is restored afterwards). The file is
    built in memory, written beside ``path`` and moved into place with ``os.replace``, so an
    interrupted write leaves any previous file intact. The bytes depend only on the content
    (``torch.save`` to a buffer names its records ``archive/``), so equal content gives
    byte-identical files.

    Args:
        path: Where to write (conventionally ``.pt``).
        module_or_exported: The model, or an ``ExportedProgram`` taking one batch tensor.
        inputs: ``(n, ...)``; stored as given (a copy of exactly these elements).
        targets: ``(n, ...)``.
        loss: Loss name (``mse``, ``cross-entropy``, ``nll``, ``bce``, ``module:function``)
            or ``None`` to let readers infer it from the targets.
        meta: Provenance, ``str`` keys to ``str``/``int``/``float``/``bool``/``None`` or lists
            of those.

    Raises:
        InputError: inconsistent data, a bad ``meta``, a model that cannot be exported with a
            dynamic batch dimension, or a path that cannot be written.
    """
    target = os.fspath(path)
    data = _finish_data(inputs, targets, target, None)
    if loss is not None and not isinstance(loss, str):
        raise InputError(f"loss must be a string or None, got {type(loss).__name__}")
    plain_meta = {}
    for key, value in (meta or {}).items():
        if not isinstance(key, str):
            raise InputError(f"bundle meta keys must be strings, got {key!r}")
        plain_meta[str(key)] = _plain_meta(key, value)
    program = _export(module_or_exported, data.inputs)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    payload = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "model": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8),
        "inputs": data.inputs.clone(),
        "targets": data.targets.clone(),
        "loss": loss,
        "meta": plain_meta,
    }
    out = io.BytesIO()
    torch.save(payload, out)
    _write_atomic(target, out.getvalue())


def _export(
    module_or_exported: torch.nn.Module | torch.export.ExportedProgram, inputs: torch.Tensor
) -> torch.export.ExportedProgram:
    if isinstance(module_or_exported, torch.export.ExportedProgram):
        return module_or_exported
    if not isinstance(module_or_exported, torch.nn.Module):
        raise InputError(
            f"save_bundle needs an nn.Module or an ExportedProgram, got "
            f"{type(module_or_exported).__name__}"
        )
    module = module_or_exported
    example = inputs[:2] if inputs.shape[0] >= 2 else torch.cat([inputs[:1], inputs[:1]])
    was_training = module.training
    module.eval()
    try:
        return torch.export.export(
            module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)
        )
    except Exception as err:
        raise InputError(
            f"could not export the model with a dynamic batch dimension ({type(err).__name__}: "
            f"{_one_line(err)}); export it yourself and pass the ExportedProgram"
        ) from err
    finally:
        module.train(was_training)


def _write_atomic(path: str, payload: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        handle, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
        )
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise InputError(f"cannot write {path}: {err.strerror or err}") from err
        raise


# --------------------------------------------------------------------------------------------
# Resolution of command-line inputs


def resolve_inputs(
    model: str,
    *,
    data: str | None = None,
    loss: str | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    max_samples: int | None = None,
    seed: int = 0,
    stream: bool = False,
) -> tuple[LoadedModel, LoadedData | StreamSpec, str | None]:
    """The model, data and loss a command runs on.

    A bundle supplies all three; an explicit ``data`` or ``loss`` replaces what it carries.
    Any other model file needs ``data``. The loss is returned as given (``None``: none given,
    the caller infers it from the targets). With ``stream``, ``data`` is opened by
    :func:`open_data` (a Dataset, DataLoader or HDF5 file is not read yet); otherwise the
    data come back loaded (:class:`LoadedData`).

    Raises:
        InputError: as :func:`load_model` and :func:`load_data`, or ``data`` missing for a
            model that is not a bundle.
    """
    loaded, raw = _load_model_file(model, arch=arch, trust_pickle=trust_pickle)
    if raw is not None:
        bundle_loss = raw.get("loss")
        loaded_data: LoadedData | StreamSpec
        if data is not None:
            loaded_data = (open_data if stream else load_data)(data, max_samples=max_samples, seed=seed)
        else:
            loaded_data = _finish_data(raw["inputs"], raw["targets"], model, max_samples)
        return loaded, loaded_data, loss if loss is not None else bundle_loss
    if data is None:
        found = {
            "export": "a .pt2 export",
            "state_dict": "a state dict",
            "pickle": "a pickled module",
        }.get(loaded.kind, loaded.kind)
        raise InputError(
            f"{model} is {found}, which holds no data: pass the data with --data (a .pt, .npz "
            "or .h5 file with inputs and targets, or module:function); only a bundle written by "
            "basins example or save_bundle carries its own"
        )
    return loaded, (open_data if stream else load_data)(data, max_samples=max_samples, seed=seed), loss


# --------------------------------------------------------------------------------------------
# module:attribute specs


def import_object(spec: str) -> Any:
    """Resolve ``"module:attr"`` (``attr`` may be dotted) to the object it names.

    ``module`` is an importable module (``mypkg.models``) or a path to a Python file
    (``path/to/models.py``). An importable name that is not found is retried with the current
    directory on ``sys.path`` (the ``basins`` console script does not put it there); a file is
    executed as a module named ``basins_user_<stem>`` with its folder on ``sys.path`` while it
    runs. Importing runs the module's code, as ``python -c "import module"`` would.

    Raises:
        InputError: the spec is malformed, or the module or attribute cannot be found or
            imported (the message carries the underlying error).
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise InputError(
            f"{spec!r} is not of the form module:attribute (e.g. mypkg.models:make_model or "
            "path/to/models.py:make_model)"
        )
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        module = _import_file(module_name, spec)
    else:
        module = _import_module(module_name, spec)
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InputError(
                f"{spec}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    return obj


def _import_module(name: str, spec: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        cwd = os.getcwd()
        if (name == missing or name.startswith(missing + ".")) and cwd not in sys.path:
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError:
                pass
            except Exception as inner:
                raise _import_error(spec, name, inner) from inner
        raise InputError(
            f"{spec}: cannot import module {name!r} ({_one_line(err)}); it must be importable "
            "(installed, on PYTHONPATH, or in the current directory) or be a path to a .py file"
        ) from err
    except Exception as err:
        raise _import_error(spec, name, err) from err


def _import_error(spec: str, name: str, err: BaseException) -> InputError:
    return InputError(f"{spec}: importing {name!r} raised {type(err).__name__}: {_one_line(err)}")


def _import_file(filename: str, spec: str) -> types.ModuleType:
    file = Path(filename)
    if not file.is_file():
        raise InputError(f"{spec}: Python file not found: {filename}")
    resolved = file.resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"basins_user_{stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"{spec}: cannot import {filename} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise _import_error(spec, filename, err) from err
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)
    return module
