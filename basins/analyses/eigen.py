"""Hessian eigenpairs at θ*: dense when small, else Lanczos; the one place this is decided.

:func:`dense_fits` is the rule (``P ≤ max_params`` and the dense float64 Hessian with its
eigensolver workspace, ``24·P²`` bytes, fits the memory budget); :func:`hessian_eigenpairs`
applies it, and ``basins nullity`` (method ``auto``), ``basins evidence`` and ``basins volume`` (the eigenbasis of
the ``eigen`` direction family and of the quadratic comparison) both ask it. The dense route
assembles ``H`` once (:meth:`basins.linalg.operator.Operator.materialise`, ``P`` HVPs) and
diagonalises it in float64 (all ``P`` pairs, exact to rounding); the Lanczos route
(:func:`basins.linalg.lanczos.lanczos`, full reorthogonalisation) gives the top ``k`` pairs to
relative residual ``tol``. :func:`deflated_slq` is the one deflated stochastic Lanczos
quadrature (``nullity``'s slq, ``evidence``'s log det, ``spectrum``): the top pairs by
:func:`top_eigenpairs`, their span projected out, SLQ on the rest. See README, "Architecture".
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from basins.engine.curvature import HessianOperator
from basins.engine.memory import memory_budget
from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError
from basins.linalg.lanczos import lanczos
from basins.linalg.operator import Operator
from basins.linalg.slq import SLQResult, slq
from basins.progress import ProgressCallback, relay

__all__ = ["Eigenpairs", "WarmStarts", "warm_starts", "hessian_operator", "dense_memory_bytes", "dense_fits",
           "dense_reason", "dense_hessian", "top_eigenpairs", "hessian_eigenpairs", "DeflatedSLQ", "deflated_slq",
           "DENSE_MAX_PARAMS", "named_as"]

#: The dense route's parameter limit: P HVPs to build H, ``8·P²`` bytes (128 MiB at 4096) and
#: ``O(P³)`` flops for ``eigvalsh``; ``scripts/bench_nullity.py`` times it against the other methods.
DENSE_MAX_PARAMS = 4096


@dataclass
class WarmStarts:
    """Ritz vectors carried from one checkpoint's Lanczos runs to the next checkpoint's.

    Inside :func:`warm_starts`, the ``j``-th call of :func:`top_eigenpairs` (the top and floor
    families of ``basins volume``, the deflation of ``basins nullity``/``evidence``) starts from
    the vectors the ``j``-th call of the previous checkpoint found for the same ``k`` and ``P``
    (:func:`basins.linalg.lanczos.lanczos`, ``start=``): the same stopping rule, so the same
    accuracy, in fewer HVPs on a nearby Hessian.

    Attributes:
        vectors: ``(call index, k, P)`` → ``(P, k)`` float64 CPU Ritz vectors.
        calls: calls of :func:`top_eigenpairs` in the current checkpoint.
        warm: how many of them started warm.
    """

    vectors: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    calls: int = 0
    warm: int = 0


_WARM: ContextVar[WarmStarts | None] = ContextVar("basins_warm_starts", default=None)


@contextmanager
def warm_starts(store: WarmStarts) -> Iterator[WarmStarts]:
    """Within this block, :func:`top_eigenpairs` warm-starts from (and updates) ``store`` (one checkpoint)."""
    store.calls = store.warm = 0
    token = _WARM.set(store)
    try:
        yield store
    finally:
        _WARM.reset(token)


@dataclass
class Eigenpairs:
    """Hessian eigenpairs, eigenvalues descending.

    Attributes:
        eigenvalues: ``(n,)`` float64 CPU, descending: all ``P`` (dense) or the top ``k`` (Lanczos).
        eigenvectors: ``(P, k)`` unit eigen/Ritz vectors, float64 CPU (``k`` columns on both routes).
        residuals: ``(n,)`` float64 residual bounds (Lanczos), zeros on the dense route.
        complete: the whole spectrum is known (dense route).
        method: ``"exact"`` (dense) or ``"lanczos"``.
        num_hvps: HVPs spent (``P`` dense, the Lanczos count otherwise).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    complete: bool
    method: str
    num_hvps: int


@contextmanager
def named_as(**names: str) -> Iterator[None]:
    """Name the caller's parameter in an error about the linear-algebra one it is passed as.

    Inside, an :class:`~basins.errors.InputError` whose ``param`` is a key of ``names`` is raised
    again with that value as ``param`` and in the message: ``with named_as(max_matvecs="max_hvps"):
    lanczos(op, max_matvecs=max_hvps)`` refuses with ``max_hvps=3 cannot build ...``.
    """
    try:
        yield
    except InputError as err:
        new = names.get(err.param or "")
        if new is None:
            raise
        raise type(err)(re.sub(rf"\b{re.escape(str(err.param))}\b", new, str(err)), param=new) from err


def hessian_operator(problem: Problem) -> Operator:
    """The Hessian at θ* as an :class:`Operator` (:class:`basins.engine.curvature.HessianOperator`:
    ``problem.hvp``, one column = one HVP)."""
    return HessianOperator(problem)


def dense_memory_bytes(num_params: int) -> int:
    """Peak bytes of the dense route: the float64 Hessian, its symmetrised copy, the eigensolver's workspace."""
    return 24 * num_params**2


def dense_fits(num_params: int, *, max_params: int = DENSE_MAX_PARAMS, memory_bytes: int | None = None) -> bool:
    """The one dense-or-iterative rule: the dense route is taken when ``P ≤ max_params`` (default
    :data:`DENSE_MAX_PARAMS`) and :func:`dense_memory_bytes` fits ``memory_bytes`` (default a
    quarter of physical memory). ``basins nullity``, ``evidence``, ``volume`` and every caller of
    :func:`hessian_eigenpairs` ask it."""
    return num_params <= max_params and dense_memory_bytes(num_params) <= memory_budget(memory_bytes)


def dense_reason(num_params: int, *, max_params: int = DENSE_MAX_PARAMS, memory_bytes: int | None = None) -> str:
    """Why :func:`dense_fits` decided as it did, for a note (``P = 5,000 > 4,096``, or the memory)."""
    if num_params > max_params:
        return f"P = {num_params:,} > {max_params:,}"
    need, budget = dense_memory_bytes(num_params), memory_budget(memory_bytes)
    if need > budget:
        return f"the dense Hessian needs {need / 2**30:.1f} GiB, over the {budget / 2**30:.1f} GiB budget"
    return f"P = {num_params:,} ≤ {max_params:,} and the dense Hessian fits in memory"


def dense_hessian(operator: Operator, *, block: int = 64, callback: ProgressCallback | None = None,
                  symmetrise: bool = True) -> torch.Tensor:
    """The dense float64 ``(P, P)`` Hessian (:meth:`Operator.materialise`); progress in HVPs (phase
    ``"hessian"``). Cost: ``P`` HVPs in blocks of ``block``."""
    return operator.materialise(dtype=torch.float64, block=block, symmetrise=symmetrise,
                                callback=relay(callback, phase="hessian", unit="HVPs"))


def top_eigenpairs(operator: Operator, k: int, *, tol: float = 1e-4, seed: int = 0, vectors: bool = True,
                   callback: ProgressCallback | None = None) -> Eigenpairs:
    """The top ``k`` pairs by Lanczos (basis in the operator's dtype), warm-started inside
    :func:`warm_starts`. Cost: the Lanczos count (≥ k HVPs)."""
    store = _WARM.get()
    key, start = None, None
    if store is not None:  # several checkpoints (warm_starts)
        key = (store.calls, k, operator.num_params)
        store.calls += 1
        start = store.vectors.get(key)
        store.warm += start is not None
    res = lanczos(operator, k=k, which="top", tol=tol, dtype=operator.dtype, device=operator.device, seed=seed,
                  return_eigenvectors=vectors or store is not None, callback=relay(callback, unit="HVPs"),
                  start=start)
    if store is not None and key is not None and res.eigenvectors is not None:
        store.vectors[key] = res.eigenvectors.to("cpu", torch.float64)
        if not vectors:
            res.eigenvectors = None
    if vectors and res.eigenvectors is None:
        raise ComputeError("Lanczos returned no eigenvectors")
    vals = res.eigenvalues.to("cpu", torch.float64)
    order = torch.argsort(vals, descending=True)
    vecs = (res.eigenvectors.to("cpu", torch.float64)[:, order] if res.eigenvectors is not None
            else torch.zeros(operator.num_params, 0, dtype=torch.float64))
    return Eigenpairs(vals[order], vecs, res.residuals.to("cpu", torch.float64)[order], False, "lanczos",
                      int(res.num_matvecs))


def hessian_eigenpairs(problem: Problem | Operator, k: int, *, exact_max_params: int = DENSE_MAX_PARAMS,
                       memory_bytes: int | None = None, seed: int = 0, tol: float = 1e-4, hvp_block: int = 32,
                       callback: ProgressCallback | None = None) -> Eigenpairs:
    """All eigenvalues and the top ``k`` eigenvectors (dense route), or the top ``k`` pairs (Lanczos).

    Args:
        problem: a :class:`~basins.engine.problem.Problem` (its Hessian at θ*) or an :class:`Operator`.
        k: eigenvectors wanted: ``0 ≤ k < P`` on the dense route, ``1 ≤ k < P`` on Lanczos.
        exact_max_params, memory_bytes: the rule of :func:`dense_fits`.
        seed, tol: Lanczos settings.
        hvp_block: HVPs per product on the dense route.
        callback: :class:`~basins.progress.Progress` in HVPs.

    Returns:
        :class:`Eigenpairs`. Cost: ``P`` HVPs (dense) or the Lanczos count.

    Raises:
        InputError: ``k`` out of range.
    """
    op = problem if isinstance(problem, Operator) else hessian_operator(problem)
    P = op.num_params
    exact = dense_fits(P, max_params=exact_max_params, memory_bytes=memory_bytes)
    if not (0 if exact else 1) <= k < P:
        raise InputError(f"k (the number of top eigenvectors) must be in [1, P) = [1, {P}), got {k}", param="k")
    if not exact:
        return top_eigenpairs(op, k, tol=tol, seed=seed, callback=callback)
    H = dense_hessian(op, block=hvp_block, callback=callback).cpu()
    vals, vecs = torch.linalg.eigh(H)
    del H
    vals, vecs = vals.flip(0), vecs.flip(1)
    return Eigenpairs(vals, vecs[:, :k].contiguous(), torch.zeros_like(vals), True, "exact", P)


@dataclass
class DeflatedSLQ:
    """Top eigenpairs kept exactly, and SLQ on the rest (:func:`deflated_slq`).

    Attributes:
        top: the top ``k`` eigenvalues, descending (float64 CPU; empty when ``k = 0``).
        top_residuals: their Lanczos residual bounds.
        slq: the quadrature on ``(I − QQᵀ) A (I − QQᵀ)``, dimension ``P − k``.
        num_matvecs: products spent (Lanczos + SLQ).
    """

    top: torch.Tensor
    top_residuals: torch.Tensor
    slq: SLQResult
    num_matvecs: int


def deflated_slq(operator: Operator, *, deflate: int, num_probes: int, num_steps: int, seed: int = 0,
                 probe_seed: int | None = None, probe: str = "rademacher", tol: float = 1e-6,
                 memory_bytes: int | None = None, callback: ProgressCallback | None = None) -> DeflatedSLQ:
    """The one deflated stochastic Lanczos quadrature: the top ``deflate`` pairs by Lanczos
    (:func:`top_eigenpairs`, tolerance ``tol``, warm-started inside :func:`warm_starts`), their
    span projected out, then :func:`basins.linalg.slq.slq` on the complement.

    The Lanczos vectors are float64 when ``num_probes·(num_steps+1)·P`` doubles fit
    ``memory_bytes`` (default the memory budget, at most 1 GiB), else the operator's dtype, in
    blocks of as many probes as fit. ``probe_seed`` (default ``seed``) seeds the probes.

    Cost: the Lanczos count (≈ 5–15 × ``deflate``) + at most ``num_probes·num_steps`` products.

    Raises:
        InputError: ``deflate`` not in ``[0, P)``, or a bad SLQ budget.
    """
    P = operator.num_params
    if not 0 <= deflate < P:
        raise InputError(f"deflate must be between 0 and P − 1 = {P - 1}, got {deflate}", param="deflate")
    budget = min(1 << 30, memory_budget(memory_bytes, operator.device)) if memory_bytes is None else memory_bytes
    per_probe = (min(num_steps, P) + 1) * P
    dtype = torch.float64 if (num_probes * per_probe + deflate * P) * 8 <= budget else operator.dtype
    block = max(1, min(num_probes, budget // max(1, per_probe * dtype.itemsize)))
    top = top_res = torch.zeros(0, dtype=torch.float64)
    basis, used = None, 0
    if deflate:
        pairs = top_eigenpairs(Operator(operator.matvec, P, dtype, operator.device), deflate, tol=tol, seed=seed,
                               callback=callback)
        top, top_res, used = pairs.eigenvalues, pairs.residuals, pairs.num_hvps
        basis = torch.linalg.qr(pairs.eigenvectors)[0].to(dtype)
    res = slq(operator, num_probes=num_probes, num_steps=num_steps, seed=seed if probe_seed is None else probe_seed,
              probe=probe, deflate=basis, block_size=block, dtype=dtype, device=operator.device,
              callback=relay(callback, offset=used, unit="HVPs"))
    return DeflatedSLQ(top, top_res, res, used + res.num_matvecs)
