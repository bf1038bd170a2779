"""``basins spectrum``: the Hessian's spectral density at θ* by stochastic Lanczos quadrature.

The quadrature itself (probes, Gauss rules, smoothing) is :mod:`basins.linalg.slq`; this module
applies it to a :class:`~basins.engine.problem.Problem`'s Hessian and chooses the precision of
the Lanczos vectors from a memory budget. References: Golub & Meurant (2010), ch. 6;
Ubaru, Chen & Saad (2017); Ghorbani, Krishnan & Xiao (2019).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from basins.analyses.eigen import deflated_slq, hessian_operator
from basins.engine.problem import Problem, counted
from basins.linalg.slq import (
    DEFAULT_PROBES,
    DEFAULT_STEPS,
    SLQResult,
    SpectralDensity,
    _check_budget,
    spectral_density,
)
from basins.progress import ProgressCallback
from basins.record import EIGEN_UNITS, Array, Record

__all__ = ["hessian_slq", "hessian_spectrum", "SpectrumResult"]


@dataclass
class SpectrumResult:
    """The raw SLQ rules of the Hessian and their smoothed density.

    Attributes:
        slq: the raw quadrature (nodes, weights, residuals per probe; HVP count).
        density: the Gaussian-broadened density with its band across probes.
        seed: the probes' seed.
        hvp_route: the problem's HVP route.
        work: what ``problem.counters`` counted during the call (:func:`basins.engine.problem.counted`).
    """

    slq: SLQResult
    density: SpectralDensity
    seed: int = 0
    hvp_route: str | None = None
    work: dict[str, int] = field(default_factory=dict)

    def record(self) -> Record:
        """The report group ``/spectrum`` and the ``--json`` keys (README, "Architecture")."""
        r, dens = self.slq, self.density
        attrs: dict[str, Any] = {
            "method": "stochastic Lanczos quadrature, full reorthogonalisation, float64 tridiagonal",
            "num_probes": r.num_probes, "num_steps": r.num_steps, "probe": r.probe,
            "seed": self.seed, "scale": dens.scale, "sigma": dens.sigma, "floor": dens.floor,
            "coverage": dens.coverage, "trace": r.trace, "trace_stderr": r.trace_stderr,
            "node_min": r.lambda_min, "node_max": r.lambda_max,
            "num_hvps": r.num_matvecs, "hvp_route": self.hvp_route,
            **self.work,
        }
        nodes, weights, residuals = r.padded()
        grid_units = "log10(|λ| / (loss / parameter²))" if dens.scale == "log" else EIGEN_UNITS
        dens_units = "per decade of |λ|" if dens.scale == "log" else f"1 / ({EIGEN_UNITS})"
        band = f"{dens.coverage:.0%} band"
        arrays = {
            "nodes": Array(nodes.numpy(), "Gauss quadrature nodes (Ritz values), one row per probe, NaN-padded",
                           EIGEN_UNITS, json_values=r.nodes),
            "weights": Array(weights.numpy(), "quadrature weights (squared first components), rows sum to 1, "
                             "0-padded", None, json_values=r.weights),
            "residuals": Array(residuals.numpy(), "node residuals |β_m s_mj|, NaN-padded", EIGEN_UNITS,
                               json_values=r.residuals),
            "quadratic_forms": Array(r.quadratic_forms, "vᵀHv per unit probe", EIGEN_UNITS),
            "grid": Array(dens.grid, f"density grid ({dens.scale})", grid_units),
            "density": Array(dens.density, "Gaussian-broadened spectral density, mean over probes", dens_units),
            "density_lower": Array(dens.density_lower, f"lower end of the pointwise {band}", dens_units),
            "density_upper": Array(dens.density_upper, f"upper end of the pointwise {band}", dens_units),
        }
        return Record(attrs, arrays)


@counted
def hessian_spectrum(
    problem: Problem,
    *,
    num_probes: int = DEFAULT_PROBES,
    num_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    scale: str = "linear",
    sigma: float | None = None,
    num_points: int = 1000,
    memory_bytes: int | None = None,
    callback: ProgressCallback | None = None,
) -> SpectrumResult:
    """:func:`hessian_slq` and its :func:`~basins.linalg.slq.spectral_density` (``scale``,
    ``sigma``, ``num_points``) in one call. Cost: as :func:`hessian_slq`; the density needs no HVPs."""
    r = hessian_slq(problem, num_probes=num_probes, num_steps=num_steps, seed=seed, memory_bytes=memory_bytes,
                    callback=callback)
    dens = spectral_density(r.nodes, r.weights, scale=scale, sigma=sigma, num_points=num_points)
    return SpectrumResult(r, dens, seed, getattr(problem, "hvp_route", None))


def hessian_slq(
    problem: Problem,
    *,
    num_probes: int = DEFAULT_PROBES,
    num_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    probe: str = "rademacher",
    deflate: int = 0,
    memory_bytes: int | None = None,
    callback: ProgressCallback | None = None,
) -> SLQResult:
    """:func:`basins.analyses.eigen.deflated_slq` on the Hessian of a :class:`basins.Problem` at θ*
    (``deflate`` top pairs projected out first; the spectrum's default is none).

    The Lanczos vectors are float64 when ``num_probes·(num_steps+1)·P`` doubles fit in
    ``memory_bytes`` (default: :func:`basins.engine.memory.memory_budget`, at most 1 GiB), else
    the problem's dtype (and fewer probes per block if needed).
    Cost: ≤ ``num_probes·num_steps`` HVPs (plus the deflation's Lanczos), in blocks of all probes.
    """
    _check_budget(num_probes, num_steps, probe)
    return deflated_slq(hessian_operator(problem), deflate=deflate, num_probes=num_probes, num_steps=num_steps,
                        seed=seed, probe=probe, memory_bytes=memory_bytes, callback=callback).slq
