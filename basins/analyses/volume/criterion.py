"""The criterion ``C = L − L(θ*)`` of a :class:`~basins.engine.problem.Problem`, batched for the radius search.

:func:`basins.analyses.volume.probe.probe_problem` hands :class:`ProblemCriterion` to
:func:`~basins.analyses.volume.probe.probe_basin`, which sees only a batched criterion
``(K, P) points → (K,)``. See README, "Architecture".
"""

from __future__ import annotations

import math
import time

import torch

from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError

__all__ = ["ProblemCriterion"]


class ProblemCriterion:
    """``C(θ) = L(θ) − L(θ*)`` of a :class:`basins.Problem`, batched through ``loss_many``.

    The route (``vmap`` chunk size, or a ``loop``) is chosen by timing each candidate on a few
    points near θ* (neither wins everywhere: ``vmap`` saves the per-point Python overhead but holds
    ``chunk`` × the activations; ``scripts/bench_volume.py`` measures both), so the batched
    search is never slower than a loop. ``L(θ*)`` is re-evaluated through the chosen route so
    that ``C(θ*) = 0`` exactly in its arithmetic.

    Args:
        problem: the problem.
        route: ``auto``, ``vmap`` or ``loop``.
        chunk: points per ``vmap`` call (memory ∝ chunk × the model's activations on one data
            chunk); with ``auto``, the candidates are 4, 16 and 64 capped at ``chunk``.
        seed: seed of the timing points.

    Attributes:
        route, chunk: as chosen. timings: seconds per point of each candidate.
        num_evals: evaluations through this object (timing included).
    """

    def __init__(self, problem: Problem, *, route: str = "auto", chunk: int | None = None, seed: int = 0) -> None:
        if route not in ("auto", "vmap", "loop"):
            raise InputError(f"unknown loss_route {route!r}: use auto, vmap or loop", param="loss_route")
        if chunk is not None and chunk < 1:
            raise InputError(f"chunk must be ≥ 1, got {chunk}", param="chunk")
        self.problem = problem
        self.theta0: torch.Tensor = problem.theta0
        self.num_evals = 0
        self.timings: dict[str, float] = {}
        self.route, self.chunk = ("loop", None) if route == "auto" else (route, chunk)
        if route == "auto":
            # every process must use rank 0's choice: routes differ in rounding, and ranks that
            # saw different numbers would take different search steps (and different collectives)
            route, chunk = problem.agree(self._measure(chunk, seed))
        self.route, self.chunk = route, (chunk if route == "vmap" else None)
        self.reference = float(self._loss(self.theta0.unsqueeze(0))[0])
        if not math.isfinite(self.reference):
            raise ComputeError("the batched loss at θ* is not finite")

    def _loss(self, points: torch.Tensor, route: str | None = None, chunk: int | None = None) -> torch.Tensor:
        self.num_evals += points.shape[0]
        r = route or self.route
        out: torch.Tensor = self.problem.loss_many(points, chunk=chunk or self.chunk, route=r)
        return out

    def _measure(self, cap: int | None, seed: int) -> tuple[str, int | None]:
        gen = torch.Generator().manual_seed(seed)
        P = self.theta0.numel()
        cands: list[tuple[str, int | None]] = [("loop", None)]
        sizes = sorted({min(c, cap) if cap else c for c in (4, 16, 64)})
        cands += [("vmap", c) for c in sizes]
        m = max(32, max(sizes))
        noise = torch.randn(m, P, generator=gen, dtype=torch.float64) * 1e-3
        pts = self.theta0.unsqueeze(0) + noise.to(self.theta0.device, self.theta0.dtype)
        best: tuple[float, str, int | None] = (math.inf, "loop", None)
        for route, c in cands:
            k = max(c or 1, 32)  # the same work per candidate (32 points; 64 for vmap ×64)
            try:
                per = math.inf
                for _ in range(3):  # best of 3: timings on a shared CPU are noisy
                    t0 = time.perf_counter()
                    self._loss(pts[:k], route, c)
                    per = min(per, (time.perf_counter() - t0) / k)
            except Exception as exc:  # noqa: BLE001 - a model vmap cannot batch falls back to the loop
                if route == "loop":
                    raise ComputeError(f"the loss fails at points near θ*: {type(exc).__name__}: {exc}") from exc
                continue
            self.timings[route if c is None else f"vmap{c}"] = per
            if per < best[0]:
                best = (per, route, c)
        return best[1], best[2]

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return self._loss(points) - self.reference
