"""Set-up of a :class:`~basins.engine.problem.Problem`: the parameters θ*, the data and their
chunk size, the loss (given or inferred) and its targets, the first checks at θ*.

:class:`ProblemSetup` is a part of :class:`~basins.engine.problem.Problem` (a base class with
its construction steps, run in order by ``Problem.__init__``): ``_setup_parameters`` (model in
eval mode, θ* and the fixed state on the device in the dtype), ``_setup_data`` (the global n,
checked across processes; the chunk size), ``_setup_loss`` (a forward pass on the first
examples, the loss and the targets' shape, the term count N) and ``_check_at_optimum``
(finite loss and gradient; determinism). Also :func:`resolve_device` and :func:`resolve_dtype`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from basins.engine.attention import force_differentiable_attention
from basins.engine.batch import Inputs, describe, rows
from basins.engine.chunks import ChunkReader
from basins.engine.data import DataSource, TensorData
from basins.engine.losses import (
    TOKEN_LOSSES,
    LossFn,
    check_loss_on_chunk,
    get_loss,
    infer_loss_name,
    loss_name,
    num_terms_per_example,
)
from basins.engine.params import ParamSpace, Selection, select_parameters
from basins.errors import ComputeError, InputError

__all__ = ["ProblemSetup", "resolve_device", "resolve_dtype", "as_source"]

_Params = dict[str, torch.Tensor]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → ``cuda`` when available else ``cpu``; checks that CUDA exists when asked."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto", param="device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but CUDA is not available here; use device='cpu'",
                         param="device")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``float32``/``float64`` (or a torch dtype, or None: keep the model's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64, "double": torch.float64, "float": torch.float32}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}: use float32 or float64", param="dtype")
    return table[dtype]


def as_source(inputs: Inputs | DataSource, targets: torch.Tensor | None) -> DataSource:
    """``inputs``/``targets`` as a :class:`~basins.engine.data.DataSource` (tensors become :class:`TensorData`); not empty."""
    if isinstance(inputs, DataSource):
        if targets is not None:
            raise InputError("pass either a DataSource or (inputs, targets) tensors, not both", param="targets")
        source = inputs
    else:
        if targets is None:
            raise InputError("targets are missing: Problem(module, inputs, targets, loss)", param="targets")
        source = TensorData(inputs, targets)
    if source.num_examples == 0:
        raise InputError("the dataset is empty")
    return source


class ProblemSetup(ChunkReader):
    """The construction steps of a Problem (module docstring)."""

    # provided by Problem
    counters: Any
    _gather_fn: Callable[[Any], list[Any]] | None
    loss: Callable[..., torch.Tensor]
    grad: Callable[..., torch.Tensor]
    gather: Callable[[Any], list[Any]]
    reduce: Callable[[torch.Tensor], torch.Tensor]

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
            raise InputError(f"total_examples = {self.num_examples} is less than the {self.num_local_examples} examples given",
                             param="total_examples")
        if self._gather_fn is not None and sum(self.gather(self.num_local_examples)) != self.num_examples:
            raise InputError(f"the processes' shards do not add up to total_examples = {self.num_examples}",
                             param="total_examples")
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
        self._cached = None
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
                "check the model's outputs (overflow in float32? try dtype='float64') and the loss"
            )
        g = self.grad()
        self.grad_norm = float(g.norm())
        if not math.isfinite(self.grad_norm):
            raise ComputeError("the gradient at the saved parameters is not finite")
        if check_determinism:
            self._check_determinism(g)

    def _choose_batch_size(self, batch_size: int | None) -> int:
        if self.fixed_batch_size is not None:
            return self.fixed_batch_size
        default = self.data.default_batch_size or self.num_local_examples
        return min(batch_size or default, self.num_local_examples)

    def _fit_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Check the first targets against the model's outputs, and fix what every chunk's targets
        are brought to: per-example shape (``(n,)`` → ``(n, 1)`` where unambiguous) and dtype."""
        if targets.is_floating_point():
            targets = targets.to(self.dtype)
        head = self._checked_targets(outputs, targets[: outputs.shape[0]], self.data.first_index)
        self._target_spec = (tuple(head.shape[1:]), head.dtype)
        self._output_spec = (tuple(outputs.shape[1:]), outputs.dtype)

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
