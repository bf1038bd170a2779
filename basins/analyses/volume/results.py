"""Results of basin probing, and their records: what ``basins volume`` writes and prints.

:class:`ProbeResult` (with :class:`FamilyResult` per ray family and :class:`WallsResult` per
family with walls) is what :func:`basins.analyses.volume.probe.probe_basin` returns; its
:meth:`~ProbeResult.summary` gives the JSON-ready statistics (volumes, slopes
``d log V / d log ε``, ray-status counts, wall quantiles) and :meth:`~ProbeResult.record` /
:meth:`~ProbeResult.walls_record` the report groups ``/volume`` and ``/walls``. Ray status codes
are :data:`~basins.analyses.volume.radii.CROSSED`, ``CENSORED``, ``COLLAPSED``, ``UNCONVERGED``
(0–3). See README, "Architecture".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from basins.analyses.volume.estimators import (
    QuadraticBaseline,
    VolumeEstimate,
    quantile_summary,
    volume_slopes,
)
from basins.analyses.volume.radii import CENSORED, COLLAPSED, CROSSED, UNCONVERGED
from basins.record import EIGEN_UNITS, Array, Record, plain

__all__ = ["FLOOR_FRACTION", "RADIUS_UNITS", "RAY_ORDER", "STATUS_DESCRIPTION", "WallsResult", "FamilyResult",
           "ProbeResult", "family_summary", "walls_summary"]

#: The floor radius is where ``C`` falls to this fraction of ε along a ray.
FLOOR_FRACTION = 0.01
RADIUS_UNITS = "parameter units (Euclidean norm of θ − θ*)"
RAY_ORDER = "ray 2j is +u_j, ray 2j+1 is −u_j (u_j regenerated from pair_seeds[j])"
STATUS_DESCRIPTION = (f"{CROSSED} crossed, {CENSORED} censored (no crossing below max_radius), {COLLAPSED} collapsed "
                      f"(C ≥ ε at min_radius), {UNCONVERGED} unconverged")


@dataclass
class WallsResult:
    """Wall shape along every ray of one family (rays ordered as in :class:`FamilyResult`).

    Attributes:
        epsilon: the ε whose radius ``r(u)`` scales the grid.
        t: ``(T,)`` grid of ``t`` (radius / ``r(u)``); includes 1.
        profile: ``(N, T)`` ``C(t·r(u))`` in loss units (``ε`` at ``t = 1``; NaN for rays that
            did not cross).
        exponent: ``(N,)`` local exponent ``dlog C/dlog t`` at ``t = 1`` (central difference
            over the grid's neighbours of 1): 2 for a quadratic wall, > 2 degenerate, → 0 plateau.
        floor_ratio: ``(N,)`` ``r_floor/r``, where ``C`` first falls to ``FLOOR_FRACTION·ε``
            going inwards (log-log interpolation); NaN when it never does above ``t.min()``.
        anharmonicity: ``(N, E)`` ``log(r/r_quad)``, ``r_quad = sqrt(2ε/uᵀHu)``; None without HVPs.
        asymmetry: ``(M, E)`` ``log(r₊/r₋)`` per pair (NaN unless both rays crossed).
        profile_quantiles: ``(5, T)`` quantiles (levels 0.05, 0.25, 0.5, 0.75, 0.95) of ``C/ε``.
        summary: JSON-ready quantiles (see :func:`probe_basin`).
    """

    epsilon: float
    t: np.ndarray
    profile: np.ndarray
    exponent: np.ndarray
    floor_ratio: np.ndarray
    anharmonicity: np.ndarray | None
    asymmetry: np.ndarray
    profile_quantiles: np.ndarray
    summary: dict[str, Any]


@dataclass
class FamilyResult:
    """Rays of one family. Ray ``2j`` is ``+u_j``, ray ``2j + 1`` is ``−u_j``.

    Attributes:
        family, normalisation: as sampled. dimension: ``d`` of the subspace the rays fill.
        pair_seeds: ``(M,)`` int64 seed of each pair (regenerate ``u_j`` with
            :meth:`DirectionSampler.direction`).
        radii, log_error, status, reentered, num_evals: ``(N, E)``, see :class:`basins.analyses.volume.directions.RaySearch`.
        dots: ``(N,)`` ``u·θ*``. curvature: ``(M,)`` ``uᵀHu`` or None.
        volume: per ε the :class:`~basins.analyses.volume.estimators.VolumeEstimate` of ``log V`` (of the d-dim
            section), None for non-uniform directions. prior_mass: per ε, ``log`` prior mass
            (isotropic family only, else None).
        walls: :class:`WallsResult` or None.
        num_loss_evals: criterion evaluations spent on this family (search + walls).
    """

    family: str
    normalisation: str
    dimension: int
    pair_seeds: np.ndarray
    radii: np.ndarray
    log_error: np.ndarray
    status: np.ndarray
    reentered: np.ndarray
    num_evals: np.ndarray
    dots: np.ndarray
    curvature: np.ndarray | None
    volume: list[VolumeEstimate | None]
    prior_mass: list[VolumeEstimate | None]
    walls: WallsResult | None
    num_loss_evals: int
    num_walls_evals: int

    @property
    def num_rays(self) -> int:
        return int(self.radii.shape[0])


@dataclass
class ProbeResult:
    """Everything :func:`probe_basin` found, per family, with the settings used.

    Attributes:
        num_params: ``P``. epsilons: the ladder (loss units). radius_rtol, max_radius,
        min_radius: search settings (parameter units). sigma: the prior's σ (None: no prior
        mass). seed. families: ``{name: FamilyResult}`` in the order asked.
        num_loss_evals: every criterion evaluation (for a Problem: every loss evaluation,
        timing of the batched routes included). num_hvps. wall_t, walls_epsilon: the wall grid.
        quadratic: the quadratic baseline or None. eigenvalues: the top Hessian eigenvalues used
        (float64) or None. notes: what was left out and why. loss_route: the batched-loss route.
        settings: the options of the run as the report records them (``samples``,
        ``ray_families``, ``directions``, ``walls_enabled``, and for a Problem ``top_k``,
        ``compare_quadratic``, ``null_rtol``, ``exact_max_params``).
    """

    num_params: int
    epsilons: list[float]
    radius_rtol: float
    max_radius: float
    min_radius: float
    sigma: float | None
    seed: int
    families: dict[str, FamilyResult]
    num_loss_evals: int
    num_hvps: int
    wall_t: list[float] | None
    walls_epsilon: float | None
    quadratic: QuadraticBaseline | None = None
    eigenvalues: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    loss_route: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> FamilyResult:
        """The isotropic family if probed, else the first."""
        return self.families.get("isotropic") or next(iter(self.families.values()))

    def num_censored(self) -> list[int]:
        """Per ε, the primary family's rays with no crossing below ``max_radius`` (their volume
        is then a lower bound)."""
        return [int((self.primary.status[:, j] == CENSORED).sum()) for j in range(len(self.epsilons))]

    def summary(self) -> dict[str, Any]:
        """The results as JSON-ready keys: the primary family's keys at the top level
        (:func:`family_summary`), every family under ``families``, the quadratic baseline, costs."""
        fams = {name: family_summary(fr, self.epsilons) for name, fr in self.families.items()}
        q = self.quadratic
        return {
            "num_params": self.num_params, **fams[self.primary.family], "epsilon": self.epsilons,
            "num_loss_evals": self.num_loss_evals, "num_hvps": self.num_hvps,
            "num_search_evals": int(sum(int(fr.num_evals.sum()) for fr in self.families.values())),
            "radius_rtol": self.radius_rtol, "max_radius": self.max_radius, "sigma": self.sigma,
            "seed": self.seed, "walls_epsilon": self.walls_epsilon,
            "families": fams,
            "quadratic": None if q is None else {
                "log_volume": q.log_volume, "dimension": q.dimension, "num_null": q.num_null,
                "num_negative": q.num_negative, "threshold": q.threshold, "null_rtol": q.null_rtol,
                "method": q.method, "complete": q.complete, "note": q.note,
            },
            "notes": self.notes, "loss_route": self.loss_route,
        }

    def record(self) -> Record:
        """The report group ``/volume`` and the ``--json`` keys (README, "Architecture"): the
        :meth:`summary` and :attr:`settings` as attributes, the per-ray arrays as datasets
        (report only: ``--json`` carries their quantiles)."""
        summary = plain(self.summary())
        attrs = {"analysis": "volume", **summary, **self.settings}
        arrays: dict[str, Array] = {
            "epsilon": Array(np.asarray(self.epsilons), "the ε ladder: loss rise defining the basin", "loss units",
                             in_json=False)}
        for name, fr in self.families.items():
            arrays.update({
                f"{name}/radii": Array(fr.radii, f"(rays, ε) radius where C = L − L(θ*) first reaches ε; {RAY_ORDER}; "
                                                 "max_radius when censored", RADIUS_UNITS),
                f"{name}/pair_seeds": Array(fr.pair_seeds, "per pair j: torch.Generator().manual_seed(seed) → randn "
                                            "float64 → family projection → unit norm "
                                            "(basins.analyses.volume.directions.DirectionSampler)", None),
                f"{name}/status": Array(fr.status, f"(rays, ε) {STATUS_DESCRIPTION}", None),
                f"{name}/log_error": Array(fr.log_error, "(rays, ε) half-width of the final bracket in log r", "nats"),
                f"{name}/reentered": Array(fr.reentered, "(rays, ε) a point beyond the crossing had C < ε", None),
                f"{name}/num_evals": Array(fr.num_evals, "(rays, ε) loss evaluations spent by the radius search", None),
                f"{name}/dots": Array(fr.dots, "per ray u·θ* (for the prior mass)", "parameter units"),
            })
        if self.eigenvalues is not None:
            arrays["eigenvalues"] = Array(np.asarray(self.eigenvalues), "Hessian eigenvalues used (descending)",
                                          EIGEN_UNITS)
        for arr in arrays.values():
            arr.in_json = False
        # the report's "directions" is the option asked; --json's the primary family's normalisation
        return Record(attrs, arrays, json_only={"directions": summary["directions"]})

    def walls_record(self) -> Record | None:
        """The report group ``/walls`` (profiles along every ray), or None without walls."""
        if not any(fr.walls is not None for fr in self.families.values()):
            return None
        attrs = {"analysis": "walls", "walls_epsilon": self.walls_epsilon, "t": plain(self.wall_t),
                 "floor_fraction": FLOOR_FRACTION,
                 "family_walls": plain({n: fr.walls.summary for n, fr in self.families.items() if fr.walls is not None}),
                 **self.settings}
        arrays: dict[str, Array] = {}
        for name, fr in self.families.items():
            w = fr.walls
            if w is None:
                continue
            jw = self.epsilons.index(w.epsilon)
            arrays.update({
                f"{name}/t": Array(w.t, "grid of t = radius / r(u) at the walls' ε", None),
                f"{name}/profile": Array(w.profile, f"(rays, t) C(t·r(u)) = L − L(θ*); {RAY_ORDER}", "loss units"),
                f"{name}/profile_quantiles": Array(w.profile_quantiles, "(5, t) quantiles 0.05, 0.25, 0.5, 0.75, 0.95 "
                                                   "of C/ε", None),
                f"{name}/exponent": Array(w.exponent, "per ray dlog C/dlog t at the crossing (2 = quadratic)", None),
                f"{name}/floor_ratio": Array(w.floor_ratio, "per ray r_floor/r, C(r_floor) = 1% of ε (NaN: not "
                                             "reached)", None),
                f"{name}/asymmetry": Array(w.asymmetry, "(pairs, ε) log(r₊/r₋)", "nats"),
                f"{name}/radii": Array(fr.radii[:, jw], "per ray r(u) at the walls' ε", RADIUS_UNITS),
                f"{name}/pair_seeds": Array(fr.pair_seeds, "per pair seed (see /volume)", None),
            })
            if w.anharmonicity is not None:
                arrays[f"{name}/anharmonicity"] = Array(w.anharmonicity, "(rays, ε) log(r / sqrt(2ε/uᵀHu))", "nats")
            if fr.curvature is not None:
                arrays[f"{name}/curvature"] = Array(fr.curvature, "per pair uᵀHu", EIGEN_UNITS)
        for arr in arrays.values():
            arr.in_json = False
        return Record(attrs, arrays)


def walls_summary(w: WallsResult, epsilons: Sequence[float], status: np.ndarray, reentered: np.ndarray) -> dict[str, Any]:
    """JSON-ready quantiles of one family's walls (exponent, floor ratio, anharmonicity, asymmetry)."""
    jw = list(epsilons).index(w.epsilon)
    return {
        "epsilon": w.epsilon, "epsilon_index": jw, "t_min": float(w.t.min()), "t_max": float(w.t.max()), "num_t": int(w.t.size),
        "exponent": quantile_summary(w.exponent),
        "floor_fraction": FLOOR_FRACTION,
        "floor_ratio": quantile_summary(w.floor_ratio),
        "floor_not_reached": int(np.sum(np.isnan(w.floor_ratio) & (status[:, jw] == CROSSED))),
        "anharmonicity": None if w.anharmonicity is None else [quantile_summary(w.anharmonicity[:, j]) for j in range(len(epsilons))],
        "asymmetry": [quantile_summary(w.asymmetry[:, j]) for j in range(len(epsilons))],
        "reentered": int(reentered[:, jw].sum()),
    }


def _est(v: Any, name: str) -> Any:
    return None if v is None else getattr(v, name)


def family_summary(fr: FamilyResult, epsilons: list[float]) -> dict[str, Any]:
    """JSON-ready keys of one family (one list entry per ε where a key depends on ε): volumes
    with their errors, slopes ``d log V / d log ε`` (:func:`~basins.analyses.volume.estimators.volume_slopes`),
    prior mass, radius quantiles of crossed rays and counts of each ray status."""
    E = len(epsilons)
    vols, prior = fr.volume, fr.prior_mass
    logv = [_est(v, "log_value") for v in vols]
    slope = volume_slopes(logv, [v is not None and not v.is_lower_bound for v in vols], epsilons)
    typical = volume_slopes([_est(v, "jensen_bound") for v in vols], [v is not None for v in vols], epsilons)
    return {
        "family": fr.family, "directions": fr.normalisation, "dimension": fr.dimension,
        "num_rays": fr.num_rays, "num_pairs": fr.num_rays // 2,
        "log_volume": logv, "log_volume_se": [_est(v, "se") for v in vols],
        "ess": [_est(v, "ess") for v in vols], "max_weight_share": [_est(v, "max_weight_share") for v in vols],
        "is_lower_bound": [_est(v, "is_lower_bound") for v in vols],
        "ci_lower": [_est(v, "ci_lower") for v in vols], "ci_upper": [_est(v, "ci_upper") for v in vols],
        "ci_level": next((v.level for v in vols if v is not None), None),
        "jensen_bound": [_est(v, "jensen_bound") for v in vols],
        "jensen_bound_se": [_est(v, "jensen_se") for v in vols],
        "radius_error_nats": [_est(v, "radius_error") for v in vols],
        "volume_slope": slope,
        "typical_slope": typical,
        "log_prior_mass": [_est(v, "log_value") for v in prior],
        "log_prior_mass_se": [_est(v, "se") for v in prior],
        "prior_ess": [_est(v, "ess") for v in prior],
        "prior_is_lower_bound": [_est(v, "is_lower_bound") for v in prior],
        "prior_ci_lower": [_est(v, "ci_lower") for v in prior],
        "prior_ci_upper": [_est(v, "ci_upper") for v in prior],
        "radii": [quantile_summary(np.where(fr.status[:, j] == CROSSED, fr.radii[:, j], np.nan)) for j in range(E)],
        "censored": [int((fr.status[:, j] == CENSORED).sum()) for j in range(E)],
        "collapsed": [int((fr.status[:, j] == COLLAPSED).sum()) for j in range(E)],
        "unconverged": [int((fr.status[:, j] == UNCONVERGED).sum()) for j in range(E)],
        "reentered": [int(fr.reentered[:, j].sum()) for j in range(E)],
        "evals_per_ray": [float(fr.num_evals[:, j].mean()) for j in range(E)],
        "walls": None if fr.walls is None else fr.walls.summary,
    }
