"""Where a :class:`~basins.Problem` reads its examples from: tensors in memory, or a stream.

A *data source* hands out its examples as consecutive ``(inputs, targets)`` batches, in the
same order on every pass. Two kinds:

* :class:`TensorData` — tensors already in memory (sliced, never copied);
* streams (:mod:`basins.engine.streams`), which read the examples from somewhere else on every
  pass, so the data need not fit in one process: :class:`DatasetStream` (a map-style ``Dataset``, or an ordered ``DataLoader``
  over one, read through a ``DataLoader`` over this process' indices),
  :class:`IterableStream` (a ``DataLoader`` over an ``IterableDataset``: every pass reads the
  whole stream and keeps this process' examples) and :class:`HDF5Stream` (``inputs``/``targets``
  datasets of an HDF5 file, read a slice at a time).

Each stream covers a contiguous range ``[start, stop)`` of the global example order, so under
``torchrun`` every rank reads only its own shard (:meth:`StreamSpec.shard`). A
:class:`~basins.Problem` given a stream keeps the chunks in memory after the first pass when
they fit in its data budget, and otherwise reads the stream again on every pass.

Every stream checks, batch by batch, that values are finite and that the pass yields exactly
the promised number of examples; it also computes a content fingerprint on its first full pass
(:attr:`DataSource.digest`): ``Σᵢ sha256(i, xᵢ, yᵢ) mod 2²⁵⁶`` over global example indices i,
which does not depend on the batch size or on how the examples are split across processes
(partial sums add up; :func:`combine_digests`).

Streams never seed random number generators: a ``Dataset`` must return the same example for the
same index on every call (no random augmentation). The Problem's determinism check (two full
passes at load) reports one that does not.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from basins.engine.batch import Inputs, cat, example_bytes, rows, take
from basins.errors import InputError

__all__ = [
    "DataSource",
    "TensorData",
    "as_tensor",
    "as_inputs",
    "check_finite",
    "check_pair",
    "combine_digests",
    "data_fingerprint",
    "DEFAULT_STREAM_BATCH",
]

#: Examples per chunk of a stream when neither the user nor the loader names a batch size.
DEFAULT_STREAM_BATCH = 256
_MOD = 1 << 256

Batch = tuple[Inputs, torch.Tensor]


def data_fingerprint(inputs: Inputs, targets: torch.Tensor, *, chunk: int = 4096) -> str:
    """Hex fingerprint of examples held in memory, equal to a stream's over the same examples."""
    total = 0
    for a in range(0, rows(inputs), chunk):
        total += _example_digests(take(inputs, a, a + chunk), targets[a : a + chunk], a)
    return combine_digests([total])


def combine_digests(parts: Sequence[int]) -> str:
    """Hex fingerprint of a whole dataset from its shards' partial digests (their sum mod 2²⁵⁶)."""
    return f"{sum(parts) % _MOD:064x}"


def _example_digests(x: Inputs, y: torch.Tensor, first_index: int) -> int:
    """``Σᵢ sha256(i, dtype/shape, xᵢ, yᵢ)`` (as an integer mod 2²⁵⁶) for one batch (named inputs:
    names, dtypes and shapes in the header, each input's bytes in name order)."""
    if isinstance(x, dict):
        head = "".join(f"{k}={v.dtype}:{tuple(v.shape[1:])};" for k, v in sorted(x.items()))
    else:
        head = f"{x.dtype}:{tuple(x.shape[1:])};"
    header = f"{head}{y.dtype}:{tuple(y.shape[1:])};".encode()
    xbs = [t.numpy() for t in example_bytes(x)]
    yb = y.detach().cpu().contiguous().reshape(y.shape[0], -1).view(torch.uint8).numpy()
    total = 0
    for i in range(rows(x)):
        h = hashlib.sha256(header)
        h.update((first_index + i).to_bytes(8, "little"))
        for xb in xbs:
            h.update(xb[i].data)
        h.update(yb[i].data)
        total += int.from_bytes(h.digest(), "little")
    return total % _MOD


def _describe_error(err: BaseException) -> str:
    """``Type: message`` of an error raised by the user's data code, in one line.

    A DataLoader worker's error carries the original traceback in its message; its last line
    is the original error.
    """
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "Original Traceback" in text and lines:
        return lines[-1][:300]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def as_tensor(value: Any, source: str, name: str) -> torch.Tensor:
    """``value`` (a tensor, NumPy array or nested numbers) as a tensor, without a copy where possible.

    Raises:
        InputError: values that are not real numbers (strings, objects, complex), or a dtype torch lacks.
    """
    if isinstance(value, torch.Tensor):
        return value.detach() if value.requires_grad else value
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise InputError(f"{source}: the {name} have NumPy dtype {array.dtype}, not numbers; store numeric arrays")
    try:
        return torch.from_numpy(np.require(array, requirements="C"))  # keeps 0-d arrays 0-d
    except TypeError as err:  # dtypes torch lacks, e.g. uint32 on older torch
        raise InputError(f"{source}: the {name} have unsupported dtype {array.dtype}") from err


def as_inputs(value: Any, source: str) -> Inputs:
    """Inputs as a tensor (:func:`as_tensor`), or a dict of named inputs as a dict of tensors that
    share their first dimension (the examples).

    Raises:
        InputError: as :func:`as_tensor`, an empty dict, non-string names, a scalar input, or
            named inputs with different numbers of examples.
    """
    if not isinstance(value, Mapping):
        return as_tensor(value, source, "inputs")
    if not value:
        raise InputError(f"{source}: the named inputs are an empty dict")
    out: dict[str, torch.Tensor] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise InputError(f"{source}: named inputs need string names, got {key!r}")
        t = as_tensor(item, source, f"input {key!r}")
        if t.dim() == 0:
            raise InputError(f"{source}: input {key!r} is a scalar; it needs a first dimension of n examples")
        out[key] = t
    sizes = {k: int(t.shape[0]) for k, t in out.items()}
    if len(set(sizes.values())) > 1:
        raise InputError(
            f"{source}: the named inputs hold different numbers of examples "
            f"({', '.join(f'{k}: {v}' for k, v in sizes.items())}); they need the same first dimension"
        )
    return out


def check_finite(x: Inputs, y: torch.Tensor, source: str, first_index: int = 0) -> None:
    """Refuse NaN or inf in floating-point ``x`` (inputs) or ``y`` (targets), examples ``first_index..``.

    Raises:
        InputError: naming the first bad example and how many values are bad in each tensor.
    """
    counts, first = [], None
    named = [(f"input {k!r}", v) for k, v in x.items()] if isinstance(x, Mapping) else [("inputs", x)]
    for name, t in (*named, ("targets", y)):
        if t.is_floating_point() and t.numel():
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                counts.append(f"{int((~torch.isfinite(t)).sum())} in {name}")
                row = first_index + int(torch.nonzero(bad)[0, 0])
                if first is None or row < first[1]:
                    first = (name, row)
    if first is not None:
        where = f"examples {first_index}..{first_index + rows(x) - 1}"
        raise InputError(
            f"{source}: non-finite values (NaN or inf) in the {first[0]} of example {first[1]}: "
            f"{' and '.join(counts)} among {where}; clean them"
        )


def _check_examples(n: int, source: str) -> None:
    if n == 0:
        raise InputError(f"{source}: the data has no examples (n = 0)")


def check_pair(x: Inputs, y: torch.Tensor, source: str) -> None:
    """Refuse scalars and unequal first dimensions (the number of examples).

    Raises:
        InputError: naming which one is a scalar, or both sizes.
    """
    for name, t in ((("inputs", x),) if isinstance(x, torch.Tensor) else ()) + (("targets", y),):
        if t.dim() == 0:
            raise InputError(f"{source}: {name} is a scalar; it needs a first dimension of n examples")
    if rows(x) != y.shape[0]:
        raise InputError(
            f"{source}: inputs have {rows(x)} examples but targets have {y.shape[0]}; "
            "both need the same first dimension n"
        )


class DataSource(ABC):
    """Consecutive ``(inputs, targets)`` batches of ``num_examples`` examples, the same on every pass.

    Attributes:
        num_examples: examples this source holds (this process' shard).
        first_index: global index of its first example (0 unless it is a shard).
        source: what the examples come from, for messages.
        streamed: True when every pass reads the examples again (False: in memory).
        default_batch_size: the chunk size to use when none is asked for (None: all at once).
    """

    num_examples: int
    first_index: int = 0
    source: str = "data"
    streamed: bool = True
    default_batch_size: int | None = DEFAULT_STREAM_BATCH

    def __init__(self) -> None:
        self._digest: int | None = None

    @abstractmethod
    def _raw_batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]:
        """The source's own ``(x, y)`` batches of at most ``batch_size`` examples, in order."""

    def head(self, k: int) -> Batch:
        """The first ``min(k, num_examples)`` examples as one batch (reads only what it needs)."""
        k = min(k, self.num_examples)
        xs, ys, have = [], [], 0
        for x, y in self.batches(k, check=False):
            xs.append(x)
            ys.append(y)
            have += rows(x)
            if have >= k:
                break
        return take(cat(xs), 0, k), torch.cat(ys)[:k]

    def batches(self, batch_size: int, *, check: bool = True) -> Iterator[Batch]:
        """Yield ``(inputs (m, ...), targets (m, ...))`` tensors covering the source once, in order.

        Every complete pass must hold exactly :attr:`num_examples` examples. With ``check`` the
        values are also checked to be finite and, for a stream, the pass's fingerprint is
        recorded (:attr:`digest`, first checked pass) or compared with the recorded one.

        Raises:
            InputError: a batch that is not an ``(x, y)`` pair of equal length, non-finite
                values, a pass with more or fewer examples than promised, or examples that
                differ from those of an earlier checked pass.
        """
        seen = 0
        digest = 0 if (check and self.streamed) else None
        for raw_x, raw_y in self._guarded(self._raw_batches(batch_size)):
            x = as_inputs(raw_x, self.source)
            y = as_tensor(raw_y, self.source, "targets")
            if (isinstance(x, torch.Tensor) and x.dim() == 0) or y.dim() == 0 or rows(x) != y.shape[0]:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else f"{rows(x)} named"
                raise InputError(
                    f"{self.source}: a batch holds inputs {shape} and targets {tuple(y.shape)}; "
                    "both need the same first dimension (examples)"
                )
            if seen + rows(x) > self.num_examples:
                raise InputError(
                    f"{self.source}: a pass yielded more than the {self.num_examples} examples "
                    "promised; the data changed between passes"
                )
            if check and self.streamed:  # data in memory were checked once, when they were given
                check_finite(x, y, self.source, self.first_index + seen)
                if digest is not None:
                    digest += _example_digests(x, y, self.first_index + seen)
            seen += rows(x)
            yield x, y
        if seen != self.num_examples:
            raise InputError(
                f"{self.source}: a pass yielded {seen} examples instead of {self.num_examples}; "
                "the data changed between passes"
            )
        if digest is not None:
            if self._digest is None:
                self._digest = digest % _MOD
            elif self._digest != digest % _MOD:
                raise InputError(
                    f"{self.source}: two passes over the data gave different examples; a Dataset must "
                    "return the same example for the same index (no random augmentation) and a loader "
                    "the same order"
                )

    def _guarded(self, raw: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """The user's batches, with an error raised while reading them reported as bad input."""
        while True:
            try:
                item = next(raw)
            except StopIteration:
                return
            except InputError:
                raise
            except Exception as err:
                raise InputError(f"{self.source}: reading the data failed with {_describe_error(err)}") from err
            yield item

    @property
    def digest(self) -> int | None:
        """This stream's partial fingerprint (see module docstring); None before a complete checked
        pass, and always None for :class:`TensorData` (hash the tensors themselves)."""
        return self._digest


class TensorData(DataSource):
    """Examples held in memory: ``inputs (n, ...)`` (or a dict of named inputs, each ``(n, ...)``)
    and ``targets (n, ...)`` tensors (or arrays),
    validated once, here: numbers, equal first dimensions, ``n ≥ 1``, finite floating-point values.

    Args:
        inputs, targets: ``(n, ...)`` tensors or NumPy arrays (shared, not copied, when possible).
        source: what they came from, for messages.
        first_index: global index of the first example (a shard's offset).
        max_samples: keep the first ``max_samples`` examples (copied, so the rest can be freed).

    Raises:
        InputError: as :func:`as_tensor`, :func:`check_pair` and :func:`check_finite`, or ``n = 0``.
    """

    streamed = False
    default_batch_size = None

    def __init__(self, inputs: Any, targets: Any, *, source: str = "data", first_index: int = 0,
                 max_samples: int | None = None) -> None:
        super().__init__()
        x, y = as_inputs(inputs, source), as_tensor(targets, source, "targets")
        check_pair(x, y, source)
        _check_examples(rows(x), source)
        if max_samples is not None and max_samples < rows(x):
            x, y = _clone(take(x, 0, max_samples)), y[:max_samples].clone()
        check_finite(x, y, source, first_index)
        self.inputs, self.targets = x, y
        self.num_examples = rows(x)
        self.first_index = first_index
        self.source = source

    def shard(self, start: int, stop: int, *, copy: bool = True) -> TensorData:
        """Examples ``[start, stop)`` as a :class:`TensorData` of their own (already validated:
        not checked again); ``copy`` so that the whole data can be freed."""
        out = TensorData.__new__(TensorData)
        DataSource.__init__(out)
        x, y = take(self.inputs, start, stop), self.targets[start:stop]
        out.inputs, out.targets = (_clone(x), y.clone()) if copy else (x, y)
        out.num_examples, out.first_index, out.source = stop - start, self.first_index + start, self.source
        return out

    def _raw_batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]:
        for a in range(0, self.num_examples, batch_size):
            yield take(self.inputs, a, a + batch_size), self.targets[a : a + batch_size]


def _clone(x: Inputs) -> Inputs:
    return {k: v.clone() for k, v in x.items()} if isinstance(x, dict) else x.clone()
