"""Load a model file: ``torch.export`` archive, state dict + ``--arch``, trusted pickle, or bundle.

See :mod:`basins.files.loading` for the formats. Exported programs are turned into inference mode
(batch-norm running statistics, dropout off) and their static batch size is detected.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from basins.errors import InputError

from .exports import _exported_module, _prepare_exported  # noqa: F401 (_prepare_exported: re-exported)
from .formats import (
    _EXPORT_HINT,
    _KIND_WORDS,
    BUNDLE_FORMAT,
    _check_bundle,
    _check_file,
    _describe,
    _file_sha256,
    _not_readable,
    _one_line,
    _sniff,
    _torch_load_safe,
    _unpickling_global,
)
from .hf import is_hf_directory, load_hf_directory, load_safetensors_state, load_state_tied
from .imports import import_object


@dataclass
class LoadedModel:
    """A model ready for ``torch.func.functional_call(module, (params, buffers), x)``.

    Attributes:
        module: The ``nn.Module``, in eval mode; for a ``.pt2`` a ``GraphModule`` equal to the
            ``ExportedProgram``'s ``.module()`` (:mod:`.export_reader`), rewritten to inference
            mode (its ``eval()`` is a no-op).
        kind: ``"export"``, ``"state_dict"``, ``"pickle"``, ``"bundle"`` or ``"hf"`` (a Hugging
            Face model directory, :mod:`basins.files.loading.hf`).
        fixed_batch_size: For an export whose batch dimension is static, that size (the module
            only accepts batches of exactly this many examples); otherwise ``None``.
        source: The path as given.
        sha256: Hex SHA-256 of the model file's bytes (of a bundle: of the embedded ``.pt2``; of
            a model directory: of config.json and the weight files).
        attention: for a Hugging Face directory, the attention implementation it was loaded with
            (``eager``); None otherwise.
    """

    module: torch.nn.Module
    kind: str
    fixed_batch_size: int | None
    source: str
    sha256: str
    attention: str | None = None



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
    if is_hf_directory(path):
        module, digest, attention = load_hf_directory(path, trust_pickle=trust_pickle)
        return LoadedModel(module, "hf", None, path, digest, attention), None
    _check_file(path, "model")
    sniffed = _sniff(path)
    kind = sniffed.kind
    if kind == "pt2":
        module, fixed = _exported_module(
            path, path, trust_pickle,
            f"{path} looks like a torch.export archive (.pt2) but torch.export.load failed",
            f"re-export it with this torch version ({torch.__version__})",
        )
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
    if kind == "safetensors":
        state = load_safetensors_state(path)
        if arch is None:
            raise InputError(
                f"{path} is a .safetensors file ({len(state)} tensors): it holds weights but not the "
                "architecture; pass --arch module:factory naming a function that builds the nn.Module, "
                "or pass the Hugging Face model directory it came from"
            )
        module = _build_module(arch)
        load_state_tied(module, state, path, arch)
        module.eval()
        return LoadedModel(module, "state_dict", None, path, _file_sha256(path)), None
    if kind in ("npz", "npy", "hdf5"):
        raise InputError(
            f"{path} is {_KIND_WORDS[kind]}, which is data, not a model: pass it with --data"
        )
    raise InputError(_not_readable(path, sniffed, "model"))



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
        return _bundle_model(obj, path, trust_pickle=trust_pickle), dict(obj)
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



def _bundle_model(obj: Mapping[str, Any], source: str, *, trust_pickle: bool = False) -> LoadedModel:
    _check_bundle(obj, source)
    raw = obj["model"].contiguous().numpy().tobytes()
    module, fixed = _exported_module(
        raw, f"{source} (the bundle's model)", trust_pickle,
        f"{source}: the model inside the bundle could not be loaded by torch.export.load",
        "rewrite the bundle with this torch version", name=source,
    )
    return LoadedModel(module, "bundle", fixed, source, hashlib.sha256(raw).hexdigest())
