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

Layout: this module holds the public quantities (loss, gradient, HVPs, batched loss), the
process collectives and the route attributes; the construction steps are
:class:`basins.engine.setup.ProblemSetup`, the chunk loop and its cache
:class:`basins.engine.chunks.ChunkReader` (both base classes of :class:`Problem`); the HVP routes
live in :mod:`basins.engine.routes`, memory in :mod:`basins.engine.memory`, validation in
:mod:`basins.engine.data`, named inputs and output picking in :mod:`basins.engine.batch`, the
attention path in :mod:`basins.engine.attention`, the curvature operators in
:mod:`basins.engine.curvature`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import vmap

from basins.engine.attention import math_attention
from basins.engine.batch import Inputs, call_model
from basins.engine.data import DataSource
from basins.engine.losses import LossFn, split_loss_value
from basins.engine.precision import PromoteToFloat64
from basins.engine.routes import HVP_ROUTES, Routes, float64_products
from basins.engine.setup import ProblemSetup, as_source, resolve_device, resolve_dtype
from basins.errors import InputError
from basins.progress import ProgressCallback, relay

__all__ = ["Problem", "HVP_ROUTES", "Counters", "counted", "resolve_device", "resolve_dtype"]

_Params = dict[str, torch.Tensor]

#: The factor of :meth:`Problem.rescaled_residuals` (1 + 3/8: not a power of two).
RESCALE = 1.375


@dataclass
class Counters:
    """Work done so far, in units users can compare across runs: everything computed, the
    construction's checks and the HVP route choice included (a product over a piece of the data,
    as when routes are timed, counts as one)."""

    num_hvps: int = 0  # single Hessian-vector products (a block of K counts K)
    num_loss_evals: int = 0  # full-data loss evaluations (a batch of K points counts K)
    num_grads: int = 0  # full-data gradients
    num_ggn_products: int = 0  # generalised Gauss–Newton products (basins.engine.curvature.GGNOperator)

    def as_dict(self) -> dict[str, int]:
        return {"num_hvps": self.num_hvps, "num_loss_evals": self.num_loss_evals, "num_grads": self.num_grads,
                "num_ggn_products": self.num_ggn_products}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """The work done since ``before`` (an earlier :meth:`as_dict`), counter by counter."""
        return {name: n - int(before.get(name, 0)) for name, n in self.as_dict().items()}


def counted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an analysis ``fn(problem, ...)`` whose result has a ``work`` dict: after the call,
    ``result.work`` is what ``problem.counters`` counted during it (:meth:`Counters.since`), so a
    result's counts are the work actually done, never a number the analysis asserts."""

    @functools.wraps(fn)
    def wrapper(problem: Any, *args: Any, **kwargs: Any) -> Any:
        counters = getattr(problem, "counters", None)
        before = counters.as_dict() if isinstance(counters, Counters) else None
        result = fn(problem, *args, **kwargs)
        if before is not None:
            result.work = counters.since(before)
        return result

    return wrapper


class Problem(ProblemSetup):
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
            raise InputError(f"unknown hvp_route {hvp_route!r}: use one of {', '.join(HVP_ROUTES)}", param="hvp_route")
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size}", param="batch_size")
        self.counters = Counters()
        self._reduce_fn, self._gather_fn = reduce, gather
        self._data_memory_bytes = data_memory_bytes
        self.output = output
        #: layers whose requests for a narrower dtype are served in float64 (float64 problems only;
        #: :meth:`_promote_narrow_requests`)
        self.promoted_layers: list[str] = []
        self._setup_parameters(module, resolve_device(device), resolve_dtype(dtype), params, include_frozen)
        self._setup_data(as_source(inputs, targets), total_examples, fixed_batch_size, batch_size)
        self._setup_loss(loss)
        self._promote_narrow_requests()
        self._check_at_optimum(check_determinism)
        #: the HVP routes (:mod:`basins.engine.routes`): chosen now, for single vectors
        self.routes = Routes(self, hvp_route, graph_memory_bytes, memory_bytes)

    def _promote_narrow_requests(self) -> None:
        """A float64 problem whose model asks for float32 inside (Llama's RMSNorm, a float32
        softmax) runs under :class:`~basins.engine.precision.PromoteToFloat64`, as the float64
        function it is meant to be; :attr:`promoted_layers` names where (empty: nothing promoted).
        Cost: one forward on one example (the dtype audit), twice when something is promoted."""
        from basins.engine.precision import audit_precision, forget_audit

        if self.dtype != torch.float64:
            return
        audit = audit_precision(self)
        if audit.mixed:
            self.promoted_layers = list(audit.layers)
            forget_audit(self)

    # ------------------------------------------------------------------ functional pieces
    def forward(self, params: _Params, x: Inputs, buffers: _Params | None = None) -> torch.Tensor:
        """Model outputs ``f(x; params)`` for a batch ``x`` (a tensor, or named inputs passed as
        keyword arguments; the state not in ``params`` fixed at θ*, or ``buffers``), picked from
        the model's return value (:attr:`output`), attention on its differentiable path."""
        with math_attention(), (PromoteToFloat64() if self.promoted_layers else contextlib.nullcontext()):
            return call_model(self.module, (params, self.buffers if buffers is None else buffers), x, self.output)

    def loss_value(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss' mean over a chunk's averaged terms (a ``(sum, count)`` loss: ``sum / count``)."""
        return split_loss_value(self.loss_fn(outputs, targets))[0]

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
    @property
    def distributed(self) -> bool:
        """True when results are summed over processes (:meth:`reduce` is not the identity)."""
        return self._reduce_fn is not None

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
        # (a large one-time import per process), which a run on the graph route never needs
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
            raise InputError(f"unknown HVP route {route!r}: use one of {', '.join(HVP_ROUTES[1:])}", param="route")
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
            raise InputError(f"unknown loss_many route {route!r}: use vmap or loop", param="route")
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
