"""Chunk reading of a :class:`~basins.engine.problem.Problem`: its data source read a chunk at a
time, on the device, targets fitted to the loss, padded to a fixed batch size, weighted by
their terms; held in memory after the first checked pass when they fit the data budget.

:class:`ChunkReader` is a part of :class:`~basins.engine.problem.Problem` (a base class holding
the chunk loop and its cache); its public members (:meth:`chunks`, :meth:`chunk_terms`,
:meth:`piece_weight`, :attr:`inputs`, :attr:`targets`, :attr:`num_chunks`, :attr:`streaming`)
are documented as the Problem's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from basins.engine.batch import Inputs, nbytes, pad_rows, rows, to_device
from basins.engine.data import DataSource, TensorData
from basins.engine.losses import LossFn, check_targets, count_terms
from basins.engine.memory import memory_budget
from basins.errors import InputError

__all__ = ["ChunkReader"]


@dataclass
class _Chunk:
    inputs: Inputs  # padded to the fixed batch size when there is one
    targets: torch.Tensor  # never padded
    num_real: int  # examples that count
    terms: float  # averaged terms it holds (valid tokens for the token losses)


class ChunkReader:
    """The data loop of a Problem (module docstring). Set by :class:`~basins.engine.setup.ProblemSetup`."""

    data: DataSource
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    fixed_batch_size: int | None
    num_local_examples: int
    loss_name: str
    loss_fn: LossFn
    pair_loss: bool
    params: dict[str, torch.Tensor]
    _cached: list[_Chunk] | None
    _checked_pass: bool
    _total_terms: float
    _data_memory_bytes: int | None
    _target_spec: tuple[tuple[int, ...], torch.dtype] | None
    _output_spec: tuple[tuple[int, ...], torch.dtype]

    forward: Callable[..., torch.Tensor]  # provided by Problem

    def _checked_targets(self, outputs: torch.Tensor, y: torch.Tensor, first: int) -> torch.Tensor:
        """:func:`check_targets`, its error naming the source and the examples ``first..`` it was about."""
        try:
            return check_targets(self.loss_name, outputs, y)
        except InputError as err:
            where = f"the targets of examples {first}..{first + y.shape[0] - 1}"
            raise InputError(f"{self.data.source}: {where}: {err}", param=err.param) from err

    def _to_device_inputs(self, x: Inputs) -> Inputs:
        return to_device(x, self.device, self.dtype)

    def _chunk_targets(self, y: torch.Tensor, *, check: bool, first: int = 0) -> torch.Tensor:
        """One chunk's targets (global examples ``first..``) on the device, checked (when ``check``)
        and fitted as :meth:`_fit_targets` fixed."""
        assert self._target_spec is not None
        y = y.to(self.device)
        if y.is_floating_point():
            y = y.to(self.dtype)
        if check:  # against outputs of the model's shape (no forward pass needed)
            shape, dtype = self._output_spec
            self._checked_targets(torch.zeros((), dtype=dtype, device=y.device).expand(y.shape[0], *shape), y, first)
        tail, dtype = self._target_spec
        if tuple(y.shape[1:]) != tail:
            y = y.reshape(y.shape[0], *tail)
        return y.to(dtype)

    def _pad(self, x: Inputs, size: int) -> Inputs:
        return pad_rows(x, size)

    def _read_chunks(self, *, check: bool) -> Iterator[_Chunk]:
        """Chunks read from the data source: on the device, targets fitted to the loss, padded
        to the fixed batch size. ``check``: values finite, targets valid, count as promised."""
        start = self.data.first_index
        for x, y in self.data.batches(self.batch_size, check=check):
            m = rows(x)
            x = self._to_device_inputs(x)
            if self.fixed_batch_size is not None:
                x = self._pad(x, self.fixed_batch_size)
            targets = self._chunk_targets(y, check=check, first=start)
            yield _Chunk(x, targets, m, self.chunk_terms(x, targets, m))
            start += m

    def chunk_terms(self, x: Inputs, y: torch.Tensor, m: int) -> float:
        """Averaged terms in a chunk (or any piece of one) of ``m`` real examples: its weight in
        the full-data mean is ``terms / num_terms``. For a loss returning ``(sum, count)`` the
        count, from one forward pass (no gradient)."""
        if self.pair_loss:
            with torch.no_grad():
                out = self.forward(self.params, x)
                return float(self.loss_fn(out[:m], y)[1])
        return count_terms(self.loss_name, self._output_spec[0], y, m)

    def piece_weight(self, x: Inputs, y: torch.Tensor, m: int) -> float:
        """Weight in the full-data mean of a piece of a chunk: its :meth:`chunk_terms` over N."""
        return self.chunk_terms(x, y, m) / self._total_terms

    def chunks(self) -> Iterator[tuple[Inputs, torch.Tensor, int, float]]:
        """Yield ``(inputs, targets, num_real, weight)`` per chunk.

        ``inputs`` may be padded to the fixed batch size; only the first ``num_real``
        outputs count. ``weight = terms / N`` (:meth:`chunk_terms`, :attr:`num_terms`: ``num_real / n``
        when every example holds the same number of terms); weights sum to 1 over all processes.
        """
        total = self._total_terms
        for c in self._iter_chunks():
            yield c.inputs, c.targets, c.num_real, c.terms / total

    def _iter_chunks(self) -> Iterator[_Chunk]:
        if self._cached is not None:
            yield from self._cached
            return
        # A stream: read it again. The first complete pass is checked and, when the chunks fit
        # in the data budget, kept in memory for the later passes.
        first = not self._checked_pass
        budget = self._keep_budget()
        keep: list[_Chunk] | None = [] if first and budget > 0 else None
        held = 0
        for c in self._read_chunks(check=first):
            if keep is not None:
                held += nbytes(c.inputs) + c.targets.numel() * c.targets.element_size()
                if held <= budget:
                    keep.append(c)
                else:
                    keep = None  # too big to hold: stream on every pass
            yield c
        self._checked_pass = True
        if keep is not None:
            self._cached = keep

    def _keep_budget(self) -> int:
        """Bytes of streamed chunks a Problem may keep in memory (``data_memory_bytes``; default ¼ of RAM)."""
        return memory_budget(self._data_memory_bytes, self.device)

    @property
    def inputs(self) -> Inputs:
        """All of this process' inputs ``(n, ...)`` (or named inputs) on the device (data in memory only)."""
        return self._to_device_inputs(self._memory_data().inputs)

    @property
    def targets(self) -> torch.Tensor:
        """All of this process' targets ``(n, ...)``, fitted to the loss (data in memory only)."""
        return self._chunk_targets(self._memory_data().targets, check=False)

    def _memory_data(self) -> TensorData:
        if not isinstance(self.data, TensorData):
            raise InputError(f"the data of this Problem are streamed from {self.data.source}; read them with chunks()")
        return self.data

    @property
    def num_chunks(self) -> int:
        """Chunks per pass over this process' examples."""
        return -(-self.num_local_examples // self.batch_size)

    @property
    def streaming(self) -> bool:
        """True while every pass reads the data source again (False once the chunks are held in memory)."""
        return self._cached is None
