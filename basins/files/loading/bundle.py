"""Bundles: a model, its data and its loss in one ``weights_only``-loadable file (format in :mod:`basins.files.loading`)."""

from __future__ import annotations

import contextlib
import io
import numbers
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from basins.engine.batch import require_tensor
from basins.errors import InputError

from .data import LoadedData, _finish_data
from .describe import BUNDLE_FORMAT, BUNDLE_VERSION, one_line
from .models import LoadedModel, _load_model_file


@dataclass
class Bundle:
    """A model, its data and its loss, from one bundle file (see the module docstring)."""

    model: LoadedModel
    data: LoadedData
    loss: str | None
    meta: dict[str, Any] = field(default_factory=dict)



def load_bundle(path: str) -> Bundle:
    """Load a bundle (see the module docstring); needs no trust flag, runs no code from it.

    Raises:
        InputError: the file is missing, not a bundle (the error names what it is), corrupt,
            or of a newer version.
    """
    model, raw = _load_model_file(path, arch=None, trust_pickle=False)
    if raw is None:
        raise InputError(
            f"{path} is not a basins bundle (it is a {model.kind} model); pass the data separately, "
            "or write a bundle with save_bundle"
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
    program = _export(module_or_exported, require_tensor(data.inputs, "a bundle"))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    payload = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "model": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8),
        "inputs": require_tensor(data.inputs, "a bundle").clone(),
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
            f"{one_line(err)}); export it yourself and pass the ExportedProgram"
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

