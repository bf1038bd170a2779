"""Stochastic estimates of the trace of a symmetric operator, with a standard error.

Two estimators of ``tr(H)`` from products ``H @ Z`` only: Hutchinson's (Rademacher probes,
error ``O(||H||_F / sqrt(m))``) and Hutch++ (a low-rank sketch handles the top of the spectrum
exactly and Hutchinson the rest, error ``O(tr|H| / m)`` for PSD ``H``). Both are unbiased. The
standard error is the sample spread of the Hutchinson terms, so it is itself an estimate: on a
spectrum dominated by a few directions it can be optimistic at small ``m``, where Hutch++ is the
better choice anyway. Probes are drawn on the CPU from ``torch.Generator().manual_seed(seed)``
(probe ``i`` does not depend on ``block_size``), then moved to ``device``/``dtype``.

References:
    M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18(3), 1059-1076, 1989.
    R. A. Meyer, C. Musco, C. Musco and D. P. Woodruff, "Hutch++: Optimal stochastic trace
    estimation", SOSA 2021, 142-155.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from basins.errors import InputError
from basins.linalg.operator import Operator, as_operator

__all__ = ["TraceEstimate", "hutchinson", "hutchpp"]


@dataclass(frozen=True)
class TraceEstimate:
    """An estimate of ``tr(H)``.

    Attributes:
        estimate: the estimate (float64 arithmetic).
        stderr: its standard error, sample std of the Hutchinson terms ``/ sqrt(#terms)``.
        num_matvecs: single-vector products ``H v`` spent (a block of ``b`` counts ``b``).
        method: ``"hutchinson"`` or ``"hutch++"``.
        seed: seed of the probes.
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str
    seed: int


def hutchinson(operator: Operator | torch.Tensor, *, num_matvecs: int = 100, block_size: int = 16,
               dtype: torch.dtype = torch.float64, device: str | torch.device | None = None,
               seed: int = 0) -> TraceEstimate:
    r"""Hutchinson's estimate :math:`\frac1m\sum_i z_i^\top H z_i`, Rademacher :math:`z_i`.

    Args:
        operator: ``H``, an :class:`~basins.linalg.operator.Operator` (its matvec gets blocks
            ``(P, c)``, ``c <= block_size``) or a dense symmetric tensor.
        num_matvecs: ``m``, the number of probes and products, ``>= 2`` (for a stderr).
        block_size: probes per ``matvec`` call; memory ``3 * block_size`` vectors.
        dtype: dtype of the probes, ``torch.float32`` or ``torch.float64``.
        device: device of the probes (default the operator's).
        seed: seed of the probe generator.

    Returns:
        A :class:`TraceEstimate`; variance ``2(||H||_F^2 - sum_i H_ii^2) / m``. Cost: ``m``
        products.

    Raises:
        InputError: a bad argument or a matvec that returns the wrong shape.
        ComputeError: the matvec returned non-finite values.
    """
    op = as_operator(operator)
    num_params, device = op.num_params, op.device if device is None else device
    _check(num_matvecs, 2, block_size, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    terms = _quadratic_forms(op, num_params, num_matvecs, block_size, dtype, device, gen, None)
    mean, stderr = _mean_stderr(terms)
    return TraceEstimate(mean, stderr, num_matvecs, "hutchinson", seed)


def hutchpp(operator: Operator | torch.Tensor, *, num_matvecs: int = 102, block_size: int = 16,
            dtype: torch.dtype = torch.float64, device: str | torch.device | None = None,
            seed: int = 0) -> TraceEstimate:
    r"""Hutch++ (Meyer et al. 2021): exact trace on a sketched subspace, Hutchinson on the rest.

    With ``s = m // 3``: Rademacher ``S`` (P, s); ``Q = orth(H S)``; then
    :math:`\operatorname{tr}(Q^\top H Q) + \frac1g\sum_i g_i^\top (I-QQ^\top) H (I-QQ^\top) g_i`
    with the remaining ``g = m - 2s`` Rademacher probes. The stderr is the spread of the last
    sum (the first term is exact given ``Q``).

    Args:
        operator: ``H``, an :class:`~basins.linalg.operator.Operator` (its matvec gets blocks
            ``(P, c)``, ``c <= block_size``) or a dense symmetric tensor.
        num_matvecs: ``m``, total products, ``>= 4`` (``s >= 1``, ``g >= 2``); default 102
            (34 per third).
        block_size: vectors per ``matvec`` call.
        dtype: dtype of the probes and of ``Q``, ``torch.float32`` or ``torch.float64``.
        device: device of the probes (default the operator's).
        seed: seed of the probe generator (``S`` first, then the ``g`` probes).

    Returns:
        A :class:`TraceEstimate`. Cost: ``m`` products (``m - s + P`` if ``s > P``: then ``Q``
        spans ``R^P`` and the estimate is exact); memory ``s + 3 * block_size`` vectors.

    Raises:
        InputError: a bad argument or a matvec that returns the wrong shape.
        ComputeError: the matvec returned non-finite values.
    """
    op = as_operator(operator)
    num_params, device = op.num_params, op.device if device is None else device
    _check(num_matvecs, 4, block_size, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    s = num_matvecs // 3
    HS = torch.empty(num_params, s, dtype=dtype, device=device)
    for a in range(0, s, block_size):
        c = min(block_size, s - a)
        HS[:, a : a + c] = op.apply(_rademacher(gen, c, num_params, dtype, device))
    Q = torch.linalg.qr(HS).Q  # orthonormal (P, min(s, P)) even when H S is rank deficient
    del HS
    exact = 0.0
    for a in range(0, Q.shape[1], block_size):
        V = Q[:, a : a + block_size]
        exact += float(torch.sum(V * op.apply(V), dtype=torch.float64))
    g = num_matvecs - 2 * s
    terms = _quadratic_forms(op, num_params, g, block_size, dtype, device, gen, Q)
    mean, stderr = _mean_stderr(terms)
    return TraceEstimate(exact + mean, stderr, s + Q.shape[1] + g, "hutch++", seed)


def _check(num_matvecs: object, least: int, block_size: object, dtype: object, seed: object) -> None:
    if not _is_int(num_matvecs) or num_matvecs < least:  # type: ignore[operator]
        raise InputError(f"num_matvecs={num_matvecs!r} must be an integer >= {least}", param="num_matvecs")
    if not _is_int(block_size) or block_size < 1:  # type: ignore[operator]
        raise InputError(f"block_size={block_size!r} must be a positive integer", param="block_size")
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"dtype={dtype!r} must be torch.float32 or torch.float64", param="dtype")
    if not _is_int(seed):
        raise InputError(f"seed={seed!r} must be an integer", param="seed")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rademacher(gen: torch.Generator, c: int, P: int, dtype: torch.dtype,
                device: str | torch.device) -> torch.Tensor:
    """``c`` Rademacher probes as a (P, c) block; row ``i`` of the draw is probe ``i``."""
    z = torch.randint(0, 2, (c, P), generator=gen, dtype=torch.int8)
    return (2 * z - 1).to(device=device, dtype=dtype).T


def _quadratic_forms(op: Operator, P: int, m: int, block_size: int, dtype: torch.dtype,
                     device: str | torch.device, gen: torch.Generator,
                     Q: torch.Tensor | None) -> torch.Tensor:
    """``z_i^T H z_i`` (float64) for ``m`` Rademacher probes, deflated by ``I - QQ^T`` if given."""
    out = torch.empty(m, dtype=torch.float64)
    for a in range(0, m, block_size):
        c = min(block_size, m - a)
        Z = _rademacher(gen, c, P, dtype, device)
        if Q is not None:
            Z = Z - Q @ (Q.T @ Z)
        out[a : a + c] = torch.sum(Z * op.apply(Z), dim=0, dtype=torch.float64).cpu()
    return out


def _mean_stderr(terms: torch.Tensor) -> tuple[float, float]:
    return float(terms.mean()), float(terms.std(correction=1)) / math.sqrt(terms.numel())
