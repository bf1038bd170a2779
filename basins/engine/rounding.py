"""One randomised rounding estimate for all the Ritz pairs of a run (``bounds="sketch"``).

The per-pair check of :meth:`basins.Problem.rescaled_residuals` spends one HVP per eigenvalue:
``d_j = ‖H(c·y_j)/c − θ_j y_j‖`` (``c = 1.375``) measures pair j's true residual plus the
rounding of one product. At top-10 that is 10 full-data HVPs (``scripts/bench_hvp.py`` prints
one HVP's cost in gradients).
:func:`sketched_rounding` spends ``probes`` (3) instead, whatever k: with ``D = [d-vectors]``
(P × k), each probe ``g ~ N(0, I_k)`` gives ``‖D g‖`` from one product at ``z = Y g``, and
``E‖D g‖² = ‖D‖_F² ≥ ‖D e_j‖²`` for every j (``D`` taken as linear in the vector; rounding
is not exactly linear, but its size scales with the vector, as the per-pair check also
assumes). So ``ρ = sqrt(mean_i ‖D g_i‖²)`` bounds each pair's ``d_j`` in expectation; with three
probes it falls below a quarter of ``‖D‖_F`` with probability ≤ 2% even when one pair holds all
of it (``χ²₃ < 3/16``), and the bound multiplies it by ``ROUNDING_FACTOR = 4``
(:mod:`basins.analyses.hessian`). The price: each pair's bound is ``r_j + 4ρ``, up to ``√k``
looser than the per-pair one when the rounding is spread over the pairs.

Memory: the probes are built column by column (``probes`` float64 vectors of length P, never
a float64 copy of the k Ritz vectors). Cost: ``probes`` HVPs in the problem's dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from basins.engine.problem import Problem

__all__ = ["sketched_rounding", "SKETCH_PROBES"]

#: Probes of :func:`sketched_rounding`.
SKETCH_PROBES = 3
#: The rescaling factor of the check products (as :data:`basins.engine.problem.RESCALE`).
_RESCALE = 1.375


def sketched_rounding(problem: Problem, vectors: torch.Tensor, values: torch.Tensor, *, probes: int = SKETCH_PROBES,
                      seed: int = 0) -> float:
    """``ρ = sqrt(mean_i ‖H(c·Y g_i)/c − Y Θ g_i‖²)`` over ``probes`` Gaussian ``g_i`` (module docstring).

    Args:
        problem: the problem whose HVP (and its rounding) is measured.
        vectors: ``(P, k)`` Ritz vectors (normalised here, column by column, in float64).
        values: ``(k,)`` their Ritz values.
        probes: products to spend (≥ 1).
        seed: seeds the probes (``torch.Generator`` on the CPU).

    Returns:
        ``ρ`` (loss/θ² units). Cost: ``probes`` HVPs, counted by the problem.
    """
    k = vectors.shape[1]
    G = torch.randn(k, probes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f64 = torch.float64
    Z = torch.zeros(vectors.shape[0], probes, dtype=f64, device=problem.device)
    YTG = torch.zeros_like(Z)
    vals = values.to(f64).cpu()
    for j in range(k):
        y = vectors[:, j].to(problem.device, f64)
        y = y / y.norm().clamp_min(torch.finfo(f64).tiny)
        Z.add_(y[:, None] * G[j].to(Z.device))
        YTG.add_(y[:, None] * (float(vals[j]) * G[j]).to(Z.device))
    HZ = problem.hvp((Z * _RESCALE).to(problem.dtype)).to(f64) / _RESCALE
    D = HZ - YTG
    return math.sqrt(float((D * D).sum(0).mean()))
