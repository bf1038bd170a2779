"""Where the loss crosses ε along rays from θ*: the batched radius search and wall profiles.

Radius search (:func:`find_radii`). Along a unit direction ``u`` the criterion is
``C(r) = L(θ* + r u) − L(θ*)``; the ray's radius at level ε is the first ``r`` with ``C(r) ≥ ε`` (the paper's volume section). The search works in
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from basins.errors import InputError

__all__ = [
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
        raise InputError(f"epsilons must be positive finite numbers, got {list(epsilons)}", param="epsilons")
    if sorted(eps) != eps or len(set(eps)) != len(eps):
        raise InputError(f"epsilons (the ε ladder) must be strictly increasing, got {eps}", param="epsilons")
    if not 0 < rtol < 1:
        raise InputError(f"rtol (the radius tolerance) must be in (0, 1), got {rtol}", param="rtol")
    if not (max_radius > 0 and math.isfinite(max_radius)):
        raise InputError(f"max_radius must be positive and finite, got {max_radius}", param="max_radius")
    rows_ = np.arange(directions.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    K = rows_.size
    sg = np.ones(K) if signs is None else np.asarray(signs, dtype=np.float64).reshape(-1)
    if sg.size != K:
        raise InputError(f"signs holds {sg.size} values for {K} rays", param="signs")
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
