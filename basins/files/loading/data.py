"""Load data (``inputs``, ``targets``) from a file or a ``module:factory``, or open it as a stream.

See :mod:`basins.files.loading` for the formats and :mod:`basins.engine.data` for streams.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from basins.engine.data import (
    StreamSpec,
    check_ordered_loader,
    data_fingerprint,
    hdf5_datasets,
    hdf5_stream,
    loader_batch,
    stream_from_object,
)
from basins.errors import InputError

from .formats import (
    _KIND_WORDS,
    BUNDLE_FORMAT,
    _check_bundle,
    _check_file,
    _describe,
    _not_readable,
    _one_line,
    _sniff,
    _torch_load_safe,
    _unpickling_global,
)
from .imports import import_object

_T = TypeVar("_T")



@dataclass
class LoadedData:
    """A whole dataset in memory, on the CPU.

    Attributes:
        inputs: Tensor ``(n, ...)``, dtype as stored.
        targets: Tensor ``(n, ...)``, dtype as stored (class labels integer, values float).
        source: The path or ``module:factory`` spec as given.
        sha256: Hex fingerprint of the content (after ``max_samples``): the sum over examples of
            the SHA-256 of each example's index, dtypes, shapes and bytes, mod 2²⁵⁶
            (:func:`basins.engine.data.data_fingerprint`), independent of the file format and
            equal to that of the same examples streamed.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    source: str
    sha256: str



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
    HDF5 file, come back as a :class:`~basins.engine.data.StreamSpec`: their size, and how to
    open any contiguous part of them as a stream (:mod:`basins.engine.data`). Everything else
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
            for item in hdf5_datasets(handle, path):
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



def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor | np.ndarray)



def _materialise(obj: Any, spec: str, max_samples: int | None) -> tuple[Any, Any]:
    from torch.utils.data import DataLoader, Dataset

    if isinstance(obj, tuple | list) and len(obj) == 2 and all(_is_array(v) for v in obj):
        return obj[0], obj[1]
    if isinstance(obj, Mapping):
        return _pair_from_mapping(obj, spec, "a factory result")
    if isinstance(obj, DataLoader):
        check_ordered_loader(obj, spec)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        count = 0
        for index, batch in enumerate(obj):
            x, y = loader_batch(obj, batch, spec, index)
            xs.append(x)
            ys.append(y)
            count += x.shape[0]
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
    """The data fingerprint of :mod:`basins.engine.data` (Σᵢ sha256(i, xᵢ, yᵢ) mod 2²⁵⁶), so that the
    same examples give the same hash from a file, a factory or a stream, on any number of processes."""
    return data_fingerprint(inputs, targets)
