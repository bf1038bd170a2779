"""Load data (``inputs``, ``targets``) from a file or a ``module:factory``, or open it as a stream.

This module opens files and objects; it validates nothing itself: tensors are checked once, by
:class:`basins.engine.data.TensorData` (which :class:`LoadedData` is), and streams batch by batch
by :mod:`basins.engine.data`. See :mod:`basins.files.loading` for the formats.
"""

from __future__ import annotations

import contextlib
import os
import random
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

from basins.engine.batch import has_named_inputs, split_named
from basins.engine.data import TensorData, as_tensor, data_fingerprint
from basins.engine.streams import StreamSpec, as_pair, hdf5_stream, stream_from_object
from basins.errors import InputError
from basins.files.bounds import check_allocation, check_zip_declared
from basins.files.hdf5 import open_contained

from .checks import check_bundle
from .describe import KIND_WORDS, describe, not_readable, one_line, unpickling_global
from .imports import import_object
from .sniff import Sniffed, sniff

_T = TypeVar("_T")



class LoadedData(TensorData):
    """A whole dataset in memory, on the CPU: a :class:`~basins.engine.data.TensorData` (validated
    there) with its fingerprint; pass it to :class:`~basins.Problem` as the data source.

    Attributes:
        inputs: Tensor ``(n, ...)``, dtype as stored; or a dict of named inputs (``input_ids``,
            ``attention_mask``, ``token_type_ids``, ``pixel_values``, ...), each ``(n, ...)``,
            passed to the model as keyword arguments.
        targets: Tensor ``(n, ...)``, dtype as stored (class labels integer, values float).
        source: The path or ``module:factory`` spec as given.
        sha256: Hex fingerprint of the content (after ``max_samples``): the sum over examples of
            the SHA-256 of each example's index, dtypes, shapes and bytes, mod 2²⁵⁶
            (:func:`basins.engine.data.data_fingerprint`), independent of the file format and
            equal to that of the same examples streamed.
    """

    def __init__(self, inputs: Any, targets: Any, source: str, *, max_samples: int | None = None) -> None:
        super().__init__(inputs, targets, source=source, max_samples=max_samples)
        x = self.inputs
        self.inputs = {k: v.cpu().contiguous() for k, v in x.items()} if isinstance(x, dict) else x.cpu().contiguous()
        self.targets = self.targets.cpu().contiguous()
        self.sha256 = data_fingerprint(self.inputs, self.targets)


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
        inputs, targets = _load_data_file(sniff(spec, what="data"), max_samples)
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
    HDF5 file, come back as a :class:`~basins.engine.streams.StreamSpec`: their size, and how to
    open any contiguous part of them as a stream (:mod:`basins.engine.data`). Everything else
    is loaded, as by :func:`load_data`.

    Raises:
        InputError: as :func:`load_data`.
    """
    _check_max_samples(max_samples)
    if os.path.exists(spec):
        sniffed = sniff(spec, what="data")
        if sniffed.tag == "hdf5":
            _check_hdf5(spec)
            return _reading(spec, lambda: hdf5_stream(spec, max_samples), seed)
        return _finish_data(*_load_data_file(sniffed, max_samples), spec, max_samples)
    if ":" in spec and not spec.lower().endswith((".pt", ".pth", ".npz", ".h5", ".hdf5")):
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



def _load_data_file(sniffed: Sniffed, max_samples: int | None) -> tuple[Any, Any]:
    """Inputs and targets from a sniffed data file (:func:`~.sniff.sniff`, which read a ``torch.save``
    file's content already)."""
    path, kind = sniffed.path, sniffed.tag
    if kind == "pickle":
        raise InputError(
            f"{path} holds pickled Python objects ({unpickling_global(sniffed.error or Exception())}); a data file "
            'must hold plain tensors: torch.save({"inputs": X, "targets": Y}, path)'
        )
    if kind in ("bundle", "torch-data", "state_dict", "torch-save"):
        if kind == "bundle":
            check_bundle(sniffed.content, path)
        return _pair_from_mapping(sniffed.content, path, "a torch.save file")
    if kind == "npz":
        _check_npz(path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.files)
                if has_named_inputs(dict.fromkeys(keys)):
                    return split_named({k: archive[k] for k in keys}, path)
                if "inputs" not in keys or "targets" not in keys:
                    raise InputError(
                        f"{path} is an .npz with arrays {keys}; it needs arrays named inputs "
                        "and targets: numpy.savez(path, inputs=X, targets=Y)"
                    )
                return archive["inputs"], archive["targets"]
        except InputError:
            raise
        except Exception as err:  # object arrays (ValueError), damaged members, ...
            raise InputError(f"{path}: cannot read the .npz ({one_line(err)})") from err
    if kind == "hdf5":
        return _load_hdf5(path, max_samples)
    if kind == "npy":
        raise InputError(
            f"{path} is a single .npy array; data needs inputs and targets: "
            "numpy.savez(path, inputs=X, targets=Y)"
        )
    if kind in ("export", "torchscript", "aoti", "safetensors"):
        raise InputError(f"{path} is {KIND_WORDS[kind]}, a model, not data: pass it as the model and a data file "
                         "as data", param="data")
    raise InputError(not_readable(path, kind, sniffed.detail, "data"), param="data")



def _pair_from_mapping(obj: Any, source: str, found: str) -> tuple[Any, Any]:
    if isinstance(obj, Mapping) and "inputs" in obj and "targets" in obj:
        return obj["inputs"], obj["targets"]
    if has_named_inputs(obj):
        return split_named(obj, source)
    raise InputError(
        f"{source} is {found} holding {describe(obj)}; data needs keys inputs and targets: "
        'torch.save({"inputs": X, "targets": Y}, path), or named inputs (input_ids, attention_mask, '
        "..., labels)"
    )



def _load_hdf5(path: str, max_samples: int | None) -> tuple[Any, Any]:
    """The whole (first ``max_samples``) rows, read as one stream batch (:func:`hdf5_stream`)."""
    _check_hdf5(path)
    try:
        spec = hdf5_stream(path, max_samples)
        return spec.open(0, spec.num_examples).head(spec.num_examples)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{path}: cannot read the HDF5 file ({one_line(err)})") from err



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
                    f"data factory {spec} raised {type(err).__name__}: {one_line(err)}"
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
                f"{spec}: reading the data failed with {type(err).__name__}: {one_line(err)}"
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
    if isinstance(obj, DataLoader):  # read as the stream it would be, start to end
        spec_ = stream_from_object(obj, spec, max_samples)
        assert spec_ is not None
        return spec_.open(0, spec_.num_examples).head(spec_.num_examples)
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
        pairs = [as_pair(obj[i], spec, f"item {i}") for i in range(count)]
        return (
            _stack([p[0] for p in pairs], spec, "inputs"),
            _stack([p[1] for p in pairs], spec, "targets"),
        )
    raise InputError(
        f"{spec} returned {describe(obj)}; expected (inputs, targets) tensors, a Dataset of "
        "(x, y) pairs, or a DataLoader"
    )



def _stack(values: list[Any], spec: str, name: str) -> Any:
    if values and isinstance(values[0], Mapping):  # named inputs: one stacked tensor per name
        return {k: _stack([v[k] for v in values], spec, f"{name} {k!r}") for k in values[0]}
    try:
        return torch.stack([as_tensor(v, spec, name) for v in values])
    except Exception as err:
        raise InputError(f"{spec}: cannot stack the {name} ({one_line(err)})") from err



def _finish_data(inputs: Any, targets: Any, source: str, max_samples: int | None) -> LoadedData:
    """The :class:`LoadedData` of what a file or factory gave (validated by :class:`TensorData`).

    Arrays in a non-native byte order (a big-endian ``.npz``) are converted; sparse, quantised,
    nested or ``meta`` tensors are refused (a dense CPU or GPU tensor is what basins computes on)."""
    if isinstance(inputs, Mapping):
        inputs = {k: _dense(v, source, f"inputs {k!r}") for k, v in inputs.items()}
    else:
        inputs = _dense(inputs, source, "inputs")
    return LoadedData(inputs, _dense(targets, source, "targets"), source, max_samples=max_samples)


def _dense(value: Any, source: str, name: str) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.byteorder not in ("=", "|", _NATIVE):
        return value.astype(value.dtype.newbyteorder("="))
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            raise InputError(f"{source}: the {name} are a {value.layout} tensor; store a dense tensor "
                             "(tensor.to_dense())")
        if value.device.type == "meta":
            raise InputError(f"{source}: the {name} are on the meta device, which holds no values; "
                             "save the tensor with its values")
    return value


_NATIVE = "<" if np.little_endian else ">"


def _check_hdf5(path: str) -> None:
    """Refuse an HDF5 data file that reads other files (links, virtual datasets, external storage)
    or declares far more than it stores (:func:`basins.files.hdf5.check_contained`)."""
    open_contained(path, path, whole=False).close()


def _check_npz(path: str) -> None:
    """Refuse an ``.npz`` whose members, or the arrays their headers declare, are bigger than the
    file can hold (a zip bomb, a fake size) or than the memory, before numpy allocates them."""
    try:
        with zipfile.ZipFile(path) as zf:
            total = 0
            for info in check_zip_declared(zf, os.path.getsize(path), path):
                with zf.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if nbytes > info.file_size:
                    raise InputError(f"{path}: array {info.filename[:-4]!r} declares shape {shape} "
                                     f"({nbytes:,} bytes) but its member holds {info.file_size:,} bytes")
                total += nbytes
            check_allocation(total, "its arrays", path)
    except InputError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: cannot read the .npz ({one_line(err)})") from None
