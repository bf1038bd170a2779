"""Basin volume and wall shape by random probing (README, "Architecture"; the paper's volume section): the entry points.

:func:`probe_basin` runs the whole analysis on any batched criterion
``C: (K, P) points → (K,)`` (closed-form losses in tests); :func:`probe_problem` connects it to a
:class:`basins.Problem` (``C = L − L(θ*)`` through ``loss_many``, HVPs for the quadratic radius
``sqrt(2ε/uᵀHu)``, Lanczos or the dense Hessian for the ``top``/``floor`` families and the
quadratic baseline). For each ray family:

1. antithetic pairs ``±u`` from per-pair seeds (:class:`basins.analyses.volume.directions.DirectionSampler`);
2. the first radius where ``C`` reaches each ε of the ladder (:func:`basins.analyses.volume.directions.find_radii`),
   batches of rays advancing together, guesses from the quadratic radius, the running median
   and the ray's radius at the previous ε;
3. volume ``log V = log V_ball(d) + logmeanexp(d·log rᵢ)`` and the Gaussian prior mass, with
   ESS, the largest weight's share, a pair bootstrap CI or an explicit lower bound
   (:mod:`basins.analyses.volume.estimators`);
4. with ``walls``: ``C(t·r(u))`` on a geometric grid of ``t``, the local exponent
   ``p = dlog C/dlog t`` at the crossing, the floor radius (``C = 1% of ε``), the anharmonicity
   ``log(r/r_quad)`` (one HVP per pair) and the asymmetry ``log(r₊/r₋)``; quantiles across rays.

Known limitations: volumes need directions uniform on the sphere of their subspace, so none is
given for filter-normalised rays; ``top`` and ``floor`` give the volume of the d-dimensional
*section* (d = k or P − k) through θ*, not of the basin; the prior mass is only given for
isotropic rays. In high dimension the volume is usually a lower bound (see :mod:`basins.analyses.volume.estimators`).

References: Li et al. 2018 (filter normalisation); Scherlis & Belrose 2024 (prior mass of a
basin); Dowell & Jarratt, BIT 11 (1971) (the Illinois method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from basins.analyses.eigen import hessian_eigenpairs
from basins.analyses.volume.criterion import ProblemCriterion
from basins.analyses.volume.directions import (
    FAMILIES,
    NORMALISATIONS,
    DirectionSampler,
    filter_groups,
)
from basins.analyses.volume.estimators import (
    estimate_log_mean,
    floor_ratio,
    log_ball_volume,
    log_ray_prior_mass,
    quadratic_log_volume,
    wall_exponent,
)
from basins.analyses.volume.radii import (
    CENSORED,
    CROSSED,
    DEFAULT_WALL_T,
    Criterion,
    default_radius_rtol,
    find_radii,
    flag_reentries,
    wall_profiles,
)
from basins.analyses.volume.results import (
    FLOOR_FRACTION,
    FamilyResult,
    ProbeResult,
    WallsResult,
    walls_summary,
)
from basins.engine.problem import Problem
from basins.errors import InputError
from basins.progress import Progress, ProgressCallback

__all__ = [
    "DEFAULT_EPSILONS",
    "ray_progress",
    "probe_basin",
    "probe_problem",
]

#: Default ε ladder, in loss units (the same units as ``L``).
DEFAULT_EPSILONS = (1e-3, 1e-2, 1e-1)
_PILOT_PAIRS = 16
_BATCH_PAIRS = 128


def ray_progress(rays_done: int, num_rays: int, num_loss_evals: int, num_hvps: int, stage: str) -> Progress:
    """The :class:`~basins.progress.Progress` of probing: rays done (unit ``"rays"``), with the
    loss evaluations and HVPs so far in ``info``; ``phase`` is the stage (an ε, ``walls``,
    ``Hessian``)."""
    return Progress(stage, rays_done, num_rays, "rays",
                    info=f"{stage}: {num_loss_evals:,} loss evals, {num_hvps:,} HVPs")


def _median_or(values: np.ndarray, default: float) -> float:
    v = values[np.isfinite(values)]
    return float(np.median(v)) if v.size else default


def _pair_rows(num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(np.arange(num_pairs), 2), np.tile(np.array([1.0, -1.0]), num_pairs)


def probe_basin(
    criterion: Criterion,
    theta0: torch.Tensor,
    num_pairs: int,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    *,
    families: Sequence[str] = ("isotropic",),
    normalisation: str = "isotropic",
    basis: torch.Tensor | None = None,
    groups: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    radius_rtol: float | None = None,
    max_radius: float | None = None,
    sigma: float | None = None,
    walls: bool = False,
    wall_t: Sequence[float] = DEFAULT_WALL_T,
    walls_epsilon: float | None = None,
    hvp: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hvp_block: int = 32,
    memory_bytes: int = 256 << 20,
    num_bootstrap: int = 1000,
    min_ess: float = 30.0,
    callback: ProgressCallback | None = None,
) -> ProbeResult:
    """Probe the basin of ``criterion`` around θ* along ``2·num_pairs`` random rays per family.

    Args:
        criterion: batched ``C = L − L(θ*)``: ``(K, P)`` absolute points → ``(K,)`` (loss units).
        theta0: ``(P,)`` θ* in the criterion's dtype and device.
        num_pairs: antithetic pairs per family (rays = 2 × pairs).
        epsilons: the ε ladder, loss units (default 1e-3, 1e-2, 1e-1).
        families: any of ``isotropic``, ``top``, ``floor`` (the latter two need ``basis``).
        normalisation: ``isotropic`` or ``filter`` (Li et al. 2018; needs ``groups``; no volume).
        basis: ``(P, k)`` top Hessian eigenvectors (orthonormalised here).
        groups: filter slices (:func:`basins.analyses.volume.directions.filter_groups`).
        seed: seed of every random choice (ray seeds, bootstrap).
        radius_rtol: relative radius tolerance δ (default ``min(1e-3, 0.1/P)``: P·δ ≤ 0.1 nats).
        max_radius: censoring radius (default ``10·max(‖θ*‖, 1)``, parameter units).
        sigma: the prior's standard deviation per parameter (default the RMS of θ*; None and
            θ* = 0: no prior mass).
        walls: measure the walls (wall grid on every crossed ray; ``uᵀHu`` when ``hvp`` given).
        wall_t: grid of ``t`` (default ``2^k``, 1/64 … 8: 9 evaluations per ray).
        walls_epsilon: the ε whose radius scales the grid (default the ladder's median).
        hvp: ``V (P, b) → H V`` at θ*; used for ``uᵀHu`` (one HVP per pair) when ``walls``.
        hvp_block: vectors per ``hvp`` call.
        memory_bytes: budget for the ``(K, P)`` direction and point batches.
        num_bootstrap, min_ess: see :func:`basins.analyses.volume.estimators.estimate_log_mean`.
        callback: called with a :class:`~basins.progress.Progress` (:func:`ray_progress`) after
            every batched evaluation.

    Returns:
        :class:`ProbeResult`. Cost: about 3–8 criterion evaluations per ray and ε from a good
        guess, plus ``#t`` per ray with ``walls``; ``num_pairs`` HVPs per family with ``walls``
        and ``hvp``.

    Raises:
        InputError: bad settings (unknown family, ε not positive, no basis for top/floor, ...).
    """
    P = int(theta0.numel())
    eps = sorted(float(e) for e in epsilons)
    if num_pairs < 1:
        raise InputError(f"num_pairs must be ≥ 1 (pairs of rays), got {num_pairs}", param="num_pairs")
    if not families or any(f not in FAMILIES for f in families) or len(set(families)) != len(families):
        raise InputError(f"families must be distinct names among {', '.join(FAMILIES)}, got {list(families)}",
                         param="families")
    if normalisation not in NORMALISATIONS:
        raise InputError(f"unknown normalisation {normalisation!r}: use {' or '.join(NORMALISATIONS)}",
                         param="normalisation")
    if len(set(eps)) != len(eps) or not eps or any(not (e > 0 and math.isfinite(e)) for e in eps):
        raise InputError(f"epsilons must be distinct positive numbers, got {list(epsilons)}", param="epsilons")
    if radius_rtol is not None and not 0 < radius_rtol < 1:
        raise InputError(f"radius_rtol must be in (0, 1), got {radius_rtol}", param="radius_rtol")
    rtol = default_radius_rtol(P) if radius_rtol is None else float(radius_rtol)
    theta64 = theta0.detach().to("cpu", torch.float64).reshape(-1)
    tnorm = float(theta64.norm())
    rmax = 10.0 * max(tnorm, 1.0) if max_radius is None else float(max_radius)
    if not (rmax > 0 and math.isfinite(rmax)):
        raise InputError(f"max_radius must be positive, got {max_radius}", param="max_radius")
    rmin = rmax * 1e-12
    rms = tnorm / math.sqrt(P)
    sig = float(sigma) if sigma is not None else (rms if rms > 0 else None)
    if sig is not None and not sig > 0:
        raise InputError(f"sigma (the prior's standard deviation) must be positive, got {sigma}", param="sigma")
    tgrid = np.unique(np.append(np.asarray(wall_t, dtype=np.float64), 1.0))
    if walls and (tgrid.min() >= 1.0 or tgrid.max() <= 1.0 or tgrid.min() <= 0):
        raise InputError("wall_t needs positive t values on both sides of 1", param="wall_t")
    jw = (len(eps) - 1) // 2 if walls_epsilon is None else None
    if walls_epsilon is not None:
        if float(walls_epsilon) not in eps:
            raise InputError(f"walls_epsilon ({walls_epsilon}) must be one of the ε ladder {eps}",
                             param="walls_epsilon")
        jw = eps.index(float(walls_epsilon))
    assert jw is not None
    notes: list[str] = []
    if sig is None:
        notes.append("θ* = 0 and no sigma given: no prior mass")
    itemsize = theta0.element_size()
    point_batch = max(1, memory_bytes // (2 * P * itemsize))
    batch_pairs = max(1, min(_BATCH_PAIRS, memory_bytes // (2 * P * itemsize)))
    counts = {"evals": 0, "hvps": 0, "done": 0.0}
    total_rays = 2 * num_pairs * len(families)
    stages = len(eps) + (1 if walls else 0)

    def report(stage: str) -> None:
        if callback is not None:
            callback(ray_progress(int(counts["done"]), total_rays, int(counts["evals"]), int(counts["hvps"]), stage))

    def counted(points: torch.Tensor) -> torch.Tensor:
        counts["evals"] += int(points.shape[0])
        return criterion(points)

    out: dict[str, FamilyResult] = {}
    for fam in families:
        sampler = DirectionSampler(P, family=fam, normalisation=normalisation, basis=basis, theta0=theta64,
                                   groups=groups, seed=seed)
        if fam != "isotropic" and normalisation == "isotropic":
            notes.append(f"{fam}: volumes are of the {sampler.dimension}-dimensional section through θ* "
                         f"({'top eigenvector span' if fam == 'top' else 'complement of the top eigenvectors'})")
        out[fam] = _probe_family(
            counted, theta0, theta64, sampler, num_pairs, eps, rtol=rtol, rmax=rmax, rmin=rmin, walls=walls,
            tgrid=tgrid, jw=jw, hvp=hvp, hvp_block=hvp_block, batch_pairs=batch_pairs, point_batch=point_batch,
            counts=counts, stages=stages, report=report,
        )
        _estimate(out[fam], sampler, eps, theta64, sig, seed, num_bootstrap, min_ess)
    if normalisation == "filter":
        notes.append("filter-normalised directions are not uniform on the sphere: no volume or prior mass")
    return ProbeResult(
        num_params=P, epsilons=eps, radius_rtol=rtol, max_radius=rmax, min_radius=rmin, sigma=sig, seed=seed,
        families=out, num_loss_evals=int(counts["evals"]), num_hvps=int(counts["hvps"]),
        wall_t=[float(x) for x in tgrid] if walls else None, walls_epsilon=eps[jw] if walls else None, notes=notes,
        settings={"samples": 2 * num_pairs, "ray_families": list(families), "directions": normalisation,
                  "walls_enabled": bool(walls)},
    )


def _probe_family(criterion: Criterion, theta0: torch.Tensor, theta64: torch.Tensor, sampler: DirectionSampler,
                  num_pairs: int, eps: list[float], *, rtol: float, rmax: float, rmin: float, walls: bool,
                  tgrid: np.ndarray, jw: int, hvp: Callable[[torch.Tensor], torch.Tensor] | None, hvp_block: int,
                  batch_pairs: int, point_batch: int, counts: dict[str, float], stages: int,
                  report: Callable[[str], None]) -> FamilyResult:
    E, fam = len(eps), sampler.family
    M, N = num_pairs, 2 * num_pairs
    seeds = np.array([sampler.pair_seed(j) for j in range(M)], dtype=np.int64)
    radii, lerr = np.zeros((N, E)), np.zeros((N, E))
    status, reent = np.zeros((N, E), np.int8), np.zeros((N, E), bool)
    nev, dots = np.zeros((N, E), np.int64), np.zeros(N)
    curv = np.full(M, np.nan) if (walls and hvp is not None) else None
    profile = np.full((N, tgrid.size), np.nan) if walls else None
    walls_evals = 0
    starts = [0, *range(min(_PILOT_PAIRS, M), M, batch_pairs)] if M > _PILOT_PAIRS else [0]
    bounds = list(zip(starts, [*starts[1:], M]))
    default_shift = [0.5 * math.log(eps[j + 1] / eps[j]) for j in range(E - 1)]
    for a, b in bounds:
        B = b - a
        U = sampler.pairs(list(range(a, b)), dtype=theta0.dtype, device=theta0.device)
        rows, signs = _pair_rows(B)
        sl = slice(2 * a, 2 * b)
        d = (U.to(torch.float64).cpu() @ theta64).numpy()
        dots[sl] = np.repeat(d, 2) * signs
        done_r = status[: 2 * a] == CROSSED
        logr = np.where(done_r, np.log(np.maximum(radii[: 2 * a], 1e-300)), np.nan)
        guess = np.full(2 * B, _median_or(logr[:, 0], math.log(rmax) - 6.0))
        if curv is not None and hvp is not None:
            for s in range(0, B, hvp_block):
                V = U[s : s + hvp_block].T
                HV = hvp(V).to(U.dtype)
                curv[a + s : a + s + V.shape[1]] = (V * HV).sum(0).to("cpu", torch.float64).numpy()
                counts["hvps"] += V.shape[1]
                report("uᵀHu")
            k = np.repeat(curv[a:b], 2)
            with np.errstate(divide="ignore", invalid="ignore"):
                anh_done = logr[:, 0] - 0.5 * np.log(2 * eps[0] / np.repeat(curv[:a], 2))
                quad = np.where(k > 0, 0.5 * np.log(2 * eps[0] / np.where(k > 0, k, 1.0)), np.nan)
            quad = quad + _median_or(anh_done, 0.0)
            guess = np.where(np.isfinite(quad), quad, guess)
        shift = [_median_or(logr[:, j + 1] - logr[:, j], default_shift[j]) for j in range(E - 1)]
        res = find_radii(criterion, theta0, U, eps, signs=signs, rows=rows, rtol=rtol, max_radius=rmax,
                         min_radius=rmin, log_guess=guess, ladder_shift=shift, point_batch=point_batch,
                         on_step=lambda: report("radius search"))
        radii[sl], lerr[sl], status[sl], nev[sl] = res.radii, res.log_error, res.status, res.num_evals
        counts["done"] += 2 * B * E / stages
        hist = res.history
        if profile is not None:
            r_w = np.where(res.status[:, jw] == CROSSED, res.radii[:, jw], np.nan)
            before = counts["evals"]
            prof = wall_profiles(criterion, theta0, U, r_w, tgrid, signs=signs, rows=rows, point_batch=point_batch,
                                 on_step=lambda: report("walls"))
            walls_evals += int(counts["evals"] - before)
            prof[np.isfinite(r_w)[:, None] & (tgrid == 1.0)[None, :]] = eps[jw]
            profile[sl] = prof
            kk, jj = np.nonzero(np.isfinite(prof) & (tgrid != 1.0)[None, :])
            extra = (kk, np.log(r_w[kk] * tgrid[jj]), prof[kk, jj])
            hist = (np.concatenate([hist[0], extra[0]]), np.concatenate([hist[1], extra[1]]),
                    np.concatenate([hist[2], extra[2]]))
            counts["done"] += 2 * B / stages
        reent[sl] = flag_reentries(hist, res.radii, res.status, eps, margin=2 * math.log1p(rtol))
        report("done")
    wres = None
    if walls and profile is not None:
        anh: np.ndarray | None = None
        if curv is not None:
            k = np.repeat(curv, 2)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                anh = np.log(radii) - 0.5 * np.log(2 * np.asarray(eps)[None, :] / k)
            anh = np.where((status == CROSSED) & (k > 0), anh, np.nan)
        both = (status[0::2] == CROSSED) & (status[1::2] == CROSSED)
        asym = np.where(both, np.log(radii[0::2]) - np.log(radii[1::2]), np.nan)
        rel = profile / eps[jw]
        with np.errstate(all="ignore"):
            pq = np.nanquantile(rel, [0.05, 0.25, 0.5, 0.75, 0.95], axis=0) if np.isfinite(rel).any() \
                else np.full((5, tgrid.size), np.nan)
        wres = WallsResult(
            epsilon=eps[jw], t=tgrid, profile=profile, exponent=wall_exponent(tgrid, profile),
            floor_ratio=floor_ratio(tgrid, profile, FLOOR_FRACTION * eps[jw]), anharmonicity=anh, asymmetry=asym,
            profile_quantiles=pq, summary={},
        )
        wres.summary = walls_summary(wres, eps, status, reent)
    return FamilyResult(
        family=fam, normalisation=sampler.normalisation, dimension=sampler.dimension, pair_seeds=seeds,
        radii=radii, log_error=lerr, status=status, reentered=reent, num_evals=nev, dots=dots, curvature=curv,
        volume=[], prior_mass=[], walls=wres, num_loss_evals=int(nev.sum()) + walls_evals,
        num_walls_evals=walls_evals,
    )


def _estimate(fr: FamilyResult, sampler: DirectionSampler, eps: list[float], theta64: torch.Tensor,
              sigma: float | None, seed: int, num_bootstrap: int, min_ess: float) -> None:
    d = fr.dimension
    boot_seed = int(seed) & 0xFFFFFFFF
    for j in range(len(eps)):
        r, err = fr.radii[:, j], fr.log_error[:, j]
        cens = int(np.sum(fr.status[:, j] == CENSORED))
        if not sampler.is_uniform:
            fr.volume.append(None)
            fr.prior_mass.append(None)
            continue
        fr.volume.append(estimate_log_mean(
            d * np.log(r), log_prefactor=log_ball_volume(d), paired=True, log_errors=d * err,
            num_censored=cens, min_ess=min_ess, num_bootstrap=num_bootstrap, seed=boot_seed + j,
        ))
        if fr.family == "isotropic" and sigma is not None:
            tsq = float(theta64 @ theta64)
            lm = log_ray_prior_mass(r, fr.dots, tsq, sigma, d)
            lm_hi = log_ray_prior_mass(r * np.exp(err), fr.dots, tsq, sigma, d)
            fr.prior_mass.append(estimate_log_mean(
                lm, paired=True, log_errors=np.abs(lm_hi - lm), num_censored=cens, min_ess=min_ess,
                num_bootstrap=num_bootstrap, seed=boot_seed + 1000 + j,
            ))
        else:
            fr.prior_mass.append(None)


def probe_problem(
    problem: Problem,
    num_pairs: int,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    *,
    families: Sequence[str] = ("isotropic",),
    normalisation: str = "isotropic",
    top_k: int = 10,
    seed: int = 0,
    radius_rtol: float | None = None,
    max_radius: float | None = None,
    sigma: float | None = None,
    walls: bool = False,
    wall_t: Sequence[float] = DEFAULT_WALL_T,
    walls_epsilon: float | None = None,
    compare_quadratic: bool = False,
    null_rtol: float = 1e-6,
    exact_max_params: int = 2000,
    loss_route: str = "auto",
    chunk: int | None = None,
    hvp_block: int = 32,
    memory_bytes: int = 256 << 20,
    num_bootstrap: int = 1000,
    min_ess: float = 30.0,
    callback: ProgressCallback | None = None,
) -> ProbeResult:
    """:func:`probe_basin` on a :class:`basins.Problem`: ``C = L − L(θ*)`` over the full data.

    Extra args (others as :func:`probe_basin`):
        problem: the problem.
        top_k: eigenvectors spanning the ``top`` family / deflated by ``floor``.
        compare_quadratic: add the quadratic baseline (:func:`basins.analyses.volume.estimators.quadratic_log_volume`)
            from the exact spectrum (``P ≤ exact_max_params``) or the Lanczos top-k (a section).
        null_rtol: null threshold of the baseline, ``|λ| ≤ null_rtol·λ_max``.
        exact_max_params: largest P for the dense Hessian.
        loss_route, chunk: batched loss route (:class:`ProblemCriterion`).

    Returns:
        :class:`ProbeResult` whose ``num_loss_evals`` / ``num_hvps`` count every evaluation the
        problem made (timing, Hessian and ``uᵀHu`` included).
    """
    c0 = problem.counters
    evals0, hvps0 = c0.num_loss_evals, c0.num_hvps
    crit = ProblemCriterion(problem, route=loss_route, chunk=chunk, seed=seed)

    def eig_progress(_: Progress) -> None:
        if callback is not None:
            callback(ray_progress(0, 2 * num_pairs * len(families), problem.counters.num_loss_evals - evals0,
                                  problem.counters.num_hvps - hvps0, "Hessian"))

    vals = basis = None
    complete, method = False, ""
    need_basis = any(f in ("top", "floor") for f in families)
    if compare_quadratic or need_basis:
        k = top_k if need_basis else min(top_k, problem.num_params - 1)
        pairs = hessian_eigenpairs(problem, k, exact_max_params=exact_max_params, seed=seed, hvp_block=hvp_block,
                                   callback=eig_progress)
        vals, basis, complete, method = pairs.eigenvalues.numpy(), pairs.eigenvectors, pairs.complete, pairs.method

    def relay(info: Progress) -> None:
        if callback is not None:  # the problem's counters: every evaluation, timing and uᵀHu included
            callback(ray_progress(info.done, info.total or 0, problem.counters.num_loss_evals - evals0,
                                  problem.counters.num_hvps - hvps0, info.phase))

    groups = filter_groups(problem.space.shapes) if normalisation == "filter" else None
    res = probe_basin(
        crit, problem.theta0, num_pairs, epsilons, families=families, normalisation=normalisation,
        basis=basis if any(f in ("top", "floor") for f in families) else None, groups=groups, seed=seed,
        radius_rtol=radius_rtol, max_radius=max_radius, sigma=sigma, walls=walls, wall_t=wall_t,
        walls_epsilon=walls_epsilon, hvp=problem.hvp, hvp_block=hvp_block, memory_bytes=memory_bytes,
        num_bootstrap=num_bootstrap, min_ess=min_ess, callback=relay,
    )
    if vals is not None:
        res.eigenvalues = vals
        if float(vals[min(top_k, vals.size) - 1]) <= 0 and any(f in ("top", "floor") for f in families):
            res.notes.append(f"some of the top {top_k} Hessian eigenvalues are ≤ 0: the 'top' family is not all walls")
    if compare_quadratic and vals is not None:
        res.quadratic = quadratic_log_volume(vals, res.epsilons, problem.num_params, null_rtol=null_rtol,
                                             complete=complete, method=method)
        if not complete:
            res.notes.append(res.quadratic.note)
    res.num_loss_evals = problem.counters.num_loss_evals - evals0
    res.num_hvps = problem.counters.num_hvps - hvps0
    res.loss_route = {"route": crit.route, "chunk": crit.chunk, "timings": dict(crit.timings)}
    res.settings.update(top_k=top_k, compare_quadratic=compare_quadratic, null_rtol=null_rtol,
                        exact_max_params=exact_max_params)
    return res
