"""Streams: data sources that read their examples from a Dataset, a DataLoader or an HDF5 file on every pass.

The :class:`~basins.engine.data.DataSource` contract, the validation and the fingerprints are in
:mod:`basins.engine.data`; this module adapts the ways users hold data that does not fit in one
process (see that module's docstring): :class:`DatasetStream`, :class:`IterableStream`,
:class:`HDF5Stream`, and :class:`StreamSpec`, which opens one process' shard of any of them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from basins.engine.batch import (
    NAMED_INPUTS,
    TARGET_KEYS,
    Inputs,
    cat,
    has_named_inputs,
    rows,
    split_named,
    take,
)
from basins.engine.data import (
    DEFAULT_STREAM_BATCH,
    Batch,
    DataSource,
    _check_examples,
    as_inputs,
    as_tensor,
    check_pair,
    data_fingerprint,
)
from basins.errors import InputError

__all__ = [
    "DatasetStream",
    "IterableStream",
    "HDF5Stream",
    "StreamSpec",
    "stream_from_object",
    "check_ordered_loader",
    "hdf5_stream",
    "as_pair",
]


class DatasetStream(DataSource):
    """A map-style ``Dataset``'s examples ``indices[start:stop]``, read through a ``DataLoader``.

    Args:
        dataset: indexable, ``dataset[i]`` is an ``(x, y)`` pair.
        indices: the global example order (e.g. ``range(len(dataset))`` or a loader's sampler order).
        start, stop: this source's part of that order.
        loader_options: ``DataLoader`` keywords kept from the user's loader (``collate_fn``,
            ``num_workers``, ``pin_memory``, ``worker_init_fn``, ...).
        default_batch_size: the user's loader's batch size; chunks are at least 256 examples
            unless a batch size is asked for.
    """

    def __init__(
        self,
        dataset: Any,
        indices: Sequence[int],
        start: int = 0,
        stop: int | None = None,
        *,
        loader_options: dict[str, Any] | None = None,
        default_batch_size: int | None = None,
        source: str = "dataset",
    ) -> None:
        super().__init__()
        stop = len(indices) if stop is None else stop
        if not 0 <= start <= stop <= len(indices):
            raise ValueError(f"bad range [{start}, {stop}) of {len(indices)} examples")
        self.dataset = dataset
        self.indices = indices
        self.first_index, self.num_examples = start, stop - start
        self._stop = stop
        self.loader_options = dict(loader_options or {})
        self._loaders: dict[int, Any] = {}
        self.default_batch_size = max(default_batch_size or 1, DEFAULT_STREAM_BATCH)
        self.source = source

    def head(self, k: int) -> Batch:
        """The first examples: read in this process, or by a short-lived loader with the user's
        worker settings (``worker_init_fn`` runs) when there are workers."""
        from torch.utils.data import DataLoader, default_collate

        k = min(k, self.num_examples)
        keys = _as_int_list(self.indices[self.first_index : self.first_index + k])
        if self.loader_options.get("num_workers"):
            options = {**self.loader_options, "persistent_workers": False}
            options.pop("prefetch_factor", None)
            batch = next(iter(DataLoader(self.dataset, batch_size=k, sampler=keys, **options)))
        else:
            batch = (self.loader_options.get("collate_fn") or default_collate)([self.dataset[i] for i in keys])
        x, y = as_pair(batch, self.source, "the batch of the first examples")
        return as_inputs(x, self.source), as_tensor(y, self.source, "targets")

    def _raw_batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]:
        from torch.utils.data import DataLoader

        loader = self._loaders.get(batch_size)
        if loader is None:  # one per batch size, reused: persistent workers stay up between passes
            # the user's dataset itself (workers' get_worker_info().dataset), read in this shard's order
            keys = _as_int_list(self.indices[self.first_index : self._stop])
            loader = DataLoader(self.dataset, batch_size=batch_size, sampler=keys, drop_last=False,
                                **self.loader_options)
            self._loaders[batch_size] = loader
        for number, batch in enumerate(loader):
            yield as_pair(batch, self.source, f"batch {number}")


class IterableStream(DataSource):
    """Examples ``[start, stop)`` of anything iterable that yields ``(x, y)`` batches, e.g. a
    ``DataLoader`` over an ``IterableDataset`` or one with its own ``__iter__``.

    Every pass iterates the whole loader and keeps this process' examples, re-batched to the
    asked size: memory is one batch, reading time is the whole stream's on every process.
    A loader with ``batch_size=None`` may yield single examples or whole batches
    (:func:`_looks_batched` tells them apart).
    """

    def __init__(self, loader: Any, start: int, stop: int, *, source: str = "loader", total: int | None = None) -> None:
        super().__init__()
        self.loader = loader
        self.first_index, self.num_examples, self._stop = start, stop - start, stop
        #: the stream's length at load; the last shard reads to the end and refuses a longer stream
        self.total = total
        self.default_batch_size = max(_loader_batch_size(loader) or 1, DEFAULT_STREAM_BATCH)
        self.source = source

    def _raw_batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]:
        xs: list[Inputs] = []
        ys: list[torch.Tensor] = []
        have = position = 0
        for number, item in enumerate(self.loader):
            x, y = loader_batch(self.loader, item, self.source, number)
            m = rows(x)
            a, b = max(self.first_index - position, 0), min(self._stop - position, m)
            position += m
            if a < b:
                xs.append(take(x, a, b))
                ys.append(y[a:b])
                have += b - a
            while have >= batch_size:
                X, Y = cat(xs), torch.cat(ys)
                yield take(X, 0, batch_size), Y[:batch_size]
                xs, ys, have = [take(X, batch_size, rows(X))], [Y[batch_size:]], have - batch_size
            if position >= self._stop and self._stop != self.total:
                break
        if have:
            yield cat(xs), torch.cat(ys)
        if self.total is not None and self._stop == self.total and position > self.total:
            raise InputError(
                f"{self.source}: a pass yielded {position} examples instead of {self.total}; "
                "the data changed between passes"
            )


def _auto_batching(loader: Any) -> bool:
    """Whether a loader collates examples into batches itself (it has a batch sampler)."""
    return getattr(loader, "batch_sampler", True) is not None


def _loader_batch_size(loader: Any) -> int | None:
    """The examples per batch a loader makes (its own, or its batch sampler's), if it says."""
    size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return size if isinstance(size, int) else None


def loader_batch(loader: Any, item: Any, source: str, number: int) -> Batch:
    """Item ``number`` that ``loader`` yielded, as ``(x, y)`` tensors with a leading example dimension.

    With automatic batching off (``batch_size=None``) an item is a batch when
    :func:`_looks_batched` says so, else one example.
    """
    x, y = as_pair(item, source, f"batch {number}")
    x, y = as_inputs(x, source), as_tensor(y, source, "targets")
    if not _auto_batching(loader) and not _looks_batched(x, y):
        # automatic batching off, and this item is one example
        x = {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
        y = y.unsqueeze(0)
    return x, y


def _looks_batched(x: Inputs, y: torch.Tensor) -> bool:
    """Whether an item a loader yields with automatic batching off is a batch: inputs of at least
    2 dimensions whose first matches the targets' (``(B, ...)`` and ``(B, ...)``); anything else
    (``(T,)`` tokens with ``(T,)`` labels, an image with a scalar label) is one example. Named
    inputs count as a batch when ``input_ids`` (or the first input) has 2 dimensions or more."""
    first = (x.get("input_ids", next(iter(x.values()))) if isinstance(x, dict) else x)
    return first.dim() >= 2 and y.dim() >= 1 and first.shape[0] == y.shape[0]


class HDF5Stream(DataSource):
    """Rows ``[start, stop)`` of the ``inputs`` and ``targets`` datasets of an HDF5 file, a slice per batch."""

    def __init__(self, path: str, start: int, stop: int, *, default_batch_size: int | None = None) -> None:
        super().__init__()
        self.path = path
        self.first_index, self.num_examples, self._stop = start, stop - start, stop
        self.default_batch_size = default_batch_size or DEFAULT_STREAM_BATCH
        self.source = path

    def _raw_batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]:
        import h5py  # type: ignore[import-untyped]

        with h5py.File(self.path, "r") as handle:
            if "inputs" in handle:
                xs, ys = handle["inputs"], handle["targets"]
                for a in range(self.first_index, self._stop, batch_size):
                    b = min(a + batch_size, self._stop)
                    yield xs[a:b], ys[a:b]
                return
            names = [k for k in handle.keys() if isinstance(handle[k], h5py.Dataset)]  # named inputs
            for a in range(self.first_index, self._stop, batch_size):
                b = min(a + batch_size, self._stop)
                yield split_named({k: handle[k][a:b] for k in names}, self.path)


def as_pair(item: Any, source: str, where: str) -> tuple[Any, Any]:
    """``(x, y)`` from a pair (tuple or list of two) or a mapping with keys ``inputs`` and ``targets``.

    Raises:
        InputError: anything else, naming ``where`` it was found and what it is.
    """
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, Mapping) and "inputs" in item and "targets" in item:
        return item["inputs"], item["targets"]
    if has_named_inputs(item):  # {"input_ids": ..., "attention_mask": ..., "labels": ...}
        return split_named(item, source)
    if isinstance(item, tuple | list):
        found = f"a {type(item).__name__} of {len(item)} items"
    elif isinstance(item, Mapping):
        found = (f"a dict with keys {', '.join(map(str, list(item)[:6]))} (expected keys inputs and targets, "
                 f"or named inputs such as {', '.join(NAMED_INPUTS[:2])} with {' or '.join(TARGET_KEYS)})")
    else:
        found = f"a {type(item).__name__}"
    raise InputError(f"{source}: {where} is {found}, not an (x, y) pair")


@dataclass
class StreamSpec:
    """A dataset too big to load at once: its size and how to open any contiguous part of it.

    Attributes:
        num_examples: n, the global number of examples (after ``max_samples``).
        source: the spec it came from.
        open: ``open(start, stop)`` → a :class:`DataSource` over examples ``[start, stop)``.
    """

    num_examples: int
    source: str
    open: Callable[[int, int], DataSource]

    def identity(self) -> str:
        """``n`` and the fingerprint of the first (up to 8) examples: processes that opened the same
        data agree on it (a loader that splits the data by rank makes them disagree)."""
        k = min(8, self.num_examples)
        x, y = self.open(0, k).head(k)
        return f"{self.num_examples}:{data_fingerprint(x, y)}"

    def shard(self, world_size: int = 1, rank: int = 0) -> DataSource:
        """This process' contiguous shard (:func:`basins.engine.distributed.shard_range`; all of it for one process)."""
        from basins.engine.distributed import shard_range

        return self.open(*shard_range(self.num_examples, world_size, rank))


# ---------------------------------------------------------------------- opening user objects
#: ``DataLoader`` settings carried over to the loader a :class:`DatasetStream` builds.
_LOADER_OPTIONS = ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                   "generator", "prefetch_factor", "persistent_workers", "in_order")


def stream_from_object(obj: Any, source: str, max_samples: int | None = None) -> StreamSpec | None:
    """A :class:`StreamSpec` for a map-style ``Dataset`` or an ordered ``DataLoader``; None for anything else.

    A plain ``DataLoader`` over a map-style dataset is read by index: its sampler's (or batch
    sampler's) order, counted once here, its batch size (chunks are at least 256 examples
    unless ``batch_size`` says otherwise), collate function and worker settings are kept,
    and each process reads only its indices. Any other loader (over an ``IterableDataset``, a
    ``DataLoader`` subclass, a sampler of non-integer keys) is iterated as it is, once here to
    count its examples and once per pass. ``max_samples`` keeps the first examples in that order.

    Raises:
        InputError: a loader that shuffles (a random sampler, or an order that changes from
            one iteration to the next) or drops its last batch, an empty dataset or loader.
    """
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    cap = (lambda n: n) if max_samples is None else (lambda n: min(n, max_samples))
    if isinstance(obj, DataLoader):
        check_ordered_loader(obj, source)
        indices = None if (type(obj) is not DataLoader or isinstance(obj.dataset, IterableDataset)) \
            else _loader_indices(obj, source)
        if indices is not None and len(indices) and not _auto_batching(obj):
            first = loader_batch(obj, obj.collate_fn(obj.dataset[int(indices[0])]), source, 0)
            if rows(first[0]) > 1:  # the dataset's items are batches themselves: iterate the loader
                indices = None
        if indices is None:  # iterate the loader itself
            total = _count_examples(obj, source, None if max_samples is None else max_samples + 1)
            n = cap(total)
            return StreamSpec(n, source, lambda a, b: IterableStream(
                obj, a, b, source=source, total=total if n == total else None))
        options = {k: getattr(obj, k) for k in _LOADER_OPTIONS if hasattr(obj, k)}
        if not options.get("num_workers"):
            for k in ("prefetch_factor", "persistent_workers", "timeout", "worker_init_fn", "multiprocessing_context"):
                options.pop(k, None)
        # with automatic batching off the loader's collate_fn converts one example: apply it to each
        options["collate_fn"] = obj.collate_fn if _auto_batching(obj) else _PerExample(obj.collate_fn)
        indices = indices[: cap(len(indices))]
        if len(indices) == 0:
            raise InputError(f"{source}: the DataLoader yields no examples")
        dataset, batch, chosen = obj.dataset, _loader_batch_size(obj), indices
        return StreamSpec(len(chosen), source, lambda a, b: DatasetStream(
            dataset, chosen, a, b, loader_options=options, default_batch_size=batch, source=source))
    if isinstance(obj, Dataset) and not isinstance(obj, IterableDataset) and hasattr(obj, "__len__"):
        size = cap(len(obj))
        if size == 0:
            raise InputError(f"{source}: the dataset is empty (n = 0)")
        return StreamSpec(size, source, lambda a, b: DatasetStream(obj, range(size), a, b, source=source))
    return None


def check_ordered_loader(loader: Any, source: str) -> None:
    """Refuse a ``DataLoader`` whose examples would change from run to run (random sampling, ``drop_last``).

    Raises:
        InputError: naming what the loader does and what to return instead.
    """
    from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    if any(isinstance(s, RandomSampler | SubsetRandomSampler | WeightedRandomSampler) for s in samplers):
        raise InputError(
            f"{source}: the DataLoader shuffles (a random sampler), so the data would change between runs; "
            "return it with shuffle=False, or return the Dataset"
        )
    if loader.drop_last or getattr(loader.batch_sampler, "drop_last", False):
        raise InputError(
            f"{source}: the DataLoader drops its last batch, so examples would be left out of the "
            "full-data loss; return it with drop_last=False, or return the Dataset"
        )
    if type(loader.sampler).__name__ == "DistributedSampler" or \
            type(getattr(loader.batch_sampler, "sampler", None)).__name__ == "DistributedSampler":
        raise InputError(
            f"{source}: the DataLoader has a DistributedSampler, so each process would see another part "
            "of the data; return the whole dataset's loader: under torchrun basins gives each process its shard"
        )


def _loader_indices(loader: Any, source: str) -> Sequence[int] | None:
    """The dataset indices a plain ``DataLoader`` reads, in order (None: keys that are not integers).

    The order is enumerated twice and must agree (a sampler that draws at random is refused).
    """
    from torch.utils.data import BatchSampler, SequentialSampler

    bs = loader.batch_sampler
    if (type(bs) is BatchSampler and not bs.drop_last
            and type(bs.sampler) is SequentialSampler and bs.sampler.data_source is loader.dataset):
        return range(len(loader.dataset))  # the default: 0, 1, ..., n-1

    def enumerate_once() -> np.ndarray | None:
        keys = (i for batch in bs for i in batch) if _auto_batching(loader) else iter(loader.sampler)
        out = []
        for key in keys:
            if isinstance(key, bool) or not isinstance(key, numbers.Integral | np.integer | torch.Tensor) \
                    or (isinstance(key, torch.Tensor) and (key.dim() or key.is_floating_point())):
                return None
            out.append(int(key))
        return np.asarray(out, dtype=np.int64)

    first = enumerate_once()
    if first is None:
        return None
    again = enumerate_once()
    if again is None or not np.array_equal(first, again):
        raise InputError(f"{source}: the DataLoader's sampler gives a different order each time; use a fixed order")
    return first  # type: ignore[return-value]


def _as_int_list(indices: Sequence[int]) -> Sequence[int]:
    """Indices a ``Dataset`` accepts: a ``range`` as is, anything else as Python ints."""
    if isinstance(indices, range):
        return indices
    return [int(i) for i in indices]


class _PerExample:
    """``default_collate`` of ``fn`` applied to each example (a loader's collate_fn with batching off).

    A class, not a closure, so that it pickles for worker processes.
    """

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, items: list[Any]) -> Any:
        from torch.utils.data import default_collate

        return default_collate([self.fn(item) for item in items])


def _count_examples(loader: Any, source: str, max_samples: int | None) -> int:
    total = 0
    for number, item in enumerate(loader):
        x, _ = loader_batch(loader, item, source, number)
        total += rows(x)
        if max_samples is not None and total >= max_samples:
            break
    if total == 0:
        raise InputError(f"{source}: the DataLoader yielded no batches")
    return total


def hdf5_datasets(handle: Any, path: str) -> tuple[Any, Any]:
    """The root datasets ``inputs`` and ``targets`` of an open ``h5py.File``.

    Raises:
        InputError: one of them is missing (or not a dataset), naming what the file holds.
    """
    import h5py

    if "inputs" not in handle and any(isinstance(handle.get(k), h5py.Dataset) for k in NAMED_INPUTS):
        named = [handle[k] for k in handle.keys() if isinstance(handle[k], h5py.Dataset)]
        target = next((handle[k] for k in TARGET_KEYS if k in handle), None)
        return named[0], target if target is not None else named[0]
    found = []
    for key in ("inputs", "targets"):
        item = handle.get(key)
        if not isinstance(item, h5py.Dataset):
            names = ", ".join(sorted(handle.keys())[:8]) or "nothing"
            raise InputError(
                f"{path} is an HDF5 file without a dataset named {key} at its root "
                f"(found: {names}); store datasets inputs and targets (or named inputs such as input_ids "
                "and attention_mask, with labels)"
            )
        found.append(item)
    return found[0], found[1]


def hdf5_stream(path: str, max_samples: int | None = None) -> StreamSpec:
    """A :class:`StreamSpec` over the root datasets ``inputs`` and ``targets`` of an HDF5 file.

    Raises:
        InputError: a missing or scalar dataset, unequal first dimensions, no examples, or
            values that are not numbers.
    """
    import h5py

    with h5py.File(path, "r") as handle:
        shapes = []  # stand-ins of the datasets' shapes, for the checks every source shares
        for key, item in zip(("inputs", "targets"), hdf5_datasets(handle, path)):
            if item.dtype.kind not in "biuf":
                raise InputError(f"{path}: the {key} have dtype {item.dtype}, not numbers; store numeric arrays")
            shapes.append(torch.empty(()) if item.ndim == 0 else torch.empty(int(item.shape[0]), 0))
    check_pair(shapes[0], shapes[1], path)
    n = shapes[0].shape[0] if max_samples is None else min(shapes[0].shape[0], max_samples)
    _check_examples(n, path)
    return StreamSpec(n, path, lambda a, b: HDF5Stream(path, a, b))
