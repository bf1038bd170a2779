"""Exact Hessian-vector product routes of a :class:`~basins.engine.problem.Problem`, their timing
and the processes' agreement on one.

Three routes compute the same ``H V`` (up to rounding) over the full data:

* ``graph``: the gradient graph is built once with ``create_graph=True`` over every chunk, then
  each HVP is one backward through it (fastest on CPU; memory ∝ n, so only when it fits the
  :func:`~basins.engine.memory.memory_budget` and the data are held in memory);
* ``fwd-rev``: ``jvp`` of ``grad`` per chunk (a block of vectors is ``vmap``-ed);
* ``rev-rev``: ``vjp`` of ``grad`` per chunk (likewise).

``auto`` costs at most about two HVPs at start-up:

* when the data are held in memory and the gradient graph fits the budget (its bytes
  estimated from a ``create_graph`` gradient on a small piece of the data; when that piece would
  be all the data, one chunk of a fixed-batch export, the graph itself is built and the
  storages it holds are counted by :func:`saved_bytes`), ``graph`` is built
  and taken after one check product (timed). It cannot lose: each of its HVPs is the double backward that the functional routes
  also do, without their repeated forward and first backward;
* otherwise ``fwd-rev`` and ``rev-rev`` are each timed once on a small piece of the data (at most
  64 examples of the first chunk, or the first chunk of a model exported for a fixed batch), and
  the faster one that works is taken.

Timing runs on this process' shard alone (no collective: processes may try different routes);
the processes then agree on a route that works everywhere, fastest on the slowest process.
Blocks of vectors use the same route (vmapped for the functional routes). Every product
computed here, timing and checks included, is counted in ``problem.counters.num_hvps``.
See README "Architecture".
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.func import grad, jvp, vjp, vmap

from basins.engine.batch import floating, take
from basins.engine.memory import memory_budget
from basins.errors import ComputeError, InputError

if TYPE_CHECKING:
    from basins.engine.problem import Problem

__all__ = ["HVP_ROUTES", "Routes"]

#: Exact HVP routes. ``auto`` measures the viable ones.
HVP_ROUTES = ("auto", "graph", "fwd-rev", "rev-rev")

_Params = dict[str, torch.Tensor]


#: rev-rev is taken over fwd-rev only when it is faster by more than this factor's margin.
REV_REV_MARGIN = 1.25
#: Examples of the piece the functional routes are timed on (without a fixed batch size).
TIMING_EXAMPLES = 64


class Routes:
    """The HVP routes of one problem: compute ``H V`` by a named route, and choose one.

    Args:
        problem: the problem whose chunks, parameters, counters and collectives the routes use.
        requested: one of :data:`HVP_ROUTES`.
        graph_memory_bytes: budget for the cached gradient graph (default: :func:`memory_budget`).

    Attributes:
        single: the route chosen at construction (for single vectors and blocks).
        block: the same route (kept for reports).
        timings: seconds per HVP measured (on the data or a piece of it, see module docstring);
        errors: why other routes were not taken.
    """

    def __init__(self, problem: Problem, requested: str, graph_memory_bytes: int | None) -> None:
        if requested not in HVP_ROUTES:
            raise InputError(f"unknown HVP route {requested!r}: use one of {', '.join(HVP_ROUTES)}")
        # a weak reference: no Problem ↔ Routes cycle, so that a Problem (and its gradient graph)
        # is freed as soon as it is dropped, not by a garbage collection at interpreter exit (after
        # the process group is torn down, which made gloo abort)
        self.problem: Problem = weakref.proxy(problem)
        self.requested = requested
        self.timings: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self._graph_memory_bytes = graph_memory_bytes
        self._graph: torch.Tensor | None = None
        self._graph_leaves: list[torch.Tensor] | None = None
        self.single = self._choose()
        self.block: str = self.single

    # ------------------------------------------------------------------ computing
    def compute(self, V: torch.Tensor, route: str, *, reduce: bool = True,
                chunks: Iterable[tuple[Any, torch.Tensor, int, float]] | None = None) -> torch.Tensor:
        """``H V`` for a ``(P, K)`` block by ``route``; summed over processes when ``reduce``.

        ``chunks``: the ``(x, y, num_real, weight)`` chunks to sum over (default: all of this
        process' data). Counts K HVPs in ``problem.counters``.
        """
        p = self.problem
        if route == "graph":
            out = self._graph_hvp(V)
        else:
            out = torch.zeros_like(V)
            Vd = p.space.unflatten(V.T)  # {name: (K, *shape)}
            for x, y, m, w in (p.chunks() if chunks is None else chunks):
                out += w * p.space.flatten(self._chunk_hvp(x, y, m, Vd, route)).T
        p.counters.num_hvps += V.shape[1]
        return p.reduce(out) if reduce else out

    def _chunk_hvp(self, x: Any, y: torch.Tensor, m: int, Vd: _Params, route: str) -> _Params:
        """``H_c V`` for one chunk by a functional route; ``Vd`` holds K vectors as ``{name: (K, *shape)}``."""
        p = self.problem
        g_fn = grad(p._chunk_loss)

        def chunk_grad(params: _Params) -> _Params:
            return g_fn(params, x, y, m)

        if route == "fwd-rev":

            def one(vd: _Params) -> _Params:
                return jvp(chunk_grad, (p.params,), (vd,))[1]

        else:
            pullback = vjp(chunk_grad, p.params)[1]

            def one(vd: _Params) -> _Params:
                return pullback(vd)[0]

        if next(iter(Vd.values())).shape[0] > 1:
            return vmap(one)(Vd)
        return {k: t.unsqueeze(0) for k, t in one({k: t[0] for k, t in Vd.items()}).items()}

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

    def graph_bytes(self, piece: list[tuple[Any, torch.Tensor, int, float]] | None = None) -> int:
        """Estimated bytes of the full-data gradient graph: the tensors saved for a
        ``create_graph`` gradient on ``piece`` (default :meth:`_piece`; counted by a saved-tensors
        hook, on a graph thrown away at once: hooks must not stay on the kept graph), scaled to this
        process' examples, plus two parameter vectors."""
        p = self.problem
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        (x, y, m, _), = piece if piece is not None else self._piece()
        leaves = [t.detach().clone().requires_grad_(True) for t in p.params.values()]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = p._chunk_loss(dict(zip(p.space.names, leaves)), x, y, m)
            torch.autograd.grad(loss, leaves, create_graph=True)
        per_example = saved / m
        rows = p.num_chunks * p.fixed_batch_size if p.fixed_batch_size is not None else p.num_local_examples
        return int(per_example * rows) + 2 * p.num_params * p.dtype.itemsize

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
        p = self.problem
        if self.requested != "auto":
            self._time(self.requested, strict=True)
            return self.requested
        if not p.streaming:  # the gradient graph holds every chunk: not for data read again on every pass
            self._try_graph(memory_budget(self._graph_memory_bytes, p.device))
        views: list[dict[str, float]] = p.gather(dict(self.timings))
        if all("graph" in v for v in views):
            return "graph"
        self.free_graph()  # some process could not hold it: all use a functional route
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
        return min(common, key=lambda r: max(v[r] for v in views) * (1.0 if r == "fwd-rev" else REV_REV_MARGIN))

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
                need = saved_bytes(self._graph) + 2 * p.num_params * p.dtype.itemsize
            else:
                need = self.graph_bytes(piece)
            if need > budget:
                self.free_graph()
                self.errors["graph"] = (f"the gradient graph needs about {need / 2**20:.0f} MiB, more than its "
                                        f"budget of {budget / 2**20:.0f} MiB")
                return
            if not whole:
                self._build_graph()
            self._time("graph", strict=False)
        except InputError:  # the data changed under us: not a route failure
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


def float64_products(problem: Problem, V: torch.Tensor) -> torch.Tensor:
    """``H V`` in float64 for a ``(P, K)`` block: the float64 check product of a lower-precision problem.

    The parameters, buffers and each chunk's floating-point data are cast to float64 on the fly
    (no float64 copy of the data is kept). The product is the functional route the problem uses
    (``fwd-rev`` when it uses ``graph``; the other one if it fails). Memory: the K vectors are
    vmapped over pieces of :data:`CHECK_EXAMPLES` examples; for a model exported for a fixed
    batch, one vector at a time over whole chunks. The cached gradient graph is freed first
    (rebuilt by the next HVP), so that the peak is one of the two. Cost: K HVPs at float64 speed,
    counted in ``problem.counters.num_hvps``.

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

    g_fn = grad(chunk_loss)

    def one_chunk(x: torch.Tensor, y: torch.Tensor, m: int, route: str) -> Callable[[_Params], _Params]:
        def chunk_grad(prm: _Params) -> _Params:
            return g_fn(prm, x, y, m)

        if route == "fwd-rev":
            return lambda vd: jvp(chunk_grad, (params,), (vd,))[1]
        pullback = vjp(chunk_grad, params)[1]
        return lambda vd: pullback(vd)[0]

    def pieces() -> Iterable[tuple[torch.Tensor, torch.Tensor, int, float]]:
        for x, y, m, w in p.chunks():
            x = floating(x, f64)
            y = y.to(f64) if y.is_floating_point() else y
            if p.fixed_batch_size is not None or m <= CHECK_EXAMPLES:
                yield x, y, m, w  # type: ignore[misc]
                continue
            for a in range(0, m, CHECK_EXAMPLES):
                b = min(a + CHECK_EXAMPLES, m)
                xa, ya = take(x, a, b), y[a:b]
                yield xa, ya, b - a, p.piece_weight(xa, ya, b - a)  # type: ignore[misc]

    block = 1 if p.fixed_batch_size is not None else V.shape[1]

    def product(route: str) -> torch.Tensor:
        out = torch.zeros_like(V)
        for x, y, m, w in pieces():
            one = one_chunk(x, y, m, route)
            for s in range(0, V.shape[1], block):
                Vd = p.space.unflatten(V[:, s : s + block].T.contiguous())
                out[:, s : s + block] += w * p.space.flatten(vmap(one)(Vd)).T
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
