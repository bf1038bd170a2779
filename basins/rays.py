"""Rays from θ*: random directions, each regenerated from its own seed, and where the loss crosses ε along them.

A direction is a unit vector ``u`` of length ``P``. Pair ``j`` of a family is drawn from its own
generator, ``torch.Generator().manual_seed(ray_seed(seed, family, j))``, in float64 on the CPU,
so any single ray can be regenerated without storing P-vectors, and the rays of one family do
not change when other families are asked for. Rays come in **antithetic pairs** ``±u``: pair
``j`` gives rays ``2j`` (``+u``) and ``2j + 1`` (``−u``), which measure the basin's asymmetry
for free and are resampled together by the bootstrap.

Families (the subspace the directions fill):

* ``isotropic``: ``u = g / ‖g‖``, ``g ~ N(0, I_P)``: uniform on the unit sphere of ℝᴾ.
* ``top``: ``u = V c / ‖c‖``, ``c ~ N(0, I_k)``, ``V`` (P, k) orthonormal top Hessian
  eigenvectors: uniform on the unit sphere of their span (the steep walls).
* ``floor``: ``u = (I − V Vᵀ) g / ‖·‖``: uniform on the sphere of the orthogonal complement
  (the floor of the basin, once the top-k directions are deflated).

Normalisations: ``isotropic`` (plain unit vectors) or ``filter`` (Li et al. 2018, "Visualizing
the loss landscape of neural nets"): each filter of the Gaussian draw (a row, i.e. a slice
along dim 0, of every parameter tensor with ≥ 2 dims; each 1-D tensor such as a bias as one
filter) is rescaled to the norm of the same filter of θ*, then the whole vector to unit norm.
Known limitation: filter-normalised directions are not uniform on the sphere, so a volume
computed from them is not the basin's volume (:mod:`basins.probing` reports none for them).

Radius search (:func:`find_radii`). Along a unit direction ``u`` the criterion is
``C(r) = L(θ* + r u) − L(θ*)``; the ray's radius at level ε is the first ``r`` with ``C(r) ≥ ε`` (DESIGN.md section 3). The search works in
``x = log r`` on ``f(x) = log C − log ε``, which is linear in ``x`` for a power-law wall
``C ≈ a rᵖ``: a slope-``p`` Newton step from a good guess (the quadratic radius, the running
median, or the ray's radius at the previous ε) brackets the crossing, then a safeguarded
Illinois (modified regula falsi) step with tolerance nudging closes the bracket to
``log(1 + rtol)``; bisection takes over when the bracket stops halving. All rays advance
together: each step evaluates one ``(K, P)`` batch of points through the batched criterion.

Known limitations: "first" crossing means first among the points evaluated — every point
evaluated below the bracket had ``C < ε`` — not a certificate that no thin wall was stepped
over; rays whose loss is seen to drop back below ε farther out (later ε of the ladder, wall
grid) are flagged ``reentered``. Rays with no crossing below ``max_radius`` are **censored**:
counted, given ``max_radius`` (so the volume becomes a lower bound), never called crossings.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ComputeError, InputError

__all__ = [
    "FAMILIES",
    "NORMALISATIONS",
    "DirectionSampler",
    "ray_seed",
    "filter_groups",
    "orthonormal_basis",
    "Criterion",
    "DEFAULT_WALL_T",
    "CROSSED",
    "CENSORED",
    "COLLAPSED",
    "UNCONVERGED",
    "RaySearch",
    "default_radius_rtol",
    "find_radii",
    "flag_reentries",
    "wall_profiles",
]

FAMILIES = ("isotropic", "top", "floor")
NORMALISATIONS = ("isotropic", "filter")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def ray_seed(seed: int, family: str, index: int) -> int:
    """The seed of pair ``index`` of ``family`` under the run's ``seed``: a 63-bit integer.

    A SplitMix64 hash of ``(seed, crc32(family), index)``: stable across processes and
    platforms (unlike Python's ``hash``), distinct for neighbouring indices.
    """
    h = _splitmix64((int(seed) & _MASK64) ^ 0x5BD1E995)
    h = _splitmix64(h ^ zlib.crc32(family.encode()))
    h = _splitmix64(h ^ (int(index) & _MASK64))
    return h & ((1 << 63) - 1)


def filter_groups(shapes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slices of the flat vector, one per filter (Li et al. 2018).

    Args:
        shapes: the parameter tensors' shapes, in flat order (``ParamSpace.shapes``).

    Returns:
        One slice per row (slice along dim 0) of each tensor with ≥ 2 dims, and one per
        tensor with ≤ 1 dim.
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= int(s)
        if len(shape) >= 2 and shape[0] > 0:
            row = numel // int(shape[0])
            groups.extend((start + i * row, start + (i + 1) * row) for i in range(int(shape[0])))
        elif numel:
            groups.append((start, start + numel))
        start += numel
    return groups


def orthonormal_basis(vectors: torch.Tensor) -> torch.Tensor:
    """An orthonormal float64 basis ``(P, k)`` of the span of ``vectors`` (P, k), by QR.

    Raises:
        InputError: the vectors are not of full column rank.
    """
    V = vectors.detach().to("cpu", torch.float64)
    if V.dim() != 2 or V.shape[1] == 0:
        raise InputError(f"a basis must be a (P, k) matrix with k ≥ 1, got shape {tuple(V.shape)}")
    Q, R = torch.linalg.qr(V)
    diag = R.diagonal().abs()
    if bool((diag <= 1e-10 * diag.max()).any()):
        raise InputError("the basis vectors are linearly dependent")
    return Q


@dataclass
class DirectionSampler:
    """Draws the directions of one family, pair by pair, from per-pair seeds.

    Args:
        num_params: ``P``.
        family: one of :data:`FAMILIES`.
        normalisation: one of :data:`NORMALISATIONS`.
        basis: ``(P, k)`` orthonormal float64 basis (top eigenvectors); needed by ``top`` and
            ``floor``.
        theta0: ``(P,)`` θ*, needed by ``filter``.
        groups: filter slices (:func:`filter_groups`), needed by ``filter``; default one
            group (the whole vector).
        seed: the run's seed.
    """

    num_params: int
    family: str = "isotropic"
    normalisation: str = "isotropic"
    basis: torch.Tensor | None = None
    theta0: torch.Tensor | None = None
    groups: Sequence[tuple[int, int]] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InputError(f"unknown ray family {self.family!r}: use one of {', '.join(FAMILIES)}")
        if self.normalisation not in NORMALISATIONS:
            raise InputError(
                f"unknown direction normalisation {self.normalisation!r}: use one of {', '.join(NORMALISATIONS)}"
            )
        if self.family != "isotropic":
            if self.basis is None:
                raise InputError(f"ray family {self.family!r} needs the top Hessian eigenvectors (a basis)")
            self.basis = orthonormal_basis(self.basis)
            if self.basis.shape[0] != self.num_params:
                raise InputError(f"the basis has {self.basis.shape[0]} rows, expected P = {self.num_params}")
            if self.family == "floor" and self.basis.shape[1] >= self.num_params:
                raise InputError("the floor family needs fewer eigenvectors than parameters")
        if self.normalisation == "filter":
            if self.theta0 is None:
                raise InputError("filter-normalised directions need θ*")
            self._theta = self.theta0.detach().to("cpu", torch.float64).reshape(-1)
            self._groups = list(self.groups) if self.groups is not None else [(0, self.num_params)]

    @property
    def dimension(self) -> int:
        """Dimension of the subspace the directions fill (``P``, ``k`` or ``P − k``)."""
        if self.family == "isotropic":
            return self.num_params
        assert self.basis is not None
        k = int(self.basis.shape[1])
        return k if self.family == "top" else self.num_params - k

    @property
    def is_uniform(self) -> bool:
        """Whether the directions are uniform on the unit sphere of their subspace (volumes valid)."""
        return self.normalisation == "isotropic"

    def pair_seed(self, index: int) -> int:
        """Seed of pair ``index`` (see :func:`ray_seed`)."""
        return ray_seed(self.seed, self.family, index)

    def direction(self, index: int) -> torch.Tensor:
        """The unit direction ``+u`` of pair ``index``: ``(P,)`` float64 on the CPU."""
        gen = torch.Generator().manual_seed(self.pair_seed(index))
        if self.family == "top":
            assert self.basis is not None
            c = torch.randn(self.basis.shape[1], generator=gen, dtype=torch.float64)
            v = self.basis @ c
        else:
            v = torch.randn(self.num_params, generator=gen, dtype=torch.float64)
            if self.family == "floor":
                assert self.basis is not None
                v = v - self.basis @ (self.basis.T @ v)
        if self.normalisation == "filter":
            v = self._filter_normalise(v)
        norm = float(v.norm())
        if not norm > 0:
            raise ComputeError(f"direction {index} has zero norm (θ* is zero on every filter it touches?)")
        return v / norm

    def _filter_normalise(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for a, b in self._groups:
            gn = float(v[a:b].norm())
            if gn > 0:
                out[a:b] = v[a:b] * (float(self._theta[a:b].norm()) / gn)
        return out

    def pairs(
        self, indices: Sequence[int], *, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """The ``+u`` directions of the given pairs as rows: ``(len(indices), P)`` in ``dtype`` on ``device``."""
        if not indices:
            return torch.zeros(0, self.num_params, dtype=dtype, device=device)
        return torch.stack([self.direction(i) for i in indices]).to(device=device, dtype=dtype)



# ---------------------------------------------------------------------- radius search
#: A batched criterion: ``(K, P)`` absolute parameter points → ``(K,)`` values of ``C = L − L(θ*)``.
Criterion = Callable[[torch.Tensor], torch.Tensor]

#: Default wall grid: ``t = 2^k``, ``k = −6 … 3``, i.e. 1/64 … 8 (t = 1 is the crossing, not evaluated).
DEFAULT_WALL_T = tuple(2.0**k for k in range(-6, 4))

#: Ray status codes (per ray and ε).
CROSSED, CENSORED, COLLAPSED, UNCONVERGED = 0, 1, 2, 3

_F_CLIP = 60.0  # |log C/ε| beyond this carries no information for the step
_OVERSHOOT = 1.1  # bracketing steps aim 10% past the predicted root
_TINY = 1e-300


def default_radius_rtol(num_params: int) -> float:
    """``min(1e-3, 0.1 / P)``: a relative radius error δ moves ``log V`` by about ``P·δ`` ≤ 0.1 nats."""
    return min(1e-3, 0.1 / max(1, num_params))


@dataclass
class RaySearch:
    """Radii of K rays at an ε ladder.

    Attributes:
        radii: ``(K, E)`` float64, the geometric midpoint of the final bracket (parameter
            units); ``max_radius`` for censored rays, ``min_radius`` for collapsed ones.
        log_error: ``(K, E)`` half-width of the final bracket in ``log r`` (≤ ``log1p(rtol)/2``).
        status: ``(K, E)`` int8: :data:`CROSSED`, :data:`CENSORED` (no crossing below
            ``max_radius``), :data:`COLLAPSED` (``C ≥ ε`` already at ``min_radius``),
            :data:`UNCONVERGED` (step budget spent).
        reentered: ``(K, E)`` bool: a point beyond the crossing was seen with ``C < ε``.
        num_evals: ``(K, E)`` int, criterion evaluations spent on each ray and ε.
        history: ``(ray, log r, C)`` of every evaluation, as three flat arrays.
    """

    radii: np.ndarray
    log_error: np.ndarray
    status: np.ndarray
    reentered: np.ndarray
    num_evals: np.ndarray
    history: tuple[np.ndarray, np.ndarray, np.ndarray] = field(repr=False)


class _Evaluator:
    """Evaluates ``C`` at ``θ* + signs[k]·e^x·U[rows[k]]`` for rays k; keeps the history."""

    def __init__(self, criterion: Criterion, theta0: torch.Tensor, directions: torch.Tensor,
                 signs: np.ndarray, rows: np.ndarray, point_batch: int) -> None:
        self.criterion, self.theta0, self.U = criterion, theta0, directions
        self.signs, self.rows = signs, rows
        self.point_batch = max(1, point_batch)
        self.rays: list[np.ndarray] = []
        self.xs: list[np.ndarray] = []
        self.cs: list[np.ndarray] = []
        self.count = 0

    def __call__(self, rays: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.empty(rays.size)
        scale = self.signs[rays] * np.exp(x)
        for s in range(0, rays.size, self.point_batch):
            sl = slice(s, s + self.point_batch)
            coef = torch.as_tensor(scale[sl], dtype=self.theta0.dtype, device=self.theta0.device)
            idx = torch.as_tensor(self.rows[rays[sl]], device=self.U.device)
            pts = self.theta0.unsqueeze(0) + coef.unsqueeze(1) * self.U[idx]
            vals = self.criterion(pts)
            if tuple(vals.shape) != (pts.shape[0],):
                raise InputError(f"the criterion must map ({pts.shape[0]}, P) points to ({pts.shape[0]},) values, "
                                 f"it returned shape {tuple(vals.shape)}")
            out[sl] = vals.detach().to("cpu", torch.float64).numpy()
        self.count += rays.size
        self.rays.append(rays.copy())
        self.xs.append(np.asarray(x, dtype=np.float64).copy())
        self.cs.append(out.copy())
        return out

    def history(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.rays:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        return np.concatenate(self.rays), np.concatenate(self.xs), np.concatenate(self.cs)


def _bracket_from_history(ev: _Evaluator, K: int, eps: float) -> tuple[np.ndarray, ...]:
    """Per ray: the smallest evaluated x with C ≥ ε (hi) and the largest x below it with C < ε (lo)."""
    rays, xs, cs = ev.history()
    lo, hi = np.full(K, -np.inf), np.full(K, np.inf)
    clo, chi = np.full(K, np.nan), np.full(K, np.nan)
    above = ~(cs < eps)  # NaN counts as above
    np.minimum.at(hi, rays[above], xs[above])
    below = (cs < eps) & (xs < hi[rays])
    np.maximum.at(lo, rays[below], xs[below])
    for mask, target, vals in ((below, lo, clo), (above, hi, chi)):
        sel = mask & (xs == target[rays])
        vals[rays[sel]] = cs[sel]
    return lo, clo, hi, chi


def _f(c: np.ndarray, log_eps: float) -> np.ndarray:
    """``log C − log ε`` clipped to ±60; C ≤ 0 → −60; NaN/inf → +60."""
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.log(np.maximum(c, _TINY)) - log_eps
    f = np.where(np.isfinite(c), f, _F_CLIP)
    return np.clip(f, -_F_CLIP, _F_CLIP)


def _solve(ev: _Evaluator, eps: float, lo: np.ndarray, clo: np.ndarray, hi: np.ndarray,
           chi: np.ndarray, x0: np.ndarray, *, tol: float, x_max: float, x_min: float, max_steps: int,
           slope: float, on_step: Callable[[], None] | None) -> tuple[np.ndarray, ...]:
    """Find the crossing of ``C = ε`` for every ray (vectorised state machine over rays)."""
    K = x0.size
    le = math.log(eps)
    eta = 0.45 * tol
    flo, fhi = _f(np.nan_to_num(clo, nan=_TINY), le), _f(np.nan_to_num(chi, nan=np.inf), le)
    flo_m, fhi_m = flo.copy(), fhi.copy()
    status = np.full(K, UNCONVERGED, dtype=np.int8)
    nevals = np.zeros(K, dtype=np.int64)
    last_side = np.zeros(K, dtype=np.int8)
    width_prev = np.full(K, np.inf)
    slow = np.zeros(K, dtype=np.int64)
    px, pf = np.full(K, np.nan), np.full(K, np.nan)  # previous point of a one-sided expansion
    cap = np.full(K, math.log(1e3))
    done = np.isfinite(lo) & np.isfinite(hi) & (hi - lo <= tol)
    status[done] = CROSSED
    censored_known = ~done & (lo >= x_max)
    status[censored_known], done = CENSORED, done | censored_known
    # First point: the guess, kept inside what is already known.
    x = np.where(np.isfinite(lo), np.maximum(x0, lo + eta), x0)
    x = np.where(np.isfinite(hi), np.minimum(x, hi - eta), x)
    both = np.isfinite(lo) & np.isfinite(hi)
    if both.any():
        sec = lo[both] - flo[both] * (hi[both] - lo[both]) / np.maximum(fhi[both] - flo[both], 1e-300)
        inside = (x[both] > lo[both]) & (x[both] < hi[both])
        x[both] = np.where(inside, x[both], sec)
    x = np.clip(x, x_min, x_max)
    for _ in range(max_steps):
        act = np.nonzero(~done)[0]
        if act.size == 0:
            break
        xa = x[act]
        c = ev(act, xa)
        nevals[act] += 1
        f = _f(c, le)
        below = f < 0
        was_bracketed = np.isfinite(lo[act]) & np.isfinite(hi[act])
        side = np.where(below, -1, 1).astype(np.int8)
        # One-sided expansion memory (secant slope from two points on the same side).
        sl = np.where(np.isfinite(px[act]) & (xa != px[act]), (f - pf[act]) / np.where(xa != px[act], xa - px[act], 1.0), np.nan)
        # Update the bracket.
        ib, ia = act[below], act[~below]
        lo[ib], flo[ib], flo_m[ib] = xa[below], f[below], f[below]
        hi[ia], fhi[ia], fhi_m[ia] = xa[~below], f[~below], f[~below]
        illinois = was_bracketed & (side == last_side[act])
        halve_lo = act[illinois & (side == 1)]
        halve_hi = act[illinois & (side == -1)]
        flo_m[halve_lo] *= 0.5
        fhi_m[halve_hi] *= 0.5
        last_side[act] = side
        # Terminal states.
        cens = below & (xa >= x_max - 1e-12)
        coll = ~below & (xa <= x_min + 1e-12)
        status[act[cens]], done[act[cens]] = CENSORED, True
        status[act[coll]], done[act[coll]] = COLLAPSED, True
        bracketed = np.isfinite(lo[act]) & np.isfinite(hi[act])
        width = hi[act] - lo[act]
        fin = bracketed & (width <= tol) & ~cens & ~coll
        status[act[fin]], done[act[fin]] = CROSSED, True
        # Next points.
        go = ~done[act]
        nx = xa.copy()
        # (a) bracketed: Illinois step, bisection when the bracket stops halving.
        b = go & bracketed
        if b.any():
            i = act[b]
            shrank = width[b] <= 0.7 * width_prev[i]
            slow[i] = np.where(shrank, 0, slow[i] + 1)
            width_prev[i] = width[b]
            denom = fhi_m[i] - flo_m[i]
            xs = lo[i] - flo_m[i] * (hi[i] - lo[i]) / np.where(denom > 0, denom, 1.0)
            xs = np.where((denom > 0) & (slow[i] < 2), xs, 0.5 * (lo[i] + hi[i]))
            slow[i] = np.where(slow[i] >= 2, 0, slow[i])
            nx[b] = np.clip(xs, lo[i] + eta, hi[i] - eta)
        # (b) one-sided: Newton step in log-log with the measured (or default) slope, capped.
        o = go & ~bracketed
        if o.any():
            i = act[o]
            s = sl[o]
            s = np.where(np.isfinite(s) & (s > 0.25), np.minimum(s, 32.0), slope)
            step = np.minimum(np.abs(f[o]) / s * _OVERSHOOT + eta, cap[i])
            cap[i] *= 2.0
            up = below[o]
            nx[o] = np.where(up, np.minimum(xa[o] + step, x_max), np.maximum(xa[o] - step, x_min))
            px[i], pf[i] = xa[o], f[o]
        # A new bracket forgets the one-sided memory.
        px[act[b]] = np.nan
        x[act] = nx
        if on_step is not None:
            on_step()
    mid = np.where(np.isfinite(lo) & np.isfinite(hi), 0.5 * (lo + hi), np.where(np.isfinite(lo), lo, hi))
    err = np.where(np.isfinite(lo) & np.isfinite(hi), 0.5 * (hi - lo), np.inf)
    mid = np.where(status == CENSORED, x_max, np.where(status == COLLAPSED, x_min, mid))
    err = np.where((status == CENSORED) | (status == COLLAPSED), 0.0, err)
    return mid, err, status, nevals


def find_radii(
    criterion: Criterion,
    theta0: torch.Tensor,
    directions: torch.Tensor,
    epsilons: Sequence[float],
    *,
    signs: np.ndarray | Sequence[float] | None = None,
    rows: np.ndarray | None = None,
    rtol: float = 1e-3,
    max_radius: float = 1e3,
    min_radius: float | None = None,
    log_guess: np.ndarray | float | None = None,
    ladder_shift: Sequence[float] | None = None,
    slope: float = 2.0,
    max_steps: int = 100,
    point_batch: int = 1024,
    on_step: Callable[[], None] | None = None,
) -> RaySearch:
    """First radius where ``C`` reaches each ε, for K rays at once.

    Args:
        criterion: batched ``C``: ``(k, P)`` points → ``(k,)``; ``C(θ*) = 0``.
        theta0: ``(P,)`` θ*, in the criterion's dtype/device.
        directions: ``(D, P)`` unit directions (same dtype/device).
        epsilons: the ε ladder (loss units), searched in increasing order.
        signs: ``(K,)`` ±1 per ray (ray k goes along ``signs[k]·directions[rows[k]]``);
            default +1. rows: ``(K,)`` direction row of each ray; default ``arange(D)``.
        rtol: relative radius tolerance δ: the final bracket satisfies ``r_hi/r_lo ≤ 1 + δ``.
        max_radius: rays still below ε there are censored.
        min_radius: rays already at or above ε there have collapsed (default ``max_radius·1e-12``).
        log_guess: ``(K,)`` or scalar guess of ``log r`` at the first ε (default
            ``log(max_radius) − 6``).
        ladder_shift: ``(E − 1,)`` guessed ``log r(ε_{j+1}) − log r(ε_j)`` (default
            ``½ log(ε_{j+1}/ε_j)``, a quadratic wall).
        slope: default ``d log C / d log r`` for the first step (2: quadratic).
        max_steps: step budget per ray and ε.
        point_batch: rows per criterion call (memory: ``point_batch × P`` values).
        on_step: called after every batched evaluation.

    Returns:
        :class:`RaySearch`. Cost: ``num_evals.sum()`` criterion evaluations (typically 3–8
        per ray and ε from a good guess).
    """
    eps = [float(e) for e in epsilons]
    if not eps or any(not (e > 0 and math.isfinite(e)) for e in eps):
        raise InputError(f"every ε must be a positive finite number, got {list(epsilons)}")
    if sorted(eps) != eps or len(set(eps)) != len(eps):
        raise InputError(f"the ε ladder must be strictly increasing, got {eps}")
    if not 0 < rtol < 1:
        raise InputError(f"the radius tolerance must be in (0, 1), got {rtol}")
    if not (max_radius > 0 and math.isfinite(max_radius)):
        raise InputError(f"the maximum radius must be positive and finite, got {max_radius}")
    rows_ = np.arange(directions.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    K = rows_.size
    sg = np.ones(K) if signs is None else np.asarray(signs, dtype=np.float64).reshape(-1)
    if sg.size != K:
        raise InputError(f"got {sg.size} signs for {K} rays")
    ev = _Evaluator(criterion, theta0, directions, sg, rows_, point_batch)
    x_max = math.log(max_radius)
    x_min = math.log(min_radius) if min_radius else x_max - 12 * math.log(10.0)
    tol = math.log1p(rtol)
    E = len(eps)
    radii, errs = np.zeros((K, E)), np.zeros((K, E))
    status, nev = np.zeros((K, E), np.int8), np.zeros((K, E), np.int64)
    guess = np.broadcast_to(np.asarray(x_max - 6.0 if log_guess is None else log_guess, dtype=np.float64), (K,)).copy()
    for j, e in enumerate(eps):
        lo, clo, hi, chi = _bracket_from_history(ev, K, e)
        if j > 0:
            shift = ladder_shift[j - 1] if ladder_shift is not None else 0.5 * math.log(e / eps[j - 1])
            prev = np.log(radii[:, j - 1])
            guess = np.where(status[:, j - 1] == CROSSED, prev + shift, guess + shift)
        mid, err, st, n = _solve(ev, e, lo, clo, hi, chi, guess, tol=tol, x_max=x_max, x_min=x_min,
                                 max_steps=max_steps, slope=slope, on_step=on_step)
        radii[:, j], errs[:, j], status[:, j], nev[:, j] = np.exp(mid), err, st, n
        radii[st == CENSORED, j] = max_radius
        radii[st == COLLAPSED, j] = math.exp(x_min)
    reentered = flag_reentries(ev.history(), radii, status, eps, margin=2 * tol)
    return RaySearch(radii, errs, status, reentered, nev, ev.history())


def flag_reentries(history: tuple[np.ndarray, np.ndarray, np.ndarray], radii: np.ndarray, status: np.ndarray,
                   eps: Sequence[float], *, margin: float = 1e-9) -> np.ndarray:
    """``(K, E)`` bool: a point beyond the crossing (by more than ``margin`` in log r) was seen with ``C < ε``.

    Args:
        history: ``(ray, log r, C)`` flat arrays of evaluated points (e.g. a search's history
            concatenated with the wall grid's points).
        radii, status: ``(K, E)`` from :func:`find_radii`.
        margin: points closer than this (in log r) to the crossing are ignored, so that
            evaluation noise within the radius tolerance is not taken for a re-entry.
        eps: the ε ladder.
    """
    rays, xs, cs = history
    out = np.zeros(radii.shape, dtype=bool)
    for j, e in enumerate(eps):
        beyond = (xs > np.log(radii[rays, j]) + margin) & (cs < e) & (status[rays, j] == CROSSED)
        out[rays[beyond], j] = True
    return out


def wall_profiles(
    criterion: Criterion,
    theta0: torch.Tensor,
    directions: torch.Tensor,
    radii: np.ndarray,
    t: Sequence[float] | np.ndarray = DEFAULT_WALL_T,
    *,
    signs: np.ndarray | Sequence[float] | None = None,
    rows: np.ndarray | None = None,
    point_batch: int = 1024,
    on_step: Callable[[], None] | None = None,
) -> np.ndarray:
    """``C(t·r(u))`` for every ray and grid point: ``(K, T)`` float64 (``NaN`` where ``r`` is NaN).

    Points with ``t == 1`` are not evaluated (``C = ε`` there by construction) and come back
    as NaN; fill them with ε. Cost: ``K × #(t ≠ 1)`` criterion evaluations.
    """
    tt = np.asarray(t, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64).reshape(-1)
    K = r.size
    rows_ = np.arange(K) if rows is None else np.asarray(rows, dtype=np.int64)
    sg = np.ones(K) if signs is None else np.asarray(signs, dtype=np.float64)
    out = np.full((K, tt.size), np.nan)
    ok = np.isfinite(r) & (r > 0)
    cols = np.nonzero(tt != 1.0)[0]
    grid_k, grid_j = np.meshgrid(np.nonzero(ok)[0], cols, indexing="ij")
    kk, jj = grid_k.reshape(-1), grid_j.reshape(-1)
    if kk.size:
        ev = _Evaluator(criterion, theta0, directions, sg, rows_, point_batch)
        for s in range(0, kk.size, max(1, point_batch)):
            k, jx = kk[s : s + point_batch], jj[s : s + point_batch]
            out[k, jx] = ev(k, np.log(r[k] * tt[jx]))
            if on_step is not None:
                on_step()
    return out
