"""Exact Hessian-vector product routes of a :class:`~basins.engine.problem.Problem`, their timing
and the processes' agreement on one.

Three routes compute the same ``H V`` (up to rounding) over the full data:

* ``graph``: the gradient graph is built once with ``create_graph=True`` over every chunk, then
  each HVP is one backward through it (fastest on CPU; memory ∝ n, so only when it fits the
  :func:`~basins.engine.memory.memory_budget` and the data are held in memory);
* ``fwd-rev``: ``jvp`` of ``grad`` per chunk (a block of vectors is ``vmap``-ed);
* ``rev-rev``: ``vjp`` of ``grad`` per chunk (likewise).

``auto`` times the viable routes on this process' shard alone (no collective: processes may
try different routes), then agrees across processes on the route that works everywhere and is
fastest on the slowest process. Blocks of vectors get their own choice, measured on the first
block. See README "Architecture".
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch.func import grad, jvp, vjp, vmap

from basins.engine.memory import memory_budget
from basins.errors import ComputeError, InputError

if TYPE_CHECKING:
    from basins.engine.problem import Problem

__all__ = ["HVP_ROUTES", "Routes"]

#: Exact HVP routes. ``auto`` measures the viable ones.
HVP_ROUTES = ("auto", "graph", "fwd-rev", "rev-rev")

_Params = dict[str, torch.Tensor]


class Routes:
    """The HVP routes of one problem: compute ``H V`` by a named route, and choose one.

    Args:
        problem: the problem whose chunks, parameters and collectives the routes use.
        requested: one of :data:`HVP_ROUTES`.
        graph_memory_bytes: budget for the cached gradient graph (default: :func:`memory_budget`).

    Attributes:
        single: the route for single vectors (chosen at construction).
        block: the route for blocks (None with ``auto`` until the first block is measured).
        timings: seconds per HVP for each route ``auto`` tried; errors: why others failed.
    """

    def __init__(self, problem: Problem, requested: str, graph_memory_bytes: int | None) -> None:
        if requested not in HVP_ROUTES:
            raise InputError(f"unknown HVP route {requested!r}: use one of {', '.join(HVP_ROUTES)}")
        self.problem = problem
        self.requested = requested
        self.timings: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self._graph_memory_bytes = graph_memory_bytes
        self._graph: torch.Tensor | None = None
        self._graph_leaves: list[torch.Tensor] | None = None
        self.single = self._choose()
        self.block: str | None = None if requested == "auto" else requested

    # ------------------------------------------------------------------ computing
    def compute(self, V: torch.Tensor, route: str, *, reduce: bool = True) -> torch.Tensor:
        """``H V`` for a ``(P, K)`` block by ``route``; summed over processes when ``reduce``."""
        p = self.problem
        if route == "graph":
            out = self._graph_hvp(V)
        else:
            out = torch.zeros_like(V)
            Vd = p.space.unflatten(V.T)  # {name: (K, *shape)}
            for x, y, m, w in p.chunks():
                out += w * p.space.flatten(self._chunk_hvp(x, y, m, Vd, route)).T
        return p.reduce(out) if reduce else out

    def _chunk_hvp(self, x: torch.Tensor, y: torch.Tensor, m: int, Vd: _Params, route: str) -> _Params:
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

    def _graph_hvp(self, V: torch.Tensor) -> torch.Tensor:
        if self._graph is None:
            self._build_graph()
        assert self._graph is not None and self._graph_leaves is not None
        cols = []
        for j in range(V.shape[1]):
            hs = torch.autograd.grad(self._graph, self._graph_leaves, V[:, j], retain_graph=True, allow_unused=True)
            cols.append(torch.cat([
                (h if h is not None else torch.zeros_like(t)).reshape(-1) for h, t in zip(hs, self._graph_leaves)
            ]))
        return torch.stack(cols, dim=1)

    def free_graph(self) -> None:
        """Drop the cached gradient graph (it holds activations of every chunk)."""
        self._graph = self._graph_leaves = None

    def _graph_bytes_per_chunk(self) -> int:
        """Bytes the autograd graph of one chunk's ``create_graph`` gradient keeps alive."""
        p = self.problem
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        x, y, m, _ = next(p.chunks())
        leaves = [t.detach().clone().requires_grad_(True) for t in p.params.values()]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = p._chunk_loss(dict(zip(p.space.names, leaves)), x, y, m)
            torch.autograd.grad(loss, leaves, create_graph=True)
        return saved + 2 * p.num_params * p.dtype.itemsize

    # ------------------------------------------------------------------ choosing
    def for_block(self, V: torch.Tensor) -> str:
        """The route for a ``(P, K)`` block, K > 1: with ``auto``, measured once on the first block
        (vmapped ``fwd-rev`` often costs less per vector than a loop of cached-graph backwards,
        but not for convolutions on CPU)."""
        if self.requested != "auto":
            return self.single
        if self.block is None:
            probe = V[:, : min(V.shape[1], 8)]
            timings: dict[str, float] = {}
            for route in dict.fromkeys([self.single, "fwd-rev", "rev-rev"]):
                if route not in self.timings:
                    continue  # failed or not viable for single vectors either
                try:
                    t0 = time.perf_counter()
                    self.compute(probe, route, reduce=False)  # this shard alone: no collective
                    timings[route] = (time.perf_counter() - t0) / probe.shape[1]
                except InputError:  # the data changed under us: not a route failure
                    raise
                except Exception as exc:  # noqa: BLE001 - vmap may fail where a loop works
                    self.errors[f"{route} (block)"] = f"{type(exc).__name__}: {exc}"
            views: list[dict[str, float]] = self.problem.gather(timings)
            timings = {r: max(v[r] for v in views) for r in timings if all(r in v for v in views)}
            self.block = min(timings, key=timings.__getitem__) if timings else self.single
        return self.block

    def _choose(self) -> str:
        best = self._choose_local()
        if self.requested != "auto":
            return best
        views: list[dict[str, float]] = self.problem.gather(dict(self.timings))
        common = [r for r in HVP_ROUTES[1:] if all(r in v for v in views)]
        if not common:
            raise ComputeError("no Hessian-vector product route works on every process: " + repr(views))
        agreed = min(common, key=lambda r: max(v[r] for v in views))
        if agreed != "graph":
            self.free_graph()
        return agreed

    def _choose_local(self) -> str:
        p = self.problem
        if self.requested != "auto":
            self._time(self.requested, strict=True)
            return self.requested
        budget = memory_budget(self._graph_memory_bytes, p.device)
        candidates = ["fwd-rev", "rev-rev"]
        try:
            # the gradient graph holds every chunk: not for data read again on every pass
            if not p.streaming and self._graph_bytes_per_chunk() * p.num_chunks <= budget:
                candidates.insert(0, "graph")
        except InputError:  # the data changed under us: not a route failure
            raise
        except Exception as exc:  # noqa: BLE001 - a model that cannot double-backward
            self.errors["graph"] = f"{type(exc).__name__}: {exc}"
        for r in candidates:
            self._time(r, strict=False)
        if not self.timings:
            raise ComputeError(
                "no Hessian-vector product route works for this model and loss: "
                + "; ".join(f"{k}: {v}" for k, v in self.errors.items())
            )
        best = min(self.timings, key=self.timings.__getitem__)
        if best != "graph":
            self.free_graph()
        return best

    def _time(self, route: str, *, strict: bool) -> None:
        """Time one HVP by ``route`` on this shard (min of two runs; one for streamed data); record failures."""
        p = self.problem
        gen = torch.Generator().manual_seed(12345)
        v = torch.randn(p.num_params, 1, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
        try:
            if route == "graph" and self._graph is None:
                self._build_graph()
            best = math.inf
            for _ in range(1 if p.streaming else 2):  # a streamed pass is dominated by reading
                t0 = time.perf_counter()
                self.compute(v, route, reduce=False)
                best = min(best, time.perf_counter() - t0)
            self.timings[route] = best
        except InputError:  # the data changed under us: not a route failure
            raise
        except Exception as exc:
            self.errors[route] = f"{type(exc).__name__}: {exc}"
            if strict:
                raise ComputeError(f"HVP route {route!r} fails for this model/loss: {type(exc).__name__}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        """Routes chosen, timings and failures, for logs."""
        return {"single": self.single, "block": self.block, "timings": dict(self.timings), "errors": dict(self.errors)}
