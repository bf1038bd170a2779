"""The Problem engine: exact full-data loss, gradient, Hessian-vector products and batched loss.

A :class:`Problem` is a model ``f(x; θ)``, the point ``θ*`` it was saved at, a dataset
``{(xᵢ, yᵢ)}`` of ``n`` examples and a loss. Every quantity is of the **full-data mean**

.. math:: L(θ) = \\sum_c \\frac{n_c}{n} \\, \\ell_c(θ),

an exact size-weighted sum over chunks ``c`` of at most ``batch_size`` examples, where
``ℓ_c`` is the loss function's mean over chunk ``c``. Memory is bounded by one chunk,
except for the optional cached gradient graph (see :meth:`Problem.hvp`).

Data come from a data source (:mod:`basins.engine.data`, :mod:`basins.engine.streams`): tensors held in memory, or a stream (a ``Dataset``,
``DataLoader`` or HDF5 file) read a chunk at a time, so the data need not fit in memory. A
stream's chunks are kept on the device after the first pass when they fit in
``data_memory_bytes``; otherwise every pass reads them again.

Known limitations: the model must be a deterministic function of ``(θ, x)`` (checked at
construction), and so must a stream's examples.

Built on :mod:`torch.func`: ``functional_call`` with ``(params, buffers)``, ``grad``,
``jvp``, ``vjp`` and ``vmap``. Nothing is kept in ``.grad``.

Size: about 700 lines, over the house's ~450, because the data loop, the chunk cache, the
set-up checks and the public products share one state (chunks, counters, collectives) that
splitting would only pass around; the HVP routes live in :mod:`basins.engine.routes`, memory
in :mod:`basins.engine.memory`, validation in :mod:`basins.engine.data`, named inputs and output
picking in :mod:`basins.engine.batch`, the attention path in :mod:`basins.engine.attention`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import vmap

from basins.engine.attention import force_differentiable_attention, math_attention
from basins.engine.batch import (
    Inputs,
    call_model,
    describe,
    nbytes,
    pad_rows,
    rows,
    to_device,
)
from basins.engine.data import DataSource, TensorData
from basins.engine.losses import (
    TOKEN_LOSSES,
    LossFn,
    check_loss_on_chunk,
    check_targets,
    count_terms,
    get_loss,
    infer_loss_name,
    loss_name,
    num_terms_per_example,
    split_loss_value,
)
from basins.engine.memory import memory_budget
from basins.engine.params import ParamSpace, Selection, select_parameters
from basins.engine.routes import HVP_ROUTES, Routes, float64_products
from basins.errors import ComputeError, InputError
from basins.progress import ProgressCallback, relay

__all__ = ["Problem", "HVP_ROUTES", "Counters", "resolve_device", "resolve_dtype"]

_Params = dict[str, torch.Tensor]

#: The factor of :meth:`Problem.rescaled_residuals` (1 + 3/8: not a power of two).
RESCALE = 1.375


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → ``cuda`` when available else ``cpu``; checks that CUDA exists when asked."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``float32``/``float64`` (or a torch dtype, or None: keep the model's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64, "double": torch.float64, "float": torch.float32}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}: use float32 or float64")
    return table[dtype]


def _as_source(inputs: Inputs | DataSource, targets: torch.Tensor | None) -> DataSource:
    if isinstance(inputs, DataSource):
        if targets is not None:
            raise InputError("pass either a DataSource or (inputs, targets) tensors, not both")
        source = inputs
    else:
        if targets is None:
            raise InputError("targets are missing: Problem(module, inputs, targets, loss)")
        source = TensorData(inputs, targets)
    if source.num_examples == 0:
        raise InputError("the dataset is empty")
    return source


@dataclass
class Counters:
    """Work done so far, in units users can compare across runs: everything computed, the
    construction's checks and the HVP route choice included (a product over a piece of the data,
    as when routes are timed, counts as one)."""

    num_hvps: int = 0  # single Hessian-vector products (a block of K counts K)
    num_loss_evals: int = 0  # full-data loss evaluations (a batch of K points counts K)
    num_grads: int = 0  # full-data gradients

    def as_dict(self) -> dict[str, int]:
        return {"num_hvps": self.num_hvps, "num_loss_evals": self.num_loss_evals, "num_grads": self.num_grads}


@dataclass
class _Chunk:
    inputs: Inputs  # padded to the fixed batch size when there is one
    targets: torch.Tensor  # never padded
    num_real: int  # examples that count
    terms: float  # averaged terms it holds (valid tokens for the token losses)


class Problem:
    """A model at a point θ*, a dataset and a loss, with exact full-data derivatives.

    Args:
        module: the model; called as ``functional_call(module, (params, buffers), (x,))``, or with
            named inputs as keyword arguments (``model(**x)``); a ``ModelOutput``, dict or tuple
            it returns is reduced to one tensor by :func:`basins.engine.batch.pick_output`.
            It is put in ``eval()`` mode (BatchNorm statistics fixed, dropout off), and its
            attention onto a twice-differentiable path (:func:`force_differentiable_attention`).
        inputs: ``(n, ...)`` inputs, a dict of named inputs (each ``(n, ...)``), or a
            :class:`~basins.engine.data.DataSource` (then ``targets`` is None), e.g. a
            :class:`~basins.engine.streams.DatasetStream`.
        targets: ``(n, ...)`` targets.
        loss: a built-in loss name (:mod:`basins.engine.losses`), ``module:function``, a callable,
            or None to infer it from the targets (integer → cross-entropy, float → mse).
        batch_size: examples per chunk (default: all ``n`` in one chunk for tensors, the
            source's own batch size for a stream, or the model's fixed batch size). Results do
            not depend on it beyond rounding.
        fixed_batch_size: the batch size a ``.pt2`` was exported with; chunks are padded
            to it (padding examples get weight zero), so any ``n`` works.
        dtype: ``torch.float32``/``torch.float64``/names, or None to keep the model's.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        hvp_route: one of :data:`HVP_ROUTES`.
        graph_memory_bytes: budget for the cached gradient graph (default a quarter of RAM,
            shared among the ``LOCAL_WORLD_SIZE`` processes of a torchrun launch).
        memory_bytes: the whole computation's memory budget, which the HVP route, its pieces and
            the Lanczos basis are planned to fit (:class:`~basins.engine.memory.MemoryPlan`, at
            :attr:`routes.plan <basins.engine.routes.Routes.plan>`); default 80% of the memory available.
        data_memory_bytes: budget for keeping a stream's chunks in memory after the first
            pass (same default; 0: read the stream on every pass). Tensors are always held.
        check_determinism: evaluate loss and gradient twice and require agreement.
        total_examples: data parallelism (:mod:`basins.engine.distributed`): the global ``n`` when
            ``inputs``/``targets`` are this process' shard; chunk weights are ``n_c / n``.
            :attr:`num_examples` is this global n, :attr:`num_local_examples` the shard's.
        reduce: sums a partial result over processes (e.g.
            :func:`basins.engine.distributed.all_reduce_sum`); applied to every loss, gradient,
            HVP (block) and batched loss. Must give every process the same result.
        gather: all-gathers a small picklable object (e.g.
            :func:`basins.engine.distributed.all_gather_object`); with it the ``auto`` HVP route is
            chosen identically on every process (the fastest on the slowest process among
            the routes that work everywhere) and the shard sizes are checked to sum to n.
        params: globs choosing θ among the model's parameters (:func:`basins.engine.params.select_parameters`;
            a leading ``!`` excludes); the others are held fixed, so every quantity is that of
            the sub-block. None: every trainable parameter.
        include_frozen: keep parameters with ``requires_grad=False`` in θ (default: held fixed).
        output: the field (or tuple index) of the model's output to use (default: ``logits``,
            the only tensor, or the first element).

    The full-data mean weights every chunk by its number of averaged terms (valid tokens for
    ``causal-lm``/``token-cross-entropy``, the user's count for a loss returning ``(sum,
    count)``); :attr:`num_terms` is their total N over all processes.

    Raises:
        InputError: the model rejects the inputs, the targets do not fit the loss, or
            the model is not a deterministic function of θ (dropout in train mode, say).
        ComputeError: the loss or gradient at θ* is not finite although the data are.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        inputs: torch.Tensor | DataSource,
        targets: torch.Tensor | None = None,
        loss: str | LossFn | None = None,
        *,
        batch_size: int | None = None,
        fixed_batch_size: int | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = "cpu",
        hvp_route: str = "auto",
        graph_memory_bytes: int | None = None,
        memory_bytes: int | None = None,
        data_memory_bytes: int | None = None,
        check_determinism: bool = True,
        total_examples: int | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        gather: Callable[[Any], list[Any]] | None = None,
        params: Sequence[str] | None = None,
        include_frozen: bool = False,
        output: str | None = None,
    ) -> None:
        if hvp_route not in HVP_ROUTES:
            raise InputError(f"unknown HVP route {hvp_route!r}: use one of {', '.join(HVP_ROUTES)}")
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {batch_size}")
        self.counters = Counters()
        self._reduce_fn, self._gather_fn = reduce, gather
        self._data_memory_bytes = data_memory_bytes
        self.output = output
        self._setup_parameters(module, resolve_device(device), resolve_dtype(dtype), params, include_frozen)
        self._setup_data(_as_source(inputs, targets), total_examples, fixed_batch_size, batch_size)
        self._setup_loss(loss)
        self._check_at_optimum(check_determinism)
        #: the HVP routes (:mod:`basins.engine.routes`): chosen now, for single vectors
        self.routes = Routes(self, hvp_route, graph_memory_bytes, memory_bytes)

    # ------------------------------------------------------------------ setup steps
    def _setup_parameters(self, module: torch.nn.Module, device: torch.device, wanted: torch.dtype | None,
                          patterns: Sequence[str] | None, include_frozen: bool) -> None:
        """The model in eval mode, θ* (the selected parameters) and the fixed state (buffers and
        parameters left out) on ``device`` in the chosen dtype."""
        self.device = device
        try:
            module.eval()
        except NotImplementedError:  # torch.export modules: the mode was fixed at export
            pass
        self.module = module
        #: the attention path derivatives go through (:func:`force_differentiable_attention`)
        self.attention = force_differentiable_attention(module)
        named = list(module.named_parameters())
        if not named:
            raise InputError("the model has no parameters")
        #: which parameters are θ (:class:`basins.engine.params.Selection`)
        self.selection: Selection = select_parameters(named, patterns, include_frozen=include_frozen)
        every = {n: p.detach() for n, p in named}
        params = {n: every[n] for n in self.selection.selected}
        dtype = wanted or next(iter(params.values())).dtype
        if not dtype.is_floating_point:
            raise InputError(f"parameters must be floating point, got {dtype}")
        self.dtype = dtype
        self.params: _Params = {n: p.to(device, dtype).clone() for n, p in params.items()}
        state = [*module.named_buffers(), *((n, every[n]) for n in self.selection.fixed)]
        self.buffers: _Params = {
            n: (b.to(device, dtype) if b.is_floating_point() else b.to(device)) for n, b in state
        }
        self.space = ParamSpace(self.params)
        self.theta0 = self.space.flatten(self.params).detach()
        self.num_params = self.space.num_params

    def _setup_data(self, source: DataSource, total: int | None, fixed: int | None, batch_size: int | None) -> None:  # noqa: E501
        """This process' examples, the global n (checked against the other processes) and the chunk size."""
        #: where the examples come from (:mod:`basins.engine.data`)
        self.data = source
        self.num_local_examples = int(source.num_examples)
        self.num_examples = int(total) if total is not None else self.num_local_examples
        if self.num_examples < self.num_local_examples:
            raise InputError(f"total_examples = {self.num_examples} is less than the {self.num_local_examples} examples given")
        if self._gather_fn is not None and sum(self.gather(self.num_local_examples)) != self.num_examples:
            raise InputError(f"the processes' shards do not add up to total_examples = {self.num_examples}")
        self.fixed_batch_size = fixed
        self.batch_size = self._choose_batch_size(batch_size)

    def _setup_loss(self, loss: str | LossFn | None) -> None:
        """Run the model on the first examples, fix the loss and the targets' shape and dtype, and
        (data in memory) read and check every chunk once."""
        head_x, head_y = self.data.head(self.fixed_batch_size or min(2, self.num_local_examples))
        outputs = self._check_forward(self._to_device_inputs(head_x))
        self.loss_name = self._infer_loss(head_x, head_y, outputs) if loss is None else loss_name(loss)
        #: the targets' dtype as the data hold them (before conversion to the loss' needs)
        self.data_target_dtype = head_y.dtype
        self._target_spec: tuple[tuple[int, ...], torch.dtype] | None = None
        self._fit_targets(outputs, head_y.to(self.device))
        self.loss_fn: LossFn = get_loss(loss if loss is not None else self.loss_name)
        head_targets = self._chunk_targets(head_y[: outputs.shape[0]], check=False)
        check_loss_on_chunk(self.loss_fn, self.loss_name, outputs, head_targets)
        with torch.no_grad():
            #: the loss returns ``(sum, count)``: chunks are weighted by its counts
            self.pair_loss = isinstance(self.loss_fn(outputs.detach(), head_targets), tuple)
        self.terms_per_example = num_terms_per_example(self.loss_name, outputs)
        #: True when chunks hold different numbers of terms per example (token losses, pair losses)
        self.variable_terms = self.pair_loss or self.loss_name in TOKEN_LOSSES
        #: chunks held in memory (None: read from the stream on every pass, see :meth:`chunks`)
        self._cached: list[_Chunk] | None = None
        self._checked_pass = False  # a complete pass with every chunk checked (streams: the first)
        self._total_terms = float(self.num_examples * self.terms_per_example)
        if not self.data.streamed:
            self._cached = list(self._read_chunks(check=True))
            self._checked_pass = True
        if self.variable_terms:  # N = Σ terms over every chunk of every process: one counting pass
            local = sum(c.terms for c in self._iter_chunks())
            self._total_terms = float(self.reduce(torch.tensor(local, dtype=torch.float64, device=self.device)))
            if self._total_terms <= 0:
                raise InputError(
                    f"{self.data.source}: no terms to average: every target is ignored (−100) for loss "
                    f"{self.loss_name!r}; check the labels and attention_mask"
                )

    def _infer_loss(self, x: Inputs, y: torch.Tensor, outputs: torch.Tensor) -> str:
        """The default loss: token-level for ``(n, T, V)`` logits with ``(n, T)`` integer targets
        (``causal-lm`` for a causal LM, i.e. a model class named ``*CausalLM*``/``*LMHead*``, or
        labels taken from ``input_ids``), else :func:`infer_loss_name`."""
        tokens = (outputs.dim() == 3 and not y.is_floating_point() and y.dtype != torch.bool
                  and tuple(y.shape) == tuple(outputs.shape[:2]))
        if tokens:
            name = type(self.module).__name__
            from_ids = isinstance(x, dict) and "input_ids" in x and bool(
                ((y == x["input_ids"]) | (y == -100)).all())
            return "causal-lm" if ("CausalLM" in name or "LMHead" in name or from_ids) else "token-cross-entropy"
        return infer_loss_name(y)

    def _check_at_optimum(self, check_determinism: bool) -> None:
        """``L(θ*)`` and ``‖∇L(θ*)‖``, finite; optionally the same again (determinism). Cost: 1–2 loss evals and gradients."""
        self.loss_at_optimum = float(self.loss())
        if not math.isfinite(self.loss_at_optimum):
            raise ComputeError(
                f"the loss at the saved parameters is {self.loss_at_optimum} although the data are finite; "
                "check the model's outputs (overflow in float32? try --dtype float64) and the loss"
            )
        g = self.grad()
        self.grad_norm = float(g.norm())
        if not math.isfinite(self.grad_norm):
            raise ComputeError("the gradient at the saved parameters is not finite")
        if check_determinism:
            self._check_determinism(g)

    # ------------------------------------------------------------------ setup helpers
    def _choose_batch_size(self, batch_size: int | None) -> int:
        if self.fixed_batch_size is not None:
            return self.fixed_batch_size
        default = self.data.default_batch_size or self.num_local_examples
        return min(batch_size or default, self.num_local_examples)

    def _to_device_inputs(self, x: Inputs) -> Inputs:
        return to_device(x, self.device, self.dtype)

    def _fit_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Check the first targets against the model's outputs, and fix what every chunk's targets
        are brought to: per-example shape (``(n,)`` → ``(n, 1)`` where unambiguous) and dtype."""
        if targets.is_floating_point():
            targets = targets.to(self.dtype)
        head = self._checked_targets(outputs, targets[: outputs.shape[0]], self.data.first_index)
        self._target_spec = (tuple(head.shape[1:]), head.dtype)
        self._output_spec = (tuple(outputs.shape[1:]), outputs.dtype)

    def _checked_targets(self, outputs: torch.Tensor, y: torch.Tensor, first: int) -> torch.Tensor:
        """:func:`check_targets`, its error naming the source and the examples ``first..`` it was about."""
        try:
            return check_targets(self.loss_name, outputs, y)
        except InputError as err:
            where = f"the targets of examples {first}..{first + y.shape[0] - 1}"
            raise InputError(f"{self.data.source}: {where}: {err}") from err

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

    def _check_forward(self, x: Inputs) -> torch.Tensor:
        size = self.fixed_batch_size or rows(x)
        try:
            with torch.no_grad():
                out = self.forward(self.params, self._pad(x, size))
        except InputError:  # the output could not be picked (names the fields)
            raise
        except Exception as exc:  # the model's own error, re-raised as bad input
            what = (f"of shape (batch, {', '.join(map(str, x.shape[1:]))}) and dtype {x.dtype}"
                    if isinstance(x, torch.Tensor) else describe(x))
            raise InputError(
                f"the model rejected inputs {what}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        if out.dim() == 0 or out.shape[0] < rows(x):
            raise InputError(
                f"the model's output has shape {tuple(out.shape)}, without a first dimension of the batch's "
                f"{rows(x)} examples (is it a loss? basins computes the loss itself from the outputs)"
            )
        return out[: rows(x)]

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

    def _check_determinism(self, g: torch.Tensor) -> None:
        if self.data.streamed:  # read the data again: same examples (fingerprints compared), same order
            for _ in self.data.batches(self.batch_size, check=True):
                pass
        loss2 = float(self.loss())
        g2 = self.grad()
        eps = torch.finfo(self.dtype).eps
        tol_loss = 64 * eps * max(1.0, abs(self.loss_at_optimum))
        tol_grad = 64 * eps * max(1.0, self.grad_norm) * math.sqrt(self.num_params)
        if abs(loss2 - self.loss_at_optimum) > tol_loss or float((g2 - g).norm()) > tol_grad:
            raise InputError(
                "the model is not a deterministic function of its parameters: two evaluations of the loss "
                f"gave {self.loss_at_optimum!r} and {loss2!r}. Put dropout/batch statistics in eval mode "
                "before exporting (model.eval()), and use data that do not change between passes "
                "(a Dataset must return the same example for the same index: no random augmentation)"
            )

    # ------------------------------------------------------------------ functional pieces
    def forward(self, params: _Params, x: Inputs, buffers: _Params | None = None) -> torch.Tensor:
        """Model outputs ``f(x; params)`` for a batch ``x`` (a tensor, or named inputs passed as
        keyword arguments; the state not in ``params`` fixed at θ*, or ``buffers``), picked from
        the model's return value (:attr:`output`), attention on its differentiable path."""
        with math_attention():
            return call_model(self.module, (params, self.buffers if buffers is None else buffers), x, self.output)

    def loss_value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss' mean over a chunk's averaged terms (a ``(sum, count)`` loss: ``sum / count``)."""
        return split_loss_value(self.loss_fn(outputs, targets))[0]

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

    def _chunk_loss(self, params: _Params, x: Inputs, y: torch.Tensor, num_real: int) -> torch.Tensor:
        """One chunk's mean loss. Below float64 the loss itself is evaluated in float64 on the
        model's outputs (cheap: ``(m, k)`` numbers): in float32 the loss head's own rounding (the
        softmax's ``diag(p) − ppᵀ`` cancels) biased the Hessian's top eigenvalues low by up to
        ~25 eps·‖H‖ on the benchmark MLP; with it, the error is that of the model's own float32 layers."""
        out = self.forward(params, x)
        if out.shape[0] != num_real:
            out = out[:num_real]
        if out.dtype == torch.float64 or not out.is_floating_point():
            return self.loss_value(out, y)
        y64 = y.to(torch.float64) if y.is_floating_point() else y
        return self.loss_value(out.to(torch.float64), y64).to(out.dtype)

    # ------------------------------------------------------------------ processes
    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a per-process partial result over processes (identity in one process)."""
        return t if self._reduce_fn is None else self._reduce_fn(t)

    def gather(self, obj: Any) -> list[Any]:
        """Every process' ``obj`` (a small picklable object), in rank order; ``[obj]`` in one process."""
        return [obj] if self._gather_fn is None else list(self._gather_fn(obj))

    def agree(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process (``obj`` itself in one process).

        For a decision taken from local measurements (timings, memory): processes that
        decided differently would run different collectives and hang.
        """
        return obj if self._gather_fn is None else self._gather_fn(obj)[0]

    def _as_params(self, theta: torch.Tensor | None) -> _Params:
        if theta is None:
            return self.params
        return self.space.unflatten(theta.to(self.device, self.dtype))

    # ------------------------------------------------------------------ public quantities
    def loss(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Full-data mean loss ``L(θ)`` (scalar tensor); θ* when ``theta`` is None. Cost: 1 loss eval."""
        params = self._as_params(theta)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for x, y, m, w in self.chunks():
                total = total + w * self._chunk_loss(params, x, y, m).to(torch.float64)
        self.counters.num_loss_evals += 1
        return self.reduce(total)

    def grad(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Full-data gradient ``∇L(θ)``, shape ``(P,)``. Cost: 1 gradient."""
        # torch.autograd, not torch.func.grad: the latter imports torch._dynamo on its first call
        # (about 0.9 s and 60 MiB per process), which a run on the graph route never needs
        names = list(self.space.names)
        params = self._as_params(theta)
        leaves = [params[k].detach().requires_grad_(True) for k in names]
        at = dict(zip(names, leaves))
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with torch.enable_grad():
            for x, y, m, w in self.chunks():
                gs = torch.autograd.grad(self._chunk_loss(at, x, y, m), leaves, allow_unused=True)
                total += w * self.space.flatten({k: g if g is not None else torch.zeros_like(t)
                                                 for k, g, t in zip(names, gs, leaves)})
        self.counters.num_grads += 1
        return self.reduce(total)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """Hessian-vector product ``H v`` at θ*, over the full data.

        Args:
            v: ``(P,)`` or a block ``(P, K)`` of K vectors; moved to the problem's dtype/device.

        Returns:
            ``H v`` with the shape of ``v``. Cost: K HVPs, in one pass over the data
            (a block is vmapped for the functional routes). Route: :attr:`hvp_route`.
        """
        return self._counted_hvp(v, None)

    def _counted_hvp(self, v: torch.Tensor, route: str | None) -> torch.Tensor:
        """``H v`` for ``(P,)`` or ``(P, K)`` by ``route`` (None: the chosen one), counted (by the route)."""
        single = v.dim() == 1
        V = v.to(self.device, self.dtype).reshape(self.num_params, -1)
        out = self.routes.compute(V, route or self.hvp_route)
        return out[:, 0] if single else out

    def hvp_with_route(self, v: torch.Tensor, route: str) -> torch.Tensor:
        """:meth:`hvp` by a named route (for tests and benchmarks)."""
        if route not in HVP_ROUTES[1:]:
            raise InputError(f"unknown HVP route {route!r}")
        return self._counted_hvp(v, route)

    def rescaled_residuals(self, vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Residual norms ``‖H(c·y)/c − θ y‖`` of approximate eigenpairs, through the problem's own
        HVP at a rescaled vector (``c = RESCALE``, not a power of two, so that its rounding differs
        from that of the ``H y`` Lanczos saw): it measures the true residual of ``(θ, y)`` plus the
        rounding error of one product. Used by :func:`basins.analyses.hessian.hessian_eigenvalues`
        for float32 error bounds.

        Args:
            vectors: ``(P, k)`` (normalised here, in float64); values: ``(k,)``.

        Returns:
            ``(k,)`` float64 on the CPU. Cost: k HVPs in the problem's dtype.
        """
        out = []
        for s in range(0, vectors.shape[1], self.routes.piece_block):  # float64 copies of a few columns at a time
            Y = vectors[:, s : s + self.routes.piece_block].to(self.device, torch.float64)
            Y = Y / Y.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            HY = self.hvp((Y * RESCALE).to(self.dtype)).to(torch.float64) / RESCALE
            out.append((HY - Y * values[s : s + Y.shape[1]].to(Y.device, torch.float64)).norm(dim=0).cpu())
        return torch.cat(out)

    def check_eigenpairs(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 Rayleigh quotients and residual norms of approximate eigenvectors.

        For each column ``y`` (normalised here), ``ρ = yᵀHy`` and ``r = ‖Hy − ρy‖`` with ``H y``
        the float64 check product (:func:`basins.engine.routes.float64_products`), so that an
        eigenvalue of the exact Hessian lies within ``ρ ± r`` whatever the problem's dtype (up to
        float64 rounding): the rounding error of lower-precision HVPs is measured, not assumed.

        Args:
            vectors: ``(P, k)``.

        Returns:
            ``(ρ (k,), r (k,))`` float64 on the CPU. Cost: k float64 HVPs.
        """
        rhos, ress = [], []
        for s in range(0, vectors.shape[1], self.routes.piece_block):  # float64 copies of a few columns at a time
            Y = vectors[:, s : s + self.routes.piece_block].to(self.device, torch.float64)
            Y = Y / Y.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            HY = float64_products(self, Y)
            rho = (Y * HY).sum(0)
            rhos.append(rho.cpu())
            ress.append((HY - Y * rho).norm(dim=0).cpu())
        return torch.cat(rhos), torch.cat(ress)

    def loss_many(self, thetas: torch.Tensor, *, chunk: int | None = None, route: str = "vmap") -> torch.Tensor:
        """Full-data loss at K parameter vectors at once.

        Args:
            thetas: ``(K, P)`` parameter vectors (absolute, not offsets from θ*).
            chunk: how many points go through one ``vmap`` call (memory ∝ chunk ×
                activations); default all K.
            route: ``vmap`` (batched ``functional_call``) or ``loop`` (one call per point).

        Returns:
            ``(K,)`` float64 losses. Cost: K loss evaluations.
        """
        thetas = thetas.to(self.device, self.dtype)
        K = thetas.shape[0]
        if route not in ("vmap", "loop"):
            raise InputError(f"unknown loss_many route {route!r}: use vmap or loop")
        out = torch.zeros(K, dtype=torch.float64, device=self.device)
        step = max(1, chunk or K)
        with torch.no_grad():
            for x, y, m, w in self.chunks():
                if route == "loop":
                    vals = torch.stack(
                        [self._chunk_loss(self.space.unflatten(thetas[i]), x, y, m) for i in range(K)]
                    )
                else:
                    batched = vmap(self._chunk_loss, in_dims=(0, None, None, None))
                    vals = torch.cat(
                        [batched(self.space.unflatten(thetas[s : s + step]), x, y, m) for s in range(0, K, step)]
                    )
                out += w * vals.to(torch.float64)
        self.counters.num_loss_evals += K
        return self.reduce(out)

    @property
    def num_terms(self) -> int:
        """``N``, the number of averaged terms in L over all processes (n·k for mse, the valid tokens
        for the token losses): ``H = (2/N) JᵀJ`` at a zero-residual mse optimum."""
        return int(round(self._total_terms))

    # ------------------------------------------------------------------ HVP routes
    @property
    def hvp_route(self) -> str:
        """The route for single vectors (:mod:`basins.engine.routes`)."""
        return self.routes.single

    @property
    def block_route(self) -> str:
        """The route for blocks of vectors: the same as :attr:`hvp_route`."""
        return self.routes.block

    @property
    def route_timings(self) -> dict[str, float]:
        """Seconds per HVP measured for each route tried by ``auto``."""
        return dict(self.routes.timings)


    def dense_hessian(self, *, block: int = 64, callback: ProgressCallback | None = None) -> torch.Tensor:
        """The dense ``(P, P)`` Hessian in the problem's dtype, symmetrised
        (:meth:`basins.linalg.operator.Operator.materialise`). Cost: P HVPs in blocks of ``block``."""
        from basins.linalg.operator import Operator

        op = Operator(self.hvp, self.num_params, self.dtype, self.device)
        return op.materialise(block=block, callback=relay(callback, phase="hessian", unit="HVPs"))
