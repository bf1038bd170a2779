"""Loss-landscape slices around θ*, and the loss along the line between two checkpoints.

Every value is the full-data mean loss ``L`` (:meth:`basins.Problem.loss`), computed for many
points at once by :meth:`basins.Problem.loss_many`; nothing is estimated, so a value carries no
error bar beyond the rounding of the problem's dtype.

Slices (Li et al. 2018)
    ``L(θ* + t·d)`` on a grid of ``t`` (1-D), or ``L(θ* + x·d₁ + y·d₂)`` on a grid of
    ``(x, y)`` (2-D). The directions are

    * ``random``: Gaussian, **filter-normalised** (Li, Xu, Taylor, Studer & Goldstein,
      "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018): in every parameter tensor
      of two or more dimensions, each filter (slice along the first dimension: an output unit
      or channel) is rescaled to the norm of the same filter of θ*, so that ``t = 1`` moves each
      filter by its own size, whatever the scale of the layer. Tensors of one dimension (biases,
      normalisation scales and shifts) get no component ("ignore biasbn" in Li et al.'s code):
      they are held at θ*. Axes are in units of that filter-wise scale.
    * ``top``: the unit Hessian eigenvectors of the largest eigenvalues (Lanczos,
      :func:`basins.analyses.hessian.hessian_eigenvalues`). Axes are Euclidean distances in
      parameter space.

Linear mode connectivity (Frankle, Dziugaite, Roy & Carbin, ICML 2020)
    ``L((1 − t)·θa + t·θb)`` for ``t ∈ [0, 1]``. The barrier is
    ``max_t L(θ(t)) − max(L(θa), L(θb))`` and the two lie in one basin at ``ε`` when the barrier
    is at most ``ε``. A grid maximum is only a lower bound of the true maximum; it is refined by
    golden-section search on the bracket around the grid's largest value, and ``barrier`` is the
    largest loss found (still a lower bound: the line's maximum may sit in a bump the grid missed).

Cost: one loss evaluation per point (``num_loss_evals``), plus the Lanczos HVPs for ``top``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from basins.engine.problem import Problem
from basins.errors import InputError
from basins.progress import Progress, ProgressCallback
from basins.record import Array, Record

DIRECTIONS = ("random", "top")
#: golden-section steps refining the line's maximum (each one loss evaluation)
REFINE_STEPS = 24
_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass
class LandscapeResult:
    """Losses on a slice or a line (module docstring).

    Attributes:
        kind: ``"1d"``, ``"2d"`` or ``"line"``.
        directions: ``"random"``, ``"top"`` or ``"line"``.
        loss: float64 full-data losses: ``(G,)`` at ``t`` (1-D, line) or ``(Gx, Gy)`` with
            ``loss[i, j]`` at ``(x[i], y[j])`` (2-D).
        t: ``(G,)`` grid (1-D slices and lines), else None.
        x, y: ``(Gx,)``, ``(Gy,)`` grids (2-D), else None.
        extent: the grid spans ``[−extent, extent]`` (slices); None for a line.
        normalisation: how random directions were scaled; None otherwise.
        direction_eigenvalues: the Hessian eigenvalues of the ``top`` directions.
        loss_at_optimum: ``L(θ*)``.
        barrier, barrier_t, loss_a, loss_b, epsilon, same_basin, other_model,
        other_model_sha256: the line's results and settings (None for slices).
        num_loss_evals, num_hvps: the work done.
    """

    kind: str
    directions: str
    loss: torch.Tensor
    t: torch.Tensor | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    extent: float | None = None
    seed: int = 0
    normalisation: str | None = None
    direction_eigenvalues: torch.Tensor | None = None
    loss_at_optimum: float = math.nan
    barrier: float | None = None
    barrier_t: float | None = None
    loss_a: float | None = None
    loss_b: float | None = None
    epsilon: float | None = None
    same_basin: bool | None = None
    other_model: str | None = None
    other_model_sha256: str | None = None
    num_loss_evals: int = 0
    num_hvps: int = 0

    def record(self) -> Record:
        """The report group ``/landscape`` and the ``--json`` keys."""
        unit = "loss"
        axis = ("filter-normalised units (t = 1 moves each filter by its own norm)"
                if self.directions == "random" else "parameter-space distance (Euclidean)"
                if self.directions == "top" else "fraction of the way from MODEL to OTHER")
        attrs: dict[str, Any] = {
            "kind": self.kind, "directions": self.directions, "normalisation": self.normalisation,
            "extent": self.extent, "num_points": int(self.loss.numel()), "seed": self.seed,
            "loss_at_optimum": self.loss_at_optimum, "num_loss_evals": self.num_loss_evals,
            "num_hvps": self.num_hvps, "axis_units": axis,
            "loss_units": "the problem's loss (its name is the problem's key `loss`; here `loss` is the values)",
        }
        arrays: dict[str, Array] = {}
        if self.kind == "2d":
            assert self.x is not None and self.y is not None
            arrays["x"] = Array(self.x, "grid along the first direction", axis)
            arrays["y"] = Array(self.y, "grid along the second direction", axis)
            arrays["loss"] = Array(self.loss, "full-data loss, loss[i, j] at (x[i], y[j])", unit)
        else:
            assert self.t is not None
            arrays["t"] = Array(self.t, "grid along the direction" if self.kind == "1d" else
                                "θ(t) = (1 − t)·θa + t·θb", axis)
            arrays["loss"] = Array(self.loss, "full-data loss at t", unit)
        if self.direction_eigenvalues is not None:
            arrays["direction_eigenvalues"] = Array(self.direction_eigenvalues,
                                                    "Hessian eigenvalues of the directions", "loss / parameter²")
        if self.kind == "line":
            attrs.update(barrier=self.barrier, barrier_t=self.barrier_t, loss_a=self.loss_a, loss_b=self.loss_b,
                         epsilon=self.epsilon, same_basin=self.same_basin, other_model=self.other_model,
                         other_model_sha256=self.other_model_sha256,
                         barrier_method=f"grid maximum refined by {REFINE_STEPS} golden-section steps: the "
                                        "largest loss found (a lower bound on the line's maximum)")
        return Record(attrs, arrays)


def _grid(extent: float, points: int, device: torch.device) -> torch.Tensor:
    """``points`` values on ``[−extent, extent]`` with 0 exactly on the grid (an odd count is symmetric)."""
    g = torch.linspace(-extent, extent, points, dtype=torch.float64)
    g[(g.abs()).argmin()] = 0.0
    return g.to(device)


def filter_normalised_direction(problem: Problem, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian direction ``(P,)``, filter-normalised against θ* (module docstring); problem dtype."""
    theta = problem.space.unflatten(problem.theta0)
    parts = []
    for name in problem.space.names:
        w = theta[name].detach().to("cpu", torch.float64)
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        if w.dim() <= 1:
            d.zero_()
        else:
            wf, df = w.reshape(w.shape[0], -1), d.reshape(d.shape[0], -1)
            df.mul_(wf.norm(dim=1, keepdim=True) / df.norm(dim=1, keepdim=True).clamp_min(1e-300))
        parts.append(d.reshape(-1))
    v = torch.cat(parts)
    if not bool(v.abs().sum() > 0):
        raise InputError("directions='random': every selected parameter is one-dimensional (biases, norm "
                         "scales) or zero, so a filter-normalised direction is zero; use directions='top'")
    return v.to(problem.device, problem.dtype)


def _losses(problem: Problem, thetas: torch.Tensor, chunk: int, callback: ProgressCallback | None,
            done: list[int], total: int) -> torch.Tensor:
    """``L`` at the rows of ``thetas`` ``(K, P)``, ``chunk`` points per batched call, with progress."""
    out = []
    for s in range(0, thetas.shape[0], chunk):
        out.append(problem.loss_many(thetas[s : s + chunk]).to("cpu", torch.float64))
        done[0] += out[-1].numel()
        if callback is not None:
            callback(Progress("landscape", done[0], total, "points"))
    return torch.cat(out)


def _check_grid(points: int, extent: float | None) -> None:
    if not isinstance(points, int) or isinstance(points, bool) or points < 2:
        raise InputError(f"num_points must be an integer ≥ 2, got {points!r}")
    if extent is not None and not (isinstance(extent, (int, float)) and math.isfinite(extent) and extent > 0):
        raise InputError(f"extent must be a positive number, got {extent!r}")


def landscape_slice(problem: Problem, *, dims: int = 1, directions: str = "random", num_points: int | None = None,
                    extent: float | None = None, seed: int = 0, chunk: int = 16,
                    callback: ProgressCallback | None = None) -> LandscapeResult:
    """``L`` on a 1-D or 2-D slice through θ* (module docstring).

    Args:
        problem: the model at θ*, its data and loss.
        dims: 1 or 2.
        directions: ``random`` (filter-normalised, seeded) or ``top`` (Hessian eigenvectors).
        num_points: grid points per axis (default 51 for 1-D, 21 for 2-D); an odd number puts
            θ* at the centre; 0 is always on the grid.
        extent: the grid spans ``[−extent, extent]`` along each direction. Default: 1 for
            ``random`` (each filter moved by its own norm, as in Li et al.); for ``top``
            ``2·√(2·max(L(θ*), 0.01)/λ)`` with ``λ`` the smallest eigenvalue of the directions:
            twice the distance at which the quadratic model doubles the loss.
        seed: seeds the random directions.
        chunk: points per batched :meth:`~basins.Problem.loss_many` call (memory ∝ chunk ×
            activations of a data chunk).
        callback: :class:`~basins.progress.Progress` after every batch (unit ``points``).

    Returns:
        A :class:`LandscapeResult`. Cost: ``num_points**dims`` loss evaluations (+ the Lanczos
        HVPs for ``top``).

    Raises:
        InputError: bad ``dims``, ``directions``, ``num_points`` or ``extent``.
    """
    if dims not in (1, 2):
        raise InputError(f"dims must be 1 or 2, got {dims!r}")
    if directions not in DIRECTIONS:
        raise InputError(f"unknown directions={directions!r}: use random or top")
    points = num_points if num_points is not None else (51 if dims == 1 else 21)
    _check_grid(points, extent)
    hvps_before = problem.counters.num_hvps
    eigenvalues = None
    if directions == "random":
        gen = torch.Generator().manual_seed(seed)
        dirs = [filter_normalised_direction(problem, gen) for _ in range(dims)]
        normalisation = "filter-wise (Li et al. 2018); 1-D tensors (biases, norm parameters) held fixed"
        ext = 1.0 if extent is None else float(extent)
    else:
        from basins.analyses.hessian import hessian_eigenvalues

        res = hessian_eigenvalues(problem, k=dims, eigenvectors=True, seed=seed)
        assert res.top is not None and res.top.eigenvectors is not None
        vecs = res.top.eigenvectors.to(problem.device, torch.float64)
        dirs = [(vecs[:, i] / vecs[:, i].norm()).to(problem.dtype) for i in range(dims)]
        eigenvalues = res.top.eigenvalues.clone()
        normalisation = None
        lam = float(eigenvalues.min())
        if extent is None:
            if not lam > 0:
                raise InputError(f"the top Hessian eigenvalue {lam:.3g} is not positive, so there is no default "
                                 "extent along it; pass extent")
            ext = 2.0 * math.sqrt(2.0 * max(float(problem.loss_at_optimum), 1e-2) / lam)
        else:
            ext = float(extent)
    grid = _grid(ext, points, problem.device)
    theta = problem.theta0
    done = [0]
    if dims == 1:
        thetas = theta[None, :] + grid[:, None].to(problem.dtype) * dirs[0][None, :]
        loss = _losses(problem, thetas, chunk, callback, done, points)
        return LandscapeResult("1d", directions, loss, t=grid.cpu(), extent=ext, seed=seed,
                               normalisation=normalisation, direction_eigenvalues=eigenvalues,
                               loss_at_optimum=float(problem.loss_at_optimum), num_loss_evals=points,
                               num_hvps=problem.counters.num_hvps - hvps_before)
    rows = []
    total = points * points
    for xi in grid:  # one row of the grid at a time: points × P parameters in memory, not points²
        thetas = theta[None, :] + xi.to(problem.dtype) * dirs[0][None, :] + grid[:, None].to(problem.dtype) * dirs[1][None, :]
        rows.append(_losses(problem, thetas, chunk, callback, done, total))
    return LandscapeResult("2d", directions, torch.stack(rows), x=grid.cpu(), y=grid.cpu().clone(), extent=ext,
                           seed=seed, normalisation=normalisation, direction_eigenvalues=eigenvalues,
                           loss_at_optimum=float(problem.loss_at_optimum), num_loss_evals=total,
                           num_hvps=problem.counters.num_hvps - hvps_before)


def linear_path(problem: Problem, other: torch.Tensor, *, num_points: int = 25, epsilon: float | None = None,
                other_model: str | None = None, other_model_sha256: str | None = None, chunk: int = 16,
                callback: ProgressCallback | None = None) -> LandscapeResult:
    """``L`` on the straight line from θ* (``t = 0``) to ``other`` (``t = 1``), and its barrier.

    Args:
        problem: the model at θa = θ*.
        other: θb, ``(P,)`` in the problem's parameter order
            (:func:`basins.files.loading.load_parameters_like`).
        num_points: grid points on ``[0, 1]``, endpoints included.
        epsilon: the two lie in one basin when the barrier is at most ``epsilon`` (loss units).
            Default ``max(1e-3·max(L(θa), L(θb)), 1e-6)``.
        other_model, other_model_sha256: recorded.
        chunk, callback: as :func:`landscape_slice`.

    Returns:
        A :class:`LandscapeResult` of kind ``"line"``. Cost: ``num_points + 24`` loss evaluations.

    Raises:
        InputError: ``other`` of the wrong shape or not finite, bad ``num_points`` or ``epsilon``.
    """
    _check_grid(num_points, None)
    if other.shape != (problem.num_params,):
        raise InputError(f"other must have shape ({problem.num_params},), got {tuple(other.shape)}")
    if not bool(torch.isfinite(other).all()):
        raise InputError("other has non-finite parameters")
    if epsilon is not None and not (math.isfinite(epsilon) and epsilon >= 0):
        raise InputError(f"epsilon must be a finite number ≥ 0, got {epsilon!r}")
    a = problem.theta0.to(torch.float64)
    b = other.to(problem.device, torch.float64)
    t = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    total = num_points + REFINE_STEPS
    done = [0]

    def at(ts: torch.Tensor) -> torch.Tensor:
        thetas = (a[None, :] * (1 - ts[:, None].to(a.device)) + b[None, :] * ts[:, None].to(a.device))
        return _losses(problem, thetas.to(problem.dtype), chunk, callback, done, total)

    loss = at(t)
    loss_a, loss_b = float(loss[0]), float(loss[-1])
    i = int(loss.argmax())
    best_t, best = float(t[i]), float(loss[i])
    if 0 < i < num_points - 1:  # an interior maximum: golden-section search on its bracket
        lo, hi = float(t[i - 1]), float(t[i + 1])
        c, d = hi - _INVPHI * (hi - lo), lo + _INVPHI * (hi - lo)
        fc, fd = (float(v) for v in at(torch.tensor([c, d], dtype=torch.float64)))
        for _ in range(REFINE_STEPS - 2):
            if fc > fd:
                hi, d, fd = d, c, fc
                c = hi - _INVPHI * (hi - lo)
                fc = float(at(torch.tensor([c], dtype=torch.float64))[0])
            else:
                lo, c, fc = c, d, fd
                d = lo + _INVPHI * (hi - lo)
                fd = float(at(torch.tensor([d], dtype=torch.float64))[0])
            for tt, ff in ((c, fc), (d, fd)):
                if ff > best:
                    best, best_t = ff, tt
        refined = REFINE_STEPS
    else:
        refined = 0
    barrier = best - max(loss_a, loss_b)
    eps = max(1e-3 * max(loss_a, loss_b), 1e-6) if epsilon is None else float(epsilon)
    return LandscapeResult("line", "line", loss, t=t, extent=None, loss_at_optimum=float(problem.loss_at_optimum),
                           barrier=barrier, barrier_t=best_t, loss_a=loss_a, loss_b=loss_b, epsilon=eps,
                           same_basin=barrier <= eps, other_model=other_model, other_model_sha256=other_model_sha256,
                           num_loss_evals=num_points + refined, num_hvps=0)
