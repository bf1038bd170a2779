"""``basins spectrum``: the Hessian's spectral density at θ* by stochastic Lanczos quadrature.

The quadrature itself (probes, Gauss rules, smoothing) is :mod:`basins.linalg.slq`; this module
applies it to a :class:`~basins.engine.problem.Problem`'s Hessian and chooses the precision of
the Lanczos vectors from a memory budget. References: Golub & Meurant (2010), ch. 6;
Ubaru, Chen & Saad (2017); Ghorbani, Krishnan & Xiao (2019).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from basins.engine.memory import memory_budget
from basins.engine.problem import Problem
from basins.linalg.slq import (
    DEFAULT_PROBES,
    DEFAULT_STEPS,
    SLQProgress,
    SLQResult,
    _check_budget,
    slq,
)

__all__ = ["hessian_slq"]


def hessian_slq(
    problem: Problem,
    *,
    num_probes: int = DEFAULT_PROBES,
    num_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    probe: str = "rademacher",
    deflate: torch.Tensor | None = None,
    memory_bytes: int | None = None,
    callback: Callable[[SLQProgress], None] | None = None,
) -> SLQResult:
    """:func:`slq` on the Hessian of a :class:`basins.Problem` at θ*.

    The Lanczos vectors are float64 when ``num_probes·(num_steps+1)·P`` doubles fit in
    ``memory_bytes`` (default: :func:`basins.engine.memory.memory_budget`, at most 1 GiB), else
    the problem's dtype (and fewer probes per block if needed).
    Cost: ≤ ``num_probes·num_steps`` HVPs, in blocks of all probes.
    """
    P = int(problem.num_params)
    if memory_bytes is None:
        memory_bytes = min(1 << 30, memory_budget(None, problem.device))
    _check_budget(num_probes, num_steps, probe)
    per_probe = (min(num_steps, P) + 1) * P
    dtype = torch.float64 if num_probes * per_probe * 8 <= memory_bytes else problem.dtype
    block = max(1, min(num_probes, memory_bytes // max(1, per_probe * dtype.itemsize)))
    return slq(
        problem.hvp, P, num_probes=num_probes, num_steps=num_steps, seed=seed, probe=probe,
        deflate=deflate, block_size=block, dtype=dtype, device=problem.device, callback=callback,
    )
