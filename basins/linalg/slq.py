"""Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric operator from matvecs.

A unit probe ``v`` defines the spectral measure ``μ_v = Σᵢ (uᵢᵀv)² δ(λᵢ)`` of the operator
``A = Σᵢ λᵢ uᵢuᵢᵀ``; its average over random probes is the spectral density
``(1/P) Σᵢ δ(λᵢ)``. ``m`` steps of Lanczos from ``v`` give a tridiagonal ``T_m`` whose
eigenvalues θⱼ (the *nodes*) and squared first eigenvector components τⱼ² (the *weights*)
form the m-point Gauss quadrature rule of ``μ_v`` (Golub & Meurant, *Matrices, Moments and
Quadrature with Applications*, 2010, ch. 6; Ubaru, Chen & Saad, SIAM J. Matrix Anal. Appl.
38(4), 2017; Ghorbani, Krishnan & Xiao, ICML 2019).

Known limitations: m nodes resolve the measure only to about the spacing between nodes; a
mass of tiny eigenvalues spread over many decades below the smallest node is merged into
that node (on a 26k-parameter classifier, ~100 nodes do not resolve eigenvalues below
~1e-6·λ_max). Counts near zero need :mod:`basins.analyses.nullity`, which turns the nodes'
residuals and the Chebyshev–Markov–Stieltjes inequalities into honest intervals.

Numerics: full reorthogonalisation (classical Gram–Schmidt, twice) of every probe's Lanczos
vectors, so no "ghost" copies of converged eigenvalues distort the weights; coefficients and
the tridiagonal eigenproblem in float64; the probes of a block advance together, one block
matvec (``n_probes`` vectors, one data pass) per step. Raw nodes and weights are kept so a
density can be re-smoothed with no new matvecs (:func:`spectral_density`).

Length: about 460 lines: the Gauss rules and the density they define are one job (README,
"Architecture"); the Student-t quantile at the end serves the density's band.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from basins.errors import InputError
from basins.linalg.operator import Operator, as_operator
from basins.progress import Progress, ProgressCallback

__all__ = [
    "DEFAULT_PROBES",
    "DEFAULT_STEPS",
    "PROBES",
    "SLQResult",
    "SpectralDensity",
    "slq",
    "spectral_density",
    "student_t_quantile",
]

#: Default number of probe vectors (10: the across-probe spread is then a usable error bar).
DEFAULT_PROBES = 10
#: Default Lanczos steps per probe (80 nodes: the extreme eigenvalues converge and the bulk
#: is resolved to ~1/80 of the spectral range).
DEFAULT_STEPS = 80
#: Probe distributions: Rademacher (±1/√P, lower variance for quadratic forms) or Gaussian
#: normalised (uniform on the unit sphere; used automatically after deflation).
PROBES = ("rademacher", "gaussian")


@dataclass
class SLQResult:
    """Raw Gauss quadrature rules of one SLQ run.

    Attributes:
        nodes: per probe, the Ritz values θⱼ (ascending, float64, length ≤ ``num_steps``:
            a probe stops early when its Krylov space becomes invariant).
        weights: per probe, the squared first components τⱼ² of T's eigenvectors (float64).
            They sum to 1 per probe (no renormalisation).
        residuals: per probe, ``|β_m s_mj|``: some eigenvalue of A lies within it of θⱼ.
        quadratic_forms: ``(num_probes,)`` float64, ``vᵀAv = Σⱼ τⱼ² θⱼ`` per probe.
        num_params: ``P``, the operator's dimension.
        dim: the dimension the probes live in (``P − num_deflated``).
        num_probes: probe vectors.
        num_steps: Lanczos steps asked for per probe.
        num_matvecs: matvecs (HVPs) used, counting each vector of a block.
        seed: the seed of the probes.
        probe: ``rademacher`` or ``gaussian``.
        num_deflated: directions projected out before the run (see ``deflate`` in :func:`slq`).
    """

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    residuals: list[torch.Tensor]
    quadratic_forms: torch.Tensor
    num_params: int
    dim: int
    num_probes: int
    num_steps: int
    num_matvecs: int
    seed: int
    probe: str
    num_deflated: int = 0

    @property
    def trace(self) -> float:
        """Hutchinson estimate of the trace on the probes' space, ``dim · mean(vᵀAv)``."""
        return float(self.dim * self.quadratic_forms.mean())

    @property
    def trace_stderr(self) -> float:
        """Standard error of :attr:`trace` across probes (NaN with one probe)."""
        if self.num_probes < 2:
            return math.nan
        return float(self.dim * self.quadratic_forms.std() / math.sqrt(self.num_probes))

    @property
    def lambda_min(self) -> float:
        """The smallest node over all probes (≥ the smallest eigenvalue)."""
        return min(float(t.min()) for t in self.nodes)

    @property
    def lambda_max(self) -> float:
        """The largest node over all probes (≤ the largest eigenvalue)."""
        return max(float(t.max()) for t in self.nodes)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(nodes, weights, residuals)`` as ``(num_probes, max_nodes)`` arrays.

        Missing entries (probes that stopped early) are NaN nodes/residuals and zero weights.
        """
        width = max(t.numel() for t in self.nodes)
        nodes = torch.full((self.num_probes, width), math.nan, dtype=torch.float64)
        weights = torch.zeros(self.num_probes, width, dtype=torch.float64)
        resid = torch.full((self.num_probes, width), math.nan, dtype=torch.float64)
        for i, (t, w, r) in enumerate(zip(self.nodes, self.weights, self.residuals)):
            nodes[i, : t.numel()], weights[i, : t.numel()], resid[i, : t.numel()] = t, w, r
        return nodes, weights, resid


@dataclass
class SpectralDensity:
    """A Gaussian-broadened spectral density on a grid, with a band across probes.

    Attributes:
        grid: ``(G,)`` float64: eigenvalue λ (``scale="linear"``) or ``log10|λ|`` (``"log"``).
        density: ``(G,)`` mean over probes; integrates to 1 over ``grid`` (units: 1/λ, or
            per decade of |λ|).
        density_lower: ``(G,)`` lower end of the pointwise ``coverage`` interval of the mean
            (Student t across probes, clipped at 0).
        density_upper: ``(G,)`` upper end.
        per_probe: ``(num_probes, G)`` each probe's broadened quadrature rule.
        sigma: the Gaussian width, in units of ``grid``.
        scale: ``linear`` or ``log``.
        floor: ``log`` only: nodes with ``|θ| < floor`` are placed at the floor.
        coverage: the band's nominal coverage.
    """

    grid: torch.Tensor
    density: torch.Tensor
    density_lower: torch.Tensor
    density_upper: torch.Tensor
    per_probe: torch.Tensor
    sigma: float
    scale: str
    floor: float | None
    coverage: float


def _check_budget(num_probes: int, num_steps: int, probe: str) -> None:
    if not isinstance(num_probes, int) or num_probes < 1:
        raise InputError(f"num_probes must be a positive integer, got {num_probes!r}", param="num_probes")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise InputError(f"num_steps must be a positive integer, got {num_steps!r}", param="num_steps")
    if probe not in PROBES:
        raise InputError(f"unknown probe distribution {probe!r}: use one of {', '.join(PROBES)}", param="probe")


def _probes(num_probes: int, num_params: int, probe: str, seed: int) -> torch.Tensor:
    """``(num_probes, P)`` float64 random vectors, drawn on the CPU from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if probe == "rademacher":
        return torch.randint(0, 2, (num_probes, num_params), generator=gen).to(torch.float64) * 2 - 1
    return torch.randn(num_probes, num_params, generator=gen, dtype=torch.float64)


def _project_out(W: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``W`` minus their components in the column span of orthonormal ``D``."""
    return W if D is None else W - (W @ D) @ D.T


def slq(
    operator: Operator | torch.Tensor,
    *,
    num_probes: int = DEFAULT_PROBES,
    num_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    probe: str = "rademacher",
    deflate: torch.Tensor | None = None,
    block_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    breakdown_tol: float | None = None,
    callback: ProgressCallback | None = None,
) -> SLQResult:
    """Gauss quadrature rules of the spectral measures of random probes (SLQ).

    Args:
        operator: the symmetric operator (:class:`~basins.linalg.operator.Operator`, or a dense
            tensor); its matvec receives blocks ``(P, b)`` of ``dtype`` and may return another
            float dtype (converted back).
        num_probes: probe vectors ``n_v``.
        num_steps: Lanczos steps ``m`` per probe (capped at the probes' dimension).
        seed: seeds the probes (drawn on the CPU in float64).
        probe: ``rademacher`` (±1/√P) or ``gaussian`` (uniform on the sphere). With
            ``deflate`` the probes are Gaussian, projected and normalised, so they are
            uniform on the unit sphere of the complement.
        deflate: ``(P, k)`` orthonormal columns (e.g. top eigenvectors) to project out:
            the run sees ``(I − DDᵀ) A (I − DDᵀ)`` on the complement of ``span D``, of
            dimension ``P − k``.
        block_size: probes advanced together (default all): one block matvec per step.
        dtype: dtype of the stored Lanczos vectors (float64 by default; memory
            ``block_size·(m+1)·P`` elements). Coefficients are always float64.
        device: where the Lanczos vectors live (default the operator's).
        breakdown_tol: a probe stops when ``β_j ≤ breakdown_tol·max(|α|, |β|)`` (its Krylov
            space is invariant; the quadrature is then exact). Default ``100·eps(dtype)``.
        callback: called with a :class:`~basins.progress.Progress` after every step (phase
            ``"slq"``, unit ``"matvecs"``, ``info`` "step j/m").

    Returns:
        An :class:`SLQResult`. Cost: at most ``num_probes·num_steps`` matvecs (fewer when
        probes stop early), in ``ceil(num_probes / block_size)·num_steps`` block calls.

    Raises:
        InputError: bad budget, probe name, or ``deflate`` shape; a matvec of the wrong shape.
        ComputeError: the operator returned non-finite values.
    """
    op = as_operator(operator)
    _check_budget(num_probes, num_steps, probe)
    P = op.num_params
    device = op.device if device is None else torch.device(device)
    D: torch.Tensor | None = None
    k = 0
    if deflate is not None:
        if deflate.dim() != 2 or deflate.shape[0] != P or deflate.shape[1] >= P:
            raise InputError(f"deflate must be (P, k) with k < P = {P}, got {tuple(deflate.shape)}", param="deflate")
        D = deflate.to(device, dtype)
        k = int(D.shape[1])
        probe = "gaussian"
    dim = P - k
    m = min(num_steps, dim)
    bs = num_probes if block_size is None else max(1, min(int(block_size), num_probes))
    tol = 100 * torch.finfo(dtype).eps if breakdown_tol is None else float(breakdown_tol)

    R = _probes(num_probes, P, probe, seed).to(device, dtype)
    R = _project_out(R, D)
    R = R / R.norm(dim=1, keepdim=True)

    nodes: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    resid: list[torch.Tensor] = []
    qforms: list[float] = []
    done = [0]
    max_matvecs = num_probes * m
    for start in range(0, num_probes, bs):
        alphas, betas, lengths = _lanczos_block(
            op, R[start : start + bs], m, D, tol, done, max_matvecs, callback
        )
        for a, b, n in zip(alphas, betas, lengths):
            theta, w, r = _gauss_rule(a[:n], b[:n])
            nodes.append(theta)
            weights.append(w)
            resid.append(r)
            qforms.append(float(a[0]))
    return SLQResult(
        nodes=nodes, weights=weights, residuals=resid,
        quadratic_forms=torch.tensor(qforms, dtype=torch.float64),
        num_params=P, dim=dim, num_probes=num_probes, num_steps=m, num_matvecs=done[0],
        seed=seed, probe=probe, num_deflated=k,
    )


def _lanczos_block(
    op: Operator,
    V0: torch.Tensor,
    m: int,
    D: torch.Tensor | None,
    tol: float,
    done: list[int],
    max_matvecs: int,
    callback: ProgressCallback | None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """m Lanczos steps for each row of ``V0`` (unit, orthogonal to D), all probes together.

    Returns ``alphas (b, m)``, ``betas (b, m)`` (``betas[:, j]`` = norm after step j) in
    float64, and each probe's number of steps (< m after a breakdown).
    """
    b, P = V0.shape
    Q = torch.zeros(b, m + 1, P, dtype=V0.dtype, device=V0.device)
    Q[:, 0] = V0
    alphas = torch.zeros(b, m, dtype=torch.float64)
    betas = torch.zeros(b, m, dtype=torch.float64)
    lengths = [m] * b
    active = torch.ones(b, dtype=torch.bool)
    scale = torch.zeros(b, dtype=torch.float64)
    for j in range(m):
        idx = active.nonzero().flatten()
        full = bool(active.all())
        Qa = Q[:, : j + 1] if full else Q[idx, : j + 1]  # (a, j+1, P)
        V = Qa[:, j]
        W = op.apply(V.T.contiguous()).T  # checked: shape, finite; V's dtype
        done[0] += V.shape[0]
        W = _project_out(W, D)
        alpha = (W * V).sum(dim=1)
        W = W - alpha[:, None] * V
        if j > 0:
            W = W - betas[idx, j - 1].to(W.device, W.dtype)[:, None] * Qa[:, j - 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough (Parlett's "twice is enough")
            W = W - torch.einsum("ajp,aj->ap", Qa, torch.einsum("ajp,ap->aj", Qa, W))
            W = _project_out(W, D)
        beta = W.norm(dim=1)
        alphas[idx, j] = alpha.to(torch.float64).cpu()
        betas[idx, j] = beta.to(torch.float64).cpu()
        scale[idx] = torch.maximum(scale[idx], torch.maximum(alphas[idx, j].abs(), betas[idx, j]))
        if j + 1 < m:
            broke = betas[idx, j] <= tol * scale[idx]
            for pos in broke.nonzero().flatten().tolist():
                lengths[int(idx[pos])] = j + 1
                active[idx[pos]] = False
            keep = ~broke
            if bool(keep.any()):
                Q[idx[keep], j + 1] = W[keep.to(W.device)] / beta[keep.to(beta.device)][:, None]
        if callback is not None:
            callback(Progress("slq", done[0], max_matvecs, "matvecs", info=f"step {j + 1}/{m}"))
        if not bool(active.any()):
            break
    return alphas, betas, lengths


def _gauss_rule(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nodes, weights and residual bounds of the tridiagonal ``T = tridiag(β, α, β)``.

    ``beta[-1]`` is the norm after the last step: the residuals are ``|β_m s_mj|``.
    """
    n = alpha.numel()
    T = torch.diag(alpha)
    if n > 1:
        off = beta[: n - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[0] ** 2, (beta[n - 1] * S[-1]).abs()


# ---------------------------------------------------------------------- densities
def _as_rules(nodes: Any, weights: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-probe (nodes, weights) as float64 tensors, dropping NaN padding and zero weights."""
    rules = []
    for t, w in zip(nodes, weights):
        t = torch.as_tensor(np.asarray(t, dtype=np.float64))
        w = torch.as_tensor(np.asarray(w, dtype=np.float64))
        keep = torch.isfinite(t) & (w > 0)
        rules.append((t[keep], w[keep]))
    if not rules or all(t.numel() == 0 for t, _ in rules):
        raise InputError("no quadrature nodes to smooth (empty or all-NaN nodes)")
    return rules


def spectral_density(
    nodes: Sequence[Any] | torch.Tensor | np.ndarray,
    weights: Sequence[Any] | torch.Tensor | np.ndarray,
    *,
    scale: str = "linear",
    num_points: int = 1000,
    sigma: float | None = None,
    grid: torch.Tensor | None = None,
    floor: float | None = None,
    coverage: float = 0.95,
) -> SpectralDensity:
    """Gaussian-broadened density of SLQ quadrature rules; no matvecs.

    ``ρ(x) = mean_probes Σⱼ τⱼ² φ_σ(x − θⱼ)``, with ``φ_σ`` the normal density of width σ.

    Args:
        nodes: per probe, the nodes (a list of 1-D arrays, or a NaN-padded 2-D array as
            stored in reports).
        weights: per probe, the weights (zero-padded in the 2-D form).
        scale: ``linear`` (grid in λ) or ``log`` (grid in ``log10|λ|``; positive and
            negative eigenvalues are merged by magnitude).
        num_points: grid size when ``grid`` is not given.
        sigma: Gaussian width in grid units. Default: 1% of the node range (linear), 0.1
            decade (log). The default grid spans the nodes ± 6σ, so the density integrates
            to 1 (trapezoid rule) to ~1e-8.
        grid: explicit grid (overrides ``num_points``).
        floor: ``log`` only: magnitudes below it are placed at it. Default
            ``1e-12·max|θ|``.
        coverage: nominal coverage of the band (Student t interval of the mean across
            probes, pointwise; equal to the density with one probe).

    Returns:
        A :class:`SpectralDensity`.
    """
    if scale not in ("linear", "log"):
        raise InputError(f"unknown density scale {scale!r}: use linear or log", param="scale")
    if not 0 < coverage < 1:
        raise InputError(f"coverage must be in (0, 1), got {coverage}", param="coverage")
    rules = _as_rules(nodes, weights)
    every = torch.cat([t for t, _ in rules])
    used_floor: float | None = None
    if scale == "log":
        top = float(every.abs().max())
        if top == 0:
            raise InputError("every node is zero: a log-scale density is undefined; use the linear scale",
                             param="scale")
        used_floor = float(floor) if floor is not None else 1e-12 * top
        rules = [(torch.log10(t.abs().clamp_min(used_floor)), w) for t, w in rules]
        every = torch.cat([t for t, _ in rules])
    lo, hi = float(every.min()), float(every.max())
    if sigma is None:
        width = hi - lo
        sigma = 0.1 if scale == "log" else (0.01 * width if width > 0 else 0.01 * max(abs(hi), 1.0))
    if not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma}", param="sigma")
    if grid is None:
        grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, int(num_points), dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    per_probe = torch.stack([
        (w[None, :] * torch.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2)).sum(dim=1) * norm
        for t, w in rules
    ])
    mean = per_probe.mean(dim=0)
    nv = per_probe.shape[0]
    if nv > 1:
        half = student_t_quantile(0.5 + coverage / 2, nv - 1) * per_probe.std(dim=0) / math.sqrt(nv)
        lower, upper = (mean - half).clamp_min(0), mean + half
    else:
        lower, upper = mean.clone(), mean.clone()
    return SpectralDensity(grid, mean, lower, upper, per_probe, float(sigma), scale, used_floor, coverage)


@lru_cache(maxsize=64)
def student_t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``dof`` degrees of freedom.

    Bisection on the CDF, integrated numerically (Simpson, 201 points) in the variable
    ``u = arctan(t/√dof)``, where the integrand ``∝ cos(u)^(dof−1)`` is smooth; accurate
    to ~1e-8. Used for the across-probe intervals of SLQ and :mod:`basins.analyses.nullity`.
    """
    if not 0 < p < 1 or dof < 1:
        raise ValueError(f"need 0 < p < 1 and dof ≥ 1, got p={p}, dof={dof}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1 - p, dof)

    # P(0 ≤ T ≤ t) = ∫_0^{atan(t/√ν)} cos(u)^(ν−1) du / ∫_0^{π/2} cos(u)^(ν−1) du
    def mass(x: float) -> float:  # ∫_0^x cos^(ν−1), Simpson on 201 points
        s = np.linspace(0.0, x, 201)
        g = np.cos(s) ** (dof - 1)
        return float((s[1] - s[0]) / 3 * (g[0] + g[-1] + 4 * g[1:-1:2].sum() + 2 * g[2:-1:2].sum()))

    total = mass(math.pi / 2)
    target = (p - 0.5) * 2 * total
    a, b = 0.0, math.pi / 2
    for _ in range(80):
        mid = (a + b) / 2
        if mass(mid) < target:
            a = mid
        else:
            b = mid
    return math.tan((a + b) / 2) * math.sqrt(dof)
