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
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from basins.engine.problem import Problem

__all__ = ["sketched_rounding", "SKETCH_PROBES", "SOFTMAX_LOSSES", "loss_head_rounding", "has_plain_head"]

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


#: Built-in losses whose plain float64 form (``logsumexp(z) − z_y``) rounds differently from the
#: one basins evaluates (:func:`basins.engine.losses.softmax_nll`), with class-index targets.
SOFTMAX_LOSSES = ("cross-entropy", "causal-lm", "token-cross-entropy")


def _plain_nll(logits: torch.Tensor, labels: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logsumexp(logits, dim) - logits.gather(dim, labels.unsqueeze(dim)).squeeze(dim)


def _plain_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The textbook float64 form of the built-in softmax loss ``name`` (class-index targets)."""
    from basins.engine.losses import IGNORE_INDEX

    if name == "cross-entropy":
        return lambda o, t: _plain_nll(o, t, 1).mean()

    def tokens(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if name == "causal-lm":
            o, t = o[:, :-1], t[:, 1:]
        valid = t != IGNORE_INDEX
        safe = torch.where(valid, t, torch.zeros_like(t))
        return (_plain_nll(o, safe, -1) * valid.to(o.dtype)).sum() / valid.sum().clamp_min(1).to(o.dtype)

    return tokens


def has_plain_head(problem: Problem) -> bool:
    """Whether ``problem``'s loss is a built-in softmax loss on class indices (:func:`loss_head_rounding` applies)."""
    if getattr(problem, "loss_name", None) not in SOFTMAX_LOSSES:
        return False
    y = next(iter(problem.chunks()))[1]
    return isinstance(y, torch.Tensor) and not y.is_floating_point()


def loss_head_rounding(problem: Problem, vectors: torch.Tensor, *, probes: int = SKETCH_PROBES,
                       seed: int = 0) -> float:
    """How far a float64 Hessian evaluated the textbook way can be from basins' own, for all the
    Ritz vectors at once: ``ρ = sqrt(mean_i ‖(H_plain − H) Y g_i‖²)`` over ``probes`` Gaussian ``g_i``,
    ``H_plain`` the Hessian of the loss written ``logsumexp(z) − z_y``.

    basins evaluates a softmax loss in a form accurate in its derivatives
    (:func:`basins.engine.losses.softmax_nll`); the textbook form (``F.cross_entropy``, the usual
    float64 reference) forms ``p_y − 1`` and ``p_y(1 − p_y)`` from ``p_y ≈ 1`` at a small loss, an
    error of ~eps·‖J v‖² against a curvature of ~(1 − p_y)·‖J v‖²: on the zoo's ViT at L = 1.7e-4
    it moved λ1 by 1.4e-14 to 4.2e-14, beyond ``256·eps·max|λ|`` (1.0e-14). Float64 error bounds add
    ``ROUNDING_FACTOR·ρ`` (:mod:`basins.analyses.hessian`), so that they hold against such references
    too. The difference of two products at the same vectors: the pairs' residuals cancel.

    Returns:
        ``ρ`` (loss/θ² units). Cost: ``2·probes`` HVPs (counted), and the gradient graph built twice
        more when the problem uses the ``graph`` route.
    """
    k = vectors.shape[1]
    f64 = torch.float64
    G = torch.randn(k, probes, generator=torch.Generator().manual_seed(seed), dtype=f64)
    Z = torch.zeros(vectors.shape[0], probes, dtype=f64, device=problem.device)
    for j in range(k):
        y = vectors[:, j].to(problem.device, f64)
        Z.add_((y / y.norm().clamp_min(torch.finfo(f64).tiny))[:, None] * G[j].to(Z.device))
    Z = Z.to(problem.dtype)
    own = problem.loss_fn
    problem.routes.free_graph()
    problem.loss_fn = _plain_loss(problem.loss_name)
    try:
        plain = problem.hvp(Z).to(f64)
    finally:
        problem.loss_fn = own
        problem.routes.free_graph()
    plain.sub_(problem.hvp(Z).to(f64))  # (H_plain − H) Z in place: three (P, probes) blocks at the peak
    return math.sqrt(float(plain.norm(dim=0).square().mean()))
