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

from .adapters import is_adapter_directory, load_adapter_directory
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
from .hf import is_hf_directory, load_hf_directory, load_state_tied
from .imports import import_object
from .weights import check_module_tensors, check_names, load_safetensors_state, upcast_half


@dataclass
class LoadedModel:
    """A model ready for ``torch.func.functional_call(module, (params, buffers), x)``.

    Attributes:
        module: The ``nn.Module``, in eval mode; for a ``.pt2`` a ``GraphModule`` equal to the
            ``ExportedProgram``'s ``.module()`` (:mod:`.export_reader`), rewritten to inference
            mode (its ``eval()`` is a no-op).
        kind: ``"export"``, ``"state_dict"``, ``"pickle"``, ``"bundle"``, ``"hf"`` (a Hugging
            Face model directory, :mod:`basins.files.loading.hf`) or ``"peft"`` (an adapter
            directory on its base model, :mod:`basins.files.loading.adapters`).
        fixed_batch_size: For an export whose batch dimension is static, that size (the module
            only accepts batches of exactly this many examples); otherwise ``None``.
        source: The path as given.
        sha256: Hex SHA-256 of the model file's bytes (of a bundle: of the embedded ``.pt2``; of
            a model directory: of config.json and the weight files).
        attention: for a Hugging Face directory, the attention implementation it was loaded with
            (``eager``); None otherwise.
        source_dtype: the floating dtypes narrower than float32 the file stored and that were
            upcast to float32 (``"bfloat16"``, ``"float16"``, ...; :func:`~.weights.upcast_half`);
            None when the weights were float32/float64.
        base_model: for a peft adapter, the base model's directory; None otherwise.
    """

    module: torch.nn.Module
    kind: str
    fixed_batch_size: int | None
    source: str
    sha256: str
    attention: str | None = None
    source_dtype: str | None = None
    base_model: str | None = None



def load_model(
    path: str, *, arch: str | None = None, trust_pickle: bool = False, base_model: str | None = None
) -> LoadedModel:
    """Load a model file (``.pt2``, state dict + ``arch``, trusted pickle, bundle) or directory
    (Hugging Face model, peft adapter). Weights stored in a floating dtype narrower than float32
    (bfloat16, float16) are upcast to float32 (``LoadedModel.source_dtype`` says from what).

    Args:
        path: The model file; its format is recognised from its content.
        arch: ``"module:factory"`` building the ``nn.Module`` for a state dict (the factory is
            called with no arguments; an ``nn.Module`` instance is used as is). Ignored for
            self-contained formats.
        trust_pickle: Allow loading a pickled ``nn.Module``, which runs code from the file.
        base_model: for a peft adapter directory, the base model's local directory (default: the
            one its ``adapter_config.json`` names).

    Returns:
        The :class:`LoadedModel`, in eval mode.

    Raises:
        InputError: missing file, directory, unknown or corrupt content, TorchScript, a pickle
            without ``trust_pickle``, a state dict without ``arch`` or that does not fit it, bad
            parameter names, tensors on the ``meta`` device or sparse.
    """
    model, _ = _load_model_file(path, arch=arch, trust_pickle=trust_pickle, base_model=base_model)
    return model



def _load_model_file(
    path: str, *, arch: str | None, trust_pickle: bool, base_model: str | None = None
) -> tuple[LoadedModel, dict[str, Any] | None]:
    """The model, upcast to float32 if stored narrower and checked (:func:`~.weights.check_module_tensors`),
    and the raw bundle dict when the file is a bundle."""
    if base_model is not None and not is_adapter_directory(path):
        raise InputError(f"--base-model is for a peft adapter directory (with adapter_config.json); {path} is not one")
    loaded, raw, stored = _read_model(path, arch=arch, trust_pickle=trust_pickle, base_model=base_model)
    check_module_tensors(loaded.module, path)
    upcast = upcast_half(loaded.module)
    loaded.source_dtype = ", ".join(sorted({h for s in (upcast, stored) if s for h in s.split(", ")})) or None
    return loaded, raw


def _read_model(
    path: str, *, arch: str | None, trust_pickle: bool, base_model: str | None
) -> tuple[LoadedModel, dict[str, Any] | None, str | None]:
    """The model as stored, the raw bundle dict of a bundle, and the narrow dtypes the file stores
    where the module may not show them (a state dict loaded into a float32 ``--arch``)."""
    if is_adapter_directory(path):
        adapter = load_adapter_directory(path, base_model=base_model, trust_pickle=trust_pickle)
        return LoadedModel(adapter.module, "peft", None, path, adapter.sha256, adapter.attention,
                           base_model=adapter.base), None, adapter.stored_half
    if is_hf_directory(path):
        hf = load_hf_directory(path, trust_pickle=trust_pickle)
        return LoadedModel(hf.module, "hf", None, path, hf.sha256, hf.attention), None, hf.stored_half
    _check_file(path, "model")
    sniffed = _sniff(path)
    kind = sniffed.kind
    if kind == "pt2":
        module, fixed = _exported_module(
            path, path, trust_pickle,
            f"{path} looks like a torch.export archive (.pt2) but torch.export.load failed",
            f"re-export it with this torch version ({torch.__version__})",
        )
        return LoadedModel(module, "export", fixed, path, _file_sha256(path)), None, None
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
        stored = _narrow_dtypes(state)
        if arch is None:
            raise InputError(
                f"{path} is a .safetensors file ({len(state)} tensors): it holds weights but not the "
                "architecture; pass --arch module:factory naming a function that builds the nn.Module, "
                "or pass the Hugging Face model directory it came from"
            )
        module = _build_module(arch)
        load_state_tied(module, state, path, arch)
        module.eval()
        return LoadedModel(module, "state_dict", None, path, _file_sha256(path)), None, stored
    if kind in ("npz", "npy", "hdf5"):
        raise InputError(
            f"{path} is {_KIND_WORDS[kind]}, which is data, not a model: pass it with --data"
        )
    raise InputError(_not_readable(path, sniffed, "model"))



def _narrow_dtypes(state: Mapping[str, torch.Tensor]) -> str | None:
    """The floating dtypes narrower than float32 among a state dict's tensors (None: none)."""
    found = sorted({str(t.dtype).replace("torch.", "") for t in state.values()
                    if t.is_floating_point() and t.element_size() < 4})
    return ", ".join(found) or None


def _load_torch_save_model(
    path: str, *, arch: str | None, trust_pickle: bool
) -> tuple[LoadedModel, dict[str, Any] | None, str | None]:
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
        return _load_trusted_pickle(path), None, None
    if isinstance(obj, Mapping) and obj.get("format") == BUNDLE_FORMAT:
        return _bundle_model(obj, path, trust_pickle=trust_pickle), dict(obj), None
    if isinstance(obj, Mapping) and "inputs" in obj and "targets" in obj:
        raise InputError(
            f"{path} is a data file (a dict with inputs and targets), not a model: "
            "pass it with --data"
        )
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _load_state_dict(path, obj, arch), None, _narrow_dtypes(obj)
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
    check_names(state, path)
    for name, tensor in state.items():
        if tensor.is_meta or tensor.layout != torch.strided:
            raise InputError(f"{path}: {name!r} is a {'meta' if tensor.is_meta else str(tensor.layout)} tensor; "
                             "a state dict must hold dense tensors with values")
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
