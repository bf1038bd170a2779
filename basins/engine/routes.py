"""Exact Hessian-vector product routes of a :class:`~basins.engine.problem.Problem`, their timing
and the processes' agreement on one.

Three routes compute the same ``H V`` (up to rounding) over the full data:

* ``graph``: the gradient graph is built once with ``create_graph=True`` over every chunk, then
  each HVP is one backward through it (fastest on CPU; memory ∝ n, so only when it fits the
  :func:`~basins.engine.memory.memory_budget` and the data are held in memory);
* ``fwd-rev``: ``jvp`` of ``grad`` per chunk (a block of vectors is ``vmap``-ed);
* ``rev-rev``: ``vjp`` of ``grad`` per chunk (likewise).

``auto`` costs at most about one HVP at start-up, and no full-size trial unless the graph fits:

* the bytes a ``create_graph`` gradient saves per example are measured on one and on two examples
  (two small gradients; their difference is the per-example part, so weights saved by the nodes are
  not multiplied by n). With them the memory plan (:class:`~basins.engine.memory.MemoryPlan`)
  predicts the graph's size and the largest HVP piece (examples × vmapped vectors) that fits;
* when the data are held in memory and the gradient graph fits the plan (and
  ``graph_memory_bytes``), ``graph`` is built and taken after one check product (timed; one HVP).
  It cannot lose: each of its HVPs is the double backward that the functional routes also do,
  without their repeated forward and first backward. When one chunk is all the data (a
  fixed-batch export), the graph itself is built and the storages it holds are counted by
  :func:`saved_bytes` instead;
* otherwise ``fwd-rev`` and ``rev-rev`` are each timed once on a slice of the data (one example,
  or the first chunk of a model exported for a fixed batch: 2/n of one HVP), and the faster one
  that works is taken. Each timing is counted as one HVP (an over-count on a slice, never an
  under-count).

Timing runs on this process' shard alone (no collective: processes may try different routes);
the processes then agree on a route that works everywhere, fastest on the slowest process.
Blocks of vectors use the same route (vmapped for the functional routes). Every product
computed here, timing and checks included, is counted in ``problem.counters.num_hvps``.
See README "Architecture".
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.func import grad, jvp, vjp, vmap

from basins.engine.batch import floating, take
from basins.engine.memory import (
    DISK_BASIS_VECTORS,
    HVP_VECTORS,
    MAX_PIECE_BLOCK,
    MemoryPlan,
    hvp_piece_bytes,
    memory_budget,
    plan_budget,
    resident_bytes,
)
from basins.errors import ComputeError, InputError

if TYPE_CHECKING:
    from basins.engine.problem import Problem

__all__ = ["HVP_ROUTES", "Routes"]

#: Exact HVP routes. ``auto`` measures the viable ones.
HVP_ROUTES = ("auto", "graph", "fwd-rev", "rev-rev")

_Params = dict[str, torch.Tensor]


#: rev-rev is taken over fwd-rev only when it is faster by more than this factor's margin.
REV_REV_MARGIN = 1.25
#: Examples of the piece the functional routes are timed on (without a fixed batch size): one, so
#: that the choice costs a slice of one HVP on a large model (each timing still counts as one HVP).
TIMING_EXAMPLES = 1


class Routes:
    """The HVP routes of one problem: compute ``H V`` by a named route, and choose one.

    Args:
        problem: the problem whose chunks, parameters, counters and collectives the routes use.
        requested: one of :data:`HVP_ROUTES`.
        graph_memory_bytes: budget for the cached gradient graph (default: :func:`memory_budget`).
        memory_bytes: the whole computation's budget (default :func:`~basins.engine.memory.plan_budget`).

    Attributes:
        single: the route chosen at construction (for single vectors and blocks).
        block: the same route (kept for reports).
        timings: seconds per HVP measured (on the data or a piece of it, see module docstring);
        errors: why other routes were not taken.
    """

    def __init__(self, problem: Problem, requested: str, graph_memory_bytes: int | None,
                 memory_bytes: int | None = None) -> None:
        if requested not in HVP_ROUTES:
            raise InputError(f"unknown hvp_route {requested!r}: use one of {', '.join(HVP_ROUTES)}", param="hvp_route")
        # a weak reference: no Problem ↔ Routes cycle, so that a Problem (and its gradient graph)
        # is freed as soon as it is dropped, not by a garbage collection at interpreter exit (after
        # the process group is torn down, which made gloo abort)
        self.problem: Problem = weakref.proxy(problem)
        self.requested = requested
        self.timings: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self._graph_memory_bytes = graph_memory_bytes
        self._memory_bytes = memory_bytes
        self._graph: torch.Tensor | None = None
        self._graph_leaves: list[torch.Tensor] | None = None
        self._per_example: float | None = None
        self._saved_fixed = 0
        self._graph_need = 0
        #: examples per functional HVP piece (None: whole chunks) and vectors vmapped per piece (the plan's)
        self.piece_rows: int | None = None
        self.piece_block: int = MAX_PIECE_BLOCK
        #: the memory plan (:class:`~basins.engine.memory.MemoryPlan`), made with the route choice
        self.plan: MemoryPlan
        self.single = self._choose()
        self.block: str = self.single

    # ------------------------------------------------------------------ computing
    def compute(self, V: torch.Tensor, route: str, *, reduce: bool = True,
                chunks: Iterable[tuple[Any, torch.Tensor, int, float]] | None = None) -> torch.Tensor:
        """``H V`` for a ``(P, K)`` block by ``route``; summed over processes when ``reduce``.

        ``chunks``: the ``(x, y, num_real, weight)`` chunks to sum over (default: all of this
        process' data). A functional route splits chunks into pieces of at most
        :attr:`piece_rows` examples and the block into groups of :attr:`piece_block` vectors
        (the memory plan's, :mod:`basins.engine.memory`). Counts K HVPs in ``problem.counters``.
        """
        p = self.problem
        if route == "graph":
            out = self._graph_hvp(V)
        else:
            out = torch.zeros_like(V)
            block = self.piece_block
            for x, y, m, w in split_chunks(p, p.chunks() if chunks is None else chunks, self.piece_rows):
                for s in range(0, V.shape[1], block):
                    Vd = p.space.unflatten(V[:, s : s + block].T.contiguous())  # {name: (K, *shape)}
                    out[:, s : s + block] += w * p.space.flatten(self._chunk_hvp(x, y, m, Vd, route)).T
        p.counters.num_hvps += V.shape[1]
        return p.reduce(out) if reduce else out

    def _chunk_hvp(self, x: Any, y: torch.Tensor, m: int, Vd: _Params, route: str) -> _Params:
        """``H_c V`` for one chunk by a functional route (:func:`functional_hvp`)."""
        p = self.problem
        return functional_hvp(p._chunk_loss, p.params, x, y, m, Vd, route)

    def _build_graph(self) -> None:
        """The full-data gradient with ``create_graph=True``, chunk by chunk (kept for :meth:`_graph_hvp`)."""
        p = self.problem
        leaves = [t.detach().clone().requires_grad_(True) for t in p.params.values()]
        params = dict(zip(p.space.names, leaves))
        g_total: torch.Tensor | None = None
        with torch.enable_grad():
            for x, y, m, w in p.chunks():
                loss = p._chunk_loss(params, x, y, m) * w
                gs = torch.autograd.grad(loss, leaves, create_graph=True)
                flat = torch.cat([g.reshape(-1) for g in gs])
                g_total = flat if g_total is None else g_total + flat
        self._graph, self._graph_leaves = g_total, leaves

    def _saved(self, x: Any, y: torch.Tensor, m: int) -> int:
        """Bytes a ``create_graph`` gradient on ``(x, y)`` saves, counted by a saved-tensors hook on
        a graph thrown away at once (hooks must not stay on the kept graph). Cost: one gradient on
        ``m`` examples (not an HVP)."""
        p = self.problem
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            # detached: a node holding its own output (with its grad_fn) through a hook is a reference
            # cycle in C++ that no garbage collection frees, and it kept the data chunk alive. The
            # gradients of this throwaway graph are not used, only the bytes counted.
            return t.detach()

        leaves = [t.detach().clone().requires_grad_(True) for t in p.params.values()]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = p._chunk_loss(dict(zip(p.space.names, leaves)), x, y, m)
            torch.autograd.grad(loss, leaves, create_graph=True)
        return saved

    def saved_per_example(self, piece: list[tuple[Any, torch.Tensor, int, float]] | None = None) -> float:
        """Bytes a ``create_graph`` gradient saves per example; also sets the part that does not grow
        with the examples (weights saved by their nodes, masks). Measured on one and on two examples
        (the difference is the per-example part); a fixed-batch model's chunk (or ``piece``) is
        measured once and counted as per-example. Cost: at most two gradients on 1–2 examples."""
        p = self.problem
        (x, y, m, _), = piece if piece is not None else self._piece()
        if p.fixed_batch_size is not None or piece is not None or p.num_local_examples < 2:
            self._saved_fixed = 0
            return self._saved(x, y, m) / m
        x2, y2 = next(p.chunks())[:2]
        if int(y2.shape[0]) < 2:
            self._saved_fixed = 0
            return self._saved(x, y, m) / m
        s1 = self._saved(x, y, m)
        s2 = self._saved(take(x2, 0, 2), y2[:2], 2)
        per = max(s2 - s1, 0)
        self._saved_fixed = max(s1 - per, 0)
        return float(per) if per > 0 else float(s1)

    def graph_bytes(self, piece: list[tuple[Any, torch.Tensor, int, float]] | None = None) -> int:
        """Estimated bytes of the full-data gradient graph: :meth:`saved_per_example` scaled to this
        process' examples, plus the fixed part and two parameter vectors."""
        p = self.problem
        per_example = self.saved_per_example(piece)
        self._per_example = per_example
        return int(per_example * self._rows()) + self._saved_fixed + 2 * p.num_params * p.dtype.itemsize

    def _rows(self) -> int:
        """Rows the model sees in one pass over this process' data (padding included)."""
        p = self.problem
        return p.num_chunks * p.fixed_batch_size if p.fixed_batch_size is not None else p.num_local_examples

    def _graph_hvp(self, V: torch.Tensor) -> torch.Tensor:
        if self._graph is None:
            self._build_graph()
        assert self._graph is not None and self._graph_leaves is not None
        cols = []
        for j in range(V.shape[1]):
            # the gradient of the scalar gᵀv, not of g with grad_outputs=v: the same products (the dot's
            # backward hands v on exactly), and torch.autograd.grad imports sympy (~0.3 s, 34 MiB) to
            # check grad_outputs' shapes
            dot = torch.dot(self._graph, V[:, j].to(self._graph.dtype))
            hs = torch.autograd.grad(dot, self._graph_leaves, retain_graph=True, allow_unused=True)
            cols.append(torch.cat([
                (h if h is not None else torch.zeros_like(t)).reshape(-1) for h, t in zip(hs, self._graph_leaves)
            ]))
        return torch.stack(cols, dim=1)

    def free_graph(self) -> None:
        """Drop the cached gradient graph (it holds activations of every chunk)."""
        self._graph = self._graph_leaves = None

    # ------------------------------------------------------------------ choosing
    def for_block(self, V: torch.Tensor) -> str:
        """The route for a ``(P, K)`` block: the one chosen at construction."""
        return self.block

    def _choose(self) -> str:
        """The route, and the memory plan (:class:`~basins.engine.memory.MemoryPlan`) it fits."""
        p = self.problem
        isz, P = p.dtype.itemsize, p.num_params
        budget = plan_budget(self._memory_bytes, p.device)
        resident = resident_bytes(p.device)
        # the least a Lanczos run needs next to the HVP (its basis streamed from disk)
        free = budget - resident - DISK_BASIS_VECTORS * P * isz
        # the gradient graph holds every chunk: not chosen for data read again on every pass (taken when asked)
        graph_ok = self.requested == "graph" or (self.requested == "auto" and not p.streaming)
        if graph_ok:
            cap = min(free - HVP_VECTORS * P * isz,
                      memory_budget(self._graph_memory_bytes, p.device) if self.requested == "auto" else free)
            self._try_graph(cap)
        if self._per_example is None:
            try:
                self._per_example = self.saved_per_example()
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - a model create_graph cannot follow: plan with parameters only
                self._per_example = 0.0
                self.errors.setdefault("plan", f"activations not measured: {type(exc).__name__}: {exc}")
        refusal = self._fit_pieces(free, budget, resident)
        if self.requested == "graph" and self._graph is None:
            refusal = ("the HVP route graph does not fit: " + self.errors.get("graph", "")
                       + "; use hvp_route='fwd-rev', or raise memory_bytes")
        refusals = [r for r in p.gather(refusal) if r]  # every process refuses together (no half-run collective)
        if refusals:
            raise InputError(refusals[0],
                             param="hvp_route" if refusals[0].startswith("the HVP route") else "memory_bytes")
        if self.requested != "auto":
            if self.requested != "graph":
                self._time(self.requested, strict=True, piece=True)
            return self._planned(self.requested, budget, resident)
        views: list[dict[str, float]] = p.gather(dict(self.timings))
        if all("graph" in v for v in views):
            return self._planned("graph", budget, resident)
        self.free_graph()  # some process could not hold it: all use a functional route
        _warm_up_functorch()  # its one-time imports must not be timed as fwd-rev's cost
        for route in ("fwd-rev", "rev-rev"):
            self._time(route, strict=False, piece=True)
        views = p.gather({r: t for r, t in self.timings.items() if r != "graph"})
        common = [r for r in HVP_ROUTES[2:] if all(r in v for v in views)]
        if not common and len(views) > 1:
            raise ComputeError("no Hessian-vector product route works on every process: " + repr(views))
        if not common:
            raise ComputeError(
                "no Hessian-vector product route works for this model and loss: "
                + "; ".join(f"{k}: {v}" for k, v in self.errors.items())
            )
        # fwd-rev unless rev-rev is clearly faster: timings that differ by noise must not flip the
        # choice between runs (the routes round differently)
        route = min(common, key=lambda r: max(v[r] for v in views) * (1.0 if r == "fwd-rev" else REV_REV_MARGIN))
        return self._planned(route, budget, resident)

    def _fit_pieces(self, free: int, budget: int, resident: int) -> str | None:
        """The largest functional HVP piece (examples × vmapped vectors) that fits ``free`` bytes:
        the block is halved first, then the examples; a model exported for a fixed batch keeps its chunk.

        Returns:
            None, or why nothing fits (one line naming the sizes) when not even one example and one
            vector do and the graph is not held.
        """
        p = self.problem
        isz, P = p.dtype.itemsize, p.num_params
        pe = float(self._per_example or 0.0)
        rows, block = p.batch_size, MAX_PIECE_BLOCK
        while block > 1 and hvp_piece_bytes(pe, rows, block, P, isz) > free:
            block //= 2
        while p.fixed_batch_size is None and rows > 1 and hvp_piece_bytes(pe, rows, block, P, isz) > free:
            rows = -(-rows // 2)
        need = hvp_piece_bytes(pe, rows, block, P, isz)
        if need > free and self._graph is None:
            least = resident + need + DISK_BASIS_VECTORS * P * isz
            return (f"nothing fits the memory budget of {budget / 2**30:.2f} GiB: one Hessian-vector product over "
                    f"{rows} example(s) needs about {least / 2**30:.2f} GiB with the model ({P:,} parameters) and "
                    "the smallest Lanczos workspace; raise memory_bytes, or select fewer parameters (params) or use "
                    "shorter inputs")
        self.piece_rows = None if rows >= p.batch_size else rows
        self.piece_block = block
        return None

    def _planned(self, route: str, budget: int, resident: int) -> str:
        """Record the plan for ``route`` and return it."""
        p = self.problem
        isz, P = p.dtype.itemsize, p.num_params
        if route == "graph":
            graph, hvp = self._graph_need, HVP_VECTORS * P * isz
        else:
            graph = 0
            hvp = hvp_piece_bytes(float(self._per_example or 0.0), self.piece_rows or p.batch_size, self.piece_block,
                                  P, isz)
        self.plan = MemoryPlan(budget=budget, given=self._memory_bytes is not None, device=str(p.device),
                               resident=resident, per_example=int(self._per_example or 0), route=route, graph=graph,
                               piece_rows=self.piece_rows, piece_block=self.piece_block, hvp=hvp)
        return route

    def _try_graph(self, budget: int) -> None:
        """Build the gradient graph if it fits ``budget`` bytes, and time one product through it."""
        p = self.problem
        try:
            piece = self._piece()
            whole = p.num_chunks == 1 and piece[0][2] == p.num_local_examples  # the piece would be all the data
            if whole:
                # the estimate would build this very graph on the piece and throw it away: one more
                # gradient pass, and the freed memory's fragments raised the peak RSS by ~100 MiB on the
                # CNN benchmark. Build it once and count the tensors it holds instead.
                self._build_graph()
                assert self._graph is not None
                held = saved_bytes(self._graph)
                self._per_example = held / self._rows()
                need = held + 2 * p.num_params * p.dtype.itemsize
            else:
                need = self.graph_bytes(piece)
            self._graph_need = need
            if need > budget:
                self.free_graph()
                self.errors["graph"] = (f"the gradient graph needs about {need / 2**20:.0f} MiB, more than its "
                                        f"budget of {max(budget, 0) / 2**20:.0f} MiB")
                return
            if not whole:
                self._build_graph()
            self._time("graph", strict=self.requested == "graph")
        except InputError:  # the data changed under us: not a route failure
            raise
        except ComputeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model that cannot double-backward
            self.free_graph()
            self.errors["graph"] = f"{type(exc).__name__}: {exc}"

    def _piece(self) -> list[tuple[torch.Tensor, torch.Tensor, int, float]]:
        """At most :data:`TIMING_EXAMPLES` examples of the first chunk (the whole chunk for a fixed batch size)."""
        p = self.problem
        x, y, m, w = next(p.chunks())
        if p.fixed_batch_size is None and m > TIMING_EXAMPLES:
            k = TIMING_EXAMPLES
            xk, yk = take(x, 0, k), y[:k]
            return [(xk, yk, k, p.piece_weight(xk, yk, k))]  # type: ignore[list-item]
        return [(x, y, m, w)]  # type: ignore[list-item]

    def _time(self, route: str, *, strict: bool, piece: bool = False) -> None:
        """Time one HVP by ``route`` on this shard (or on :meth:`_piece`); record failures."""
        p = self.problem
        gen = torch.Generator().manual_seed(12345)
        v = torch.randn(p.num_params, 1, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
        try:
            chunks = self._piece() if piece else None
            t0 = time.perf_counter()
            self.compute(v, route, reduce=False, chunks=chunks)
            self.timings[route] = time.perf_counter() - t0
        except InputError:  # the data changed under us: not a route failure
            raise
        except Exception as exc:
            self.errors[route] = f"{type(exc).__name__}: {exc}"
            if strict:
                raise ComputeError(f"HVP route {route!r} fails for this model/loss: {type(exc).__name__}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        """Routes chosen, timings and failures, for logs."""
        return {"single": self.single, "block": self.block, "timings": dict(self.timings), "errors": dict(self.errors)}


def _warm_up_functorch() -> None:
    """Run ``jvp`` and ``vjp`` of ``grad`` once on a scalar: torch.func imports torch._dynamo on its first
    call (about a second, several on a busy machine), which the first timed route would otherwise pay."""
    one = torch.ones((), dtype=torch.float64)
    g = grad(lambda t: (t * t * t).sum())
    jvp(g, (one,), (one,))
    vjp(g, one)[1](one)


def saved_bytes(root: torch.Tensor) -> int:
    """Bytes of the distinct storages an autograd graph holds for its backward: the tensors
    saved by every node reachable from ``root.grad_fn`` (``_saved_*`` attributes of built-in
    nodes, ``saved_tensors`` of custom functions), each storage counted once. Parameters saved by
    a node are counted too. Cost: one walk over the graph's nodes, no arithmetic."""
    seen: set[Any] = set()
    storages: set[int] = set()
    total = 0
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values = []
        for name in dir(node):
            if name.startswith("_saved_") or name == "saved_tensors":
                try:
                    values.append(getattr(node, name))
                except Exception:  # noqa: BLE001 - a freed or unreadable saved value
                    continue
        for value in values:
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in storages:
                        storages.add(storage.data_ptr())
                        total += storage.nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return total


#: Examples per float64 check pass (models without a fixed batch size): bounds its memory.
CHECK_EXAMPLES = 64


def functional_hvp(chunk_loss: Callable[..., torch.Tensor], params: _Params, x: Any, y: torch.Tensor, m: int,
                   Vd: _Params, route: str) -> _Params:
    """``H_c V`` of one chunk's loss by a functional route, in the dtype of ``params``: the one HVP
    implementation of the ``fwd-rev`` and ``rev-rev`` routes (problem dtype and float64 checks alike).

    Args:
        chunk_loss: ``(params, x, y, m) -> scalar`` (the chunk's mean loss).
        params: the point ``{name: tensor}``.
        Vd: K vectors as ``{name: (K, *shape)}`` (vmapped when K > 1).
        route: ``fwd-rev`` (``jvp`` of ``grad``) or ``rev-rev`` (``vjp`` of ``grad``).

    Returns:
        ``{name: (K, *shape)}``. Cost: K HVPs on the chunk.
    """
    g_fn = grad(chunk_loss)

    def chunk_grad(prm: _Params) -> _Params:
        return g_fn(prm, x, y, m)

    if route == "fwd-rev":

        def one(vd: _Params) -> _Params:
            return jvp(chunk_grad, (params,), (vd,))[1]

    else:
        pullback = vjp(chunk_grad, params)[1]

        def one(vd: _Params) -> _Params:
            return pullback(vd)[0]

    if next(iter(Vd.values())).shape[0] > 1:
        return vmap(one)(Vd)
    return {k: t.unsqueeze(0) for k, t in one({k: t[0] for k, t in Vd.items()}).items()}


def split_chunks(problem: Problem, chunks: Iterable[tuple[Any, torch.Tensor, int, float]], rows: int | None,
                 dtype: torch.dtype | None = None) -> Iterator[tuple[Any, torch.Tensor, int, float]]:
    """``chunks`` cut into pieces of at most ``rows`` examples (None: whole chunks; a model exported
    for a fixed batch size is never cut), each with its weight in the full-data mean; floating data
    cast to ``dtype`` when given."""
    p = problem
    for x, y, m, w in chunks:
        if dtype is not None:
            x = floating(x, dtype)
            y = y.to(dtype) if y.is_floating_point() else y
        if rows is None or p.fixed_batch_size is not None or m <= rows:
            yield x, y, m, w
            continue
        for a in range(0, m, rows):
            b = min(a + rows, m)
            xa, ya = take(x, a, b), y[a:b]
            yield xa, ya, b - a, p.piece_weight(xa, ya, b - a)


def float64_products(problem: Problem, V: torch.Tensor) -> torch.Tensor:
    """``H V`` in float64 for a ``(P, K)`` block: the float64 check product of a lower-precision problem.

    The parameters, buffers and each chunk's floating-point data are cast to float64 on the fly
    (no float64 copy of the data is kept). The product is :func:`functional_hvp` by the functional
    route the problem uses (``fwd-rev`` when it uses ``graph``; the other one if it fails). Memory:
    the K vectors are vmapped over pieces of at most :data:`CHECK_EXAMPLES` examples (fewer when
    the memory plan says so); for a model exported for a fixed batch, one vector at a time over
    whole chunks. The cached gradient graph is freed first (rebuilt by the next HVP), so that the
    peak is one of the two. Cost: K HVPs at float64 speed, counted in ``problem.counters.num_hvps``.

    Returns:
        ``(P, K)`` float64, summed over processes.
    """
    p = problem
    f64 = torch.float64
    p.routes.free_graph()
    params = {k: t.to(f64) for k, t in p.params.items()}
    buffers = {k: (t.to(f64) if t.is_floating_point() else t) for k, t in p.buffers.items()}
    V = V.to(p.device, f64)

    def chunk_loss(prm: _Params, x: Any, y: torch.Tensor, m: int) -> torch.Tensor:
        out = p.forward(prm, x, buffers)
        return p.loss_value(out[:m] if out.shape[0] != m else out, y)

    rows = min(CHECK_EXAMPLES, p.routes.piece_rows or CHECK_EXAMPLES)
    block = 1 if p.fixed_batch_size is not None else min(V.shape[1], p.routes.piece_block)

    def product(route: str) -> torch.Tensor:
        out = torch.zeros_like(V)
        for x, y, m, w in split_chunks(p, p.chunks(), rows, f64):
            for s in range(0, V.shape[1], block):
                Vd = p.space.unflatten(V[:, s : s + block].T.contiguous())
                out[:, s : s + block] += w * p.space.flatten(functional_hvp(chunk_loss, params, x, y, m, Vd, route)).T
        return out

    routes = ["fwd-rev", "rev-rev"] if p.hvp_route in ("graph", "fwd-rev") else ["rev-rev", "fwd-rev"]
    for i, route in enumerate(routes):
        try:
            out = product(route)
            break
        except InputError:
            raise
        except Exception:  # noqa: BLE001 - e.g. jvp of a loss that forward mode cannot do
            if i == len(routes) - 1:
                raise
    p.counters.num_hvps += V.shape[1]
    return p.reduce(out)
