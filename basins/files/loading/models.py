"""Load a model: sniff once, run the shared checks once, build with the one loader of its format, wrap.

See :mod:`basins.files.loading` for the formats. A load walks forward through four stages, each in
its own module, none entered twice:

1. **sniff** (:func:`.sniff.sniff`): what the path holds, from its content, as a format tag;
2. **check** (:func:`.checks.check`): refusals, trust, layout, weight-file headers, parameter
   names, stored dtypes and the hash, for every format alike;
3. **build**: the entry point :data:`LOADERS` gives for the tag, one module per kind of file;
4. **wrap** (here): the module's tensors checked (values, dense), narrow floating dtypes upcast to
   float32, and a :class:`LoadedModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

from basins.errors import InputError

from . import adapters, arch, exports, hf, pickled
from .checks import Checked, check
from .sniff import Sniffed, sniff

__all__ = ["LOADERS", "LoadedModel", "load_model"]

#: format tag -> the loader's entry point, ``build(sniffed, checked, *, arch, trust_pickle)`` returning
#: the module in eval mode, its static batch size (or None) and its attention path (or None)
LOADERS: dict[str, Callable[..., tuple[torch.nn.Module, int | None, str | None]]] = {
    "export": exports.build,  # a .pt2 file (torch.export.save)
    "bundle": exports.build,  # the .pt2 inside a bundle
    "state_dict": arch.build,  # a state dict, with arch
    "safetensors": arch.build,  # a .safetensors file of weights, with arch
    "hf": hf.build,  # a Hugging Face model directory
    "peft": adapters.build,  # a peft adapter directory on its base model's directory
    "pickle": pickled.build,  # a pickled nn.Module, with trust_pickle
}

#: the LoadedModel kind of each tag (a .safetensors file is weights for arch, like a state dict)
_KINDS = {"safetensors": "state_dict"}


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
            upcast to float32 (``"bfloat16"``, ``"float16"``, ...; :func:`upcast_half`);
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
    """The model (module docstring), and the raw bundle dict when the file is a bundle."""
    sniffed = sniff(path, base_model=base_model)
    checked = check(sniffed, arch=arch, trust_pickle=trust_pickle, base_model=base_model)
    module, fixed, attention = LOADERS[sniffed.tag](sniffed, checked, arch=arch, trust_pickle=trust_pickle)
    return _wrap(module, sniffed, checked, fixed, attention), dict(sniffed.content) if sniffed.tag == "bundle" else None


def _wrap(module: torch.nn.Module, sniffed: Sniffed, checked: Checked, fixed: int | None,
          attention: str | None) -> LoadedModel:
    """The :class:`LoadedModel`: tensors checked (:func:`check_module_tensors`), narrow dtypes upcast."""
    check_module_tensors(module, sniffed.path)
    stored = ", ".join(sorted(checked.stored_half | upcast_half(module))) or None
    base = sniffed.base.path if sniffed.base is not None else None
    return LoadedModel(module, _KINDS.get(sniffed.tag, sniffed.tag), fixed, sniffed.path, checked.sha256,
                       attention, stored, base)


def check_module_tensors(module: torch.nn.Module, source: str) -> None:
    """Every parameter and buffer of ``module`` holds values on a real device, in the dense layout.

    Raises:
        InputError: a tensor on the ``meta`` device (shapes without values) or sparse, naming it.
    """
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_meta:
            raise InputError(f"{source}: {name!r} is on the meta device (a shape without values); save the real weights")
        if tensor.layout != torch.strided:
            raise InputError(f"{source}: {name!r} is a {tensor.layout} tensor; basins reads dense weights only "
                             "(save tensor.to_dense())")


def upcast_half(module: torch.nn.Module) -> frozenset[str]:
    """Convert ``module``'s floating parameters and buffers narrower than float32 to float32, in place:
    Hessians, Lanczos and error bounds are not computed in 8-bit-mantissa arithmetic. Upcasting is
    exact; the analysis is of the same function at the stored weights, evaluated in float32.

    Returns:
        The dtypes that were converted (``{"bfloat16"}``), by torch name; empty when there were none.
        Cost: one copy of those tensors.
    """
    found = frozenset(str(t.dtype).replace("torch.", "")
                      for t in chain(module.parameters(), module.buffers()) if _narrow(t))
    if not found:
        return found
    module._apply(lambda t: t.float() if _narrow(t) else t)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "dtype"):  # transformers reads it for masks and new tensors
        try:
            config.dtype = torch.float32
        except Exception:  # noqa: BLE001 - a config that refuses the attribute keeps its own
            pass
    return found


def _narrow(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() < 4
