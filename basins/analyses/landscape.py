"""Loss-landscape slices around θ*, and the loss along the line between two checkpoints.

Every value is the full-data mean loss ``L`` (:meth:`basins.Problem.loss`), evaluated for many
points at once by :meth:`basins.Problem.loss_many`; nothing is estimated, so a value carries no
error bar beyond the rounding of the problem's dtype. Only the selected parameters (θ,
the problem's ``params``) move; buffers and the other parameters stay those of the problem's model.
Limitation: a slice is a picture of two dimensions out of P; a line's maximum is found on a grid
and refined locally, so ``barrier`` is a lower bound on the true maximum along the line.

Slices (Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018)
    ``L(θ* + t·d)`` on a grid of ``t`` (1-D), or ``L(θ* + x·d₁ + y·d₂)`` on a grid of ``(x, y)``
    (2-D), with ``loss[i, j]`` at ``(x[i], y[j])``: rows follow the first direction. The grid
    (:func:`slice_grid`) has a uniform step and contains 0 exactly, so the centre value is
    ``L(θ*)``. The directions are

    * ``random``: Gaussian, **filter-normalised**: in every parameter tensor of two or more
      dimensions, each filter (the slice along the first dimension: an output unit of a linear
      layer, an output channel of a convolution, a row of an embedding) is rescaled to the norm of
      the same filter of θ*, so that ``t = 1`` moves each filter by its own size whatever the
      scale of its layer. Tensors of one dimension (biases, normalisation scales and shifts) get
      no component and are held at θ*: Li et al.'s choice (``ignore='biasbn'`` in their code).
      Axes are in these filter-normalised units; the Euclidean norm of each direction is recorded
      (``direction_norms``) to convert them to parameter-space distance.
    * ``top``: the unit eigenvectors of the largest Hessian eigenvalues (Lanczos,
      :func:`basins.analyses.hessian.hessian_eigenvalues`); their eigenvalues are recorded. Axes are
      Euclidean distances in parameter space.

Linear mode connectivity (Frankle, Dziugaite, Roy & Carbin, "Linear Mode Connectivity and the
Lottery Ticket Hypothesis", ICML 2020)
    ``L(θ(t))`` with ``θ(t) = θa + t·(θb − θa)`` (``= (1 − t)·θa + t·θb``; ``θ(1) = θb``
    exactly) on ``num_points`` equally spaced ``t ∈ [0, 1]``. The barrier is
    ``max_t L(θ(t)) − max(L(θa), L(θb))`` (≥ 0), found as the grid's largest value refined by
    :data:`REFINE_STEPS` loss evaluations of dichotomous search on the grid interval(s) around it: the
    largest loss found, a lower bound on the true maximum (a bump narrower than the grid step away
    from the grid maximum can be missed). The two lie in one basin at ``ε`` when the barrier is at
    most ``ε``. A non-finite loss on the line makes the barrier infinite.

Cost: one loss evaluation per grid point (+ :data:`REFINE_STEPS` for a line), plus the Lanczos
HVPs for ``top``; memory ``chunk × P`` for the points of one batched call (never the whole grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from basins.engine.problem import Problem, counted
from basins.errors import ComputeError, InputError
from basins.progress import Progress, ProgressCallback
from basins.record import Array, Record

__all__ = [
    "DIRECTIONS",
    "LandscapeResult",
    "REFINE_STEPS",
    "default_epsilon",
    "filter_normalised_direction",
    "landscape_slice",
    "linear_path",
    "slice_grid",
]

DIRECTIONS = ("random", "top")
#: grid points per axis when not given
DEFAULT_POINTS = {1: 51, 2: 21, "line": 25}
#: loss evaluations refining the line's maximum (12 dichotomous steps of 2 points: the bracket of
#: two grid steps shrinks by 0.52¹² ≈ 4e-4)
REFINE_STEPS = 24
#: the ``random`` directions' normalisation, as recorded
NORMALISATION = "filter"
_NORMALISATION_TEXT = ("filter-wise (Li et al. 2018): each filter (first dimension) of each tensor of ≥ 2 dimensions "
                       "scaled to the norm of θ*'s filter; 1-D tensors (biases, norm parameters) held at θ*")
#: dichotomous search: the two points of a step sit at the bracket's middle ± δ·width
_DELTA = 0.02
_AXIS_UNITS = {
    "random": "filter-normalised units (t = 1 moves each filter by its own norm at θ*)",
    "top": "parameter-space distance (Euclidean, along a unit eigenvector)",
    "line": "fraction of the way from MODEL (t = 0) to OTHER (t = 1)",
}


@dataclass
class LandscapeResult:
    """Losses on a slice or a line (module docstring).

    Attributes:
        kind: ``"1d"``, ``"2d"`` or ``"line"``.
        directions: ``"random"``, ``"top"`` or ``"line"``.
        loss: float64 full-data losses (loss units): ``(G,)`` at ``t`` (1-D, line) or
            ``(Gx, Gy)`` with ``loss[i, j]`` at ``(x[i], y[j])`` (2-D).
        t: ``(G,)`` float64 grid (1-D slices and lines), else None.
        x, y: ``(Gx,)``, ``(Gy,)`` float64 grids (2-D), else None.
        extent: the largest ``|coordinate|`` on the grid (slices); 1 for a line.
        num_points: grid points per axis.
        seed: seeds the random directions (and the Lanczos start for ``top``).
        normalisation: ``"filter"`` for random directions, else None.
        direction_norms: Euclidean norms of the directions (parameter-space distance per unit
            of the axis).
        direction_cosine: 2-D: cosine of the angle between the two directions.
        direction_eigenvalues: ``top``: the Hessian eigenvalues of the directions (loss /
            parameter²), largest first.
        loss_at_optimum: ``L(θ*)`` as the problem computed it at load.
        barrier, barrier_t, loss_a, loss_b, epsilon, same_basin, line_length: a line's results
            (``line_length = ‖θb − θa‖``); None for slices.
        other_model, other_model_sha256: the line's second checkpoint, recorded.
        num_loss_evals, num_hvps: the work done (loss evaluations include the refinement).
        work: what ``problem.counters`` counted during the call (:func:`basins.engine.problem.counted`);
            its counts replace the two above in :meth:`record`.
    """

    kind: str
    directions: str
    loss: torch.Tensor
    num_points: int
    t: torch.Tensor | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    extent: float = 1.0
    seed: int = 0
    normalisation: str | None = None
    direction_norms: list[float] = field(default_factory=list)
    direction_cosine: float | None = None
    direction_eigenvalues: list[float] | None = None
    loss_at_optimum: float = math.nan
    barrier: float | None = None
    barrier_t: float | None = None
    loss_a: float | None = None
    loss_b: float | None = None
    epsilon: float | None = None
    same_basin: bool | None = None
    line_length: float | None = None
    other_model: str | None = None
    other_model_sha256: str | None = None
    num_loss_evals: int = 0
    num_hvps: int = 0
    work: dict[str, int] = field(default_factory=dict)

    def record(self) -> Record:
        """The report group ``/landscape`` and the ``--json`` keys (schema in the module docstring
        of :mod:`basins.cli.figures.landscape`, which draws it)."""
        axis = _AXIS_UNITS[self.directions]
        attrs: dict[str, Any] = {
            "kind": self.kind, "directions": self.directions, "normalisation": self.normalisation,
            "extent": self.extent, "num_points": self.num_points, "seed": self.seed,
            "loss_at_optimum": self.loss_at_optimum, "num_loss_evals": self.num_loss_evals,
            "num_hvps": self.num_hvps, "axis_units": axis,
            **self.work,
        }
        if self.directions == "random":
            attrs["normalisation_rule"] = _NORMALISATION_TEXT
        if self.kind != "line":
            attrs["direction_norms"] = list(self.direction_norms)
        if self.direction_cosine is not None:
            attrs["direction_cosine"] = self.direction_cosine
        if self.direction_eigenvalues is not None:
            attrs["direction_eigenvalues"] = list(self.direction_eigenvalues)
        loss_units = "loss (the problem's full-data mean loss)"
        arrays: dict[str, Array] = {}
        if self.kind == "2d":
            assert self.x is not None and self.y is not None
            arrays["x"] = Array(self.x, "coordinate along the first direction (rows of loss)", axis)
            arrays["y"] = Array(self.y, "coordinate along the second direction (columns of loss)", axis)
            arrays["loss"] = Array(self.loss, "full-data loss; loss[i, j] at (x[i], y[j])", loss_units)
        else:
            assert self.t is not None
            arrays["t"] = Array(self.t, "coordinate along the direction" if self.kind == "1d"
                                else "θ(t) = (1 − t)·θa + t·θb", axis)
            arrays["loss"] = Array(self.loss, "full-data loss at t", loss_units)
        if self.kind == "line":
            attrs.update(
                barrier=self.barrier, barrier_t=self.barrier_t, loss_a=self.loss_a, loss_b=self.loss_b,
                epsilon=self.epsilon, same_basin=self.same_basin, line_length=self.line_length,
                other_model=self.other_model, other_model_sha256=self.other_model_sha256,
                barrier_method=f"largest loss found: the grid maximum refined by dichotomous search ({REFINE_STEPS} "
                               "loss evaluations) on the grid interval(s) around it (a lower bound on the line's "
                               "maximum)",
            )
        return Record(attrs, arrays)


# ---------------------------------------------------------------------- grids and directions
def slice_grid(extent: float, num_points: int) -> torch.Tensor:
    """``(G,)`` float64 coordinates ``k·h``, ``h = extent / ⌊G/2⌋``, ``k = −⌊G/2⌋ … G − 1 − ⌊G/2⌋``.

    A uniform step with 0 exactly on the grid: an odd ``G`` spans ``[−extent, extent]``
    symmetrically; an even ``G`` spans ``[−extent, extent − h]``.
    """
    m = num_points // 2
    return torch.arange(-m, num_points - m, dtype=torch.float64) * (float(extent) / m)


def filter_normalised_direction(problem: Problem, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian direction ``(P,)``, filter-normalised against θ* (module docstring).

    Args:
        problem: gives θ* and the parameter layout (``problem.space``).
        generator: a CPU generator; the Gaussian is drawn in float64 on the CPU, tensor by
            tensor in ``problem.space.names`` order, so a seed gives the same direction on any
            device.

    Returns:
        ``(P,)`` float64 on the problem's device; zero on 1-D tensors. Cost: no loss evaluation.

    Raises:
        InputError: every selected tensor is 1-D (or zero), so the direction would be zero.
    """
    theta = problem.space.unflatten(problem.theta0.detach().to("cpu", torch.float64))
    parts = []
    for name in problem.space.names:
        w = theta[name]
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
                         "scales) or zero, so a filter-normalised direction is zero; use directions='top'",
                         param="directions")
    return v.to(problem.device)


def _top_directions(problem: Problem, dims: int, seed: int,
                    callback: ProgressCallback | None) -> tuple[list[torch.Tensor], list[float]]:
    """The ``dims`` unit Hessian eigenvectors of the largest eigenvalues (float64) and their eigenvalues."""
    from basins.analyses.hessian import hessian_eigenvalues

    res = hessian_eigenvalues(problem, k=dims, eigenvectors=True, seed=seed, callback=callback)
    assert res.top is not None and res.top.eigenvectors is not None
    vecs = res.top.eigenvectors.to(problem.device, torch.float64)
    return [vecs[:, i] / vecs[:, i].norm() for i in range(dims)], [float(v) for v in res.top.eigenvalues]


# ---------------------------------------------------------------------- evaluation
def _blocks(num: int, chunk: int) -> list[int]:
    """Sizes of the batched calls for ``num`` points, at most ``chunk`` each (``chunk + 1`` for the
    last when ``chunk = 2``), and never a single point unless ``chunk = 1``: vmap's path for one
    point rounds differently from its path for several (≈ 1e-16 relative in float64), and the
    barrier compares values from different calls, so every call of a run takes the same path."""
    sizes = [chunk] * (num // chunk) + ([num % chunk] if num % chunk else [])
    if chunk > 1 and len(sizes) > 1 and sizes[-1] == 1:
        if chunk == 2:
            sizes[-2:] = [3]
        else:
            sizes[-2:] = [chunk - 1, 2]
    return sizes


class _Evaluator:
    """``L`` at points made block by block (:func:`_blocks`: at most ``chunk`` points, ``chunk × P``
    memory), counted and reported to ``callback`` (unit ``points``)."""

    def __init__(self, problem: Problem, chunk: int, callback: ProgressCallback | None, total: int) -> None:
        self.problem, self.chunk, self.callback, self.total, self.done = problem, chunk, callback, total, 0

    def __call__(self, coords: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``coords`` ``(K, …)`` → ``(K,)`` float64 on the CPU; ``make`` turns a block of coords into ``(k, P)``."""
        out, s = [], 0
        for size in _blocks(coords.shape[0], self.chunk):
            block = make(coords[s : s + size]).to(self.problem.dtype)
            s += size
            out.append(self.problem.loss_many(block).to("cpu", torch.float64))
            self.done += block.shape[0]
            if self.callback is not None:
                self.callback(Progress("landscape", self.done, self.total, "points"))
        return torch.cat(out)


def _check_points(num_points: Any) -> None:
    if not isinstance(num_points, int) or isinstance(num_points, bool) or num_points < 2:
        raise InputError(f"num_points must be an integer ≥ 2, got {num_points!r}", param="num_points")


def _check_chunk(chunk: Any) -> None:
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise InputError(f"chunk must be a positive integer, got {chunk!r}", param="chunk")


@counted
def landscape_slice(problem: Problem, *, dims: int = 1, directions: str = "random", num_points: int | None = None,
                    extent: float | None = None, seed: int = 0, chunk: int = 16,
                    callback: ProgressCallback | None = None) -> LandscapeResult:
    """``L`` on a 1-D or 2-D slice through θ* (module docstring).

    Args:
        problem: the model at θ*, its data and loss.
        dims: 1 or 2.
        directions: ``random`` (filter-normalised Gaussian, seeded) or ``top`` (unit Hessian
            eigenvectors of the ``dims`` largest eigenvalues).
        num_points: grid points per axis (default 51 for 1-D, 21 for 2-D); odd counts are
            symmetric about θ* (:func:`slice_grid`).
        extent: the largest ``|coordinate|`` on the grid. Default 1 for ``random`` (each filter
            moved by its own norm, Li et al.'s plots); for ``top``
            ``2·√(2·max(L(θ*), 0.01)/λ)`` with ``λ`` the smallest eigenvalue of the directions: the
            quadratic model ``½λt²`` predicts a loss rise of ``4·max(L(θ*), 0.01)`` at the edge,
            i.e. the edge is twice the distance at which the quadratic model doubles the loss (the
            0.01 floor keeps it finite at an interpolating minimum, where ``L(θ*) ≈ 0``).
        seed: seeds the random directions (a CPU ``torch.Generator``), and the Lanczos start for ``top``.
        chunk: points per batched :meth:`~basins.Problem.loss_many` call (memory ∝ chunk × (P +
            the activations of a data chunk)).
        callback: :class:`~basins.progress.Progress` after the Lanczos steps (``top``: unit
            HVPs) and after every batch of points (unit ``points``).

    Returns:
        A :class:`LandscapeResult` of kind ``"1d"`` or ``"2d"``. Cost: ``num_points**dims`` loss
        evaluations, plus the Lanczos HVPs for ``top`` (``num_hvps``).

    Raises:
        InputError: bad ``dims``, ``directions``, ``num_points``, ``extent`` or ``chunk``; for
            ``top`` without ``extent``, a largest eigenvalue that is not positive.
    """
    if dims not in (1, 2) or isinstance(dims, bool):
        raise InputError(f"dims must be 1 or 2, got {dims!r}", param="dims")
    if directions not in DIRECTIONS:
        raise InputError(f"unknown directions {directions!r}: use random or top", param="directions")
    points = DEFAULT_POINTS[dims] if num_points is None else num_points
    _check_points(points)
    _check_chunk(chunk)
    if extent is not None and not (isinstance(extent, (int, float)) and not isinstance(extent, bool)
                                   and math.isfinite(extent) and extent > 0):
        raise InputError(f"extent must be a finite number > 0, got {extent!r}", param="extent")
    hvps_before = problem.counters.num_hvps
    eigenvalues = None
    if directions == "random":
        gen = torch.Generator().manual_seed(seed)
        dirs = [filter_normalised_direction(problem, gen) for _ in range(dims)]
        ext = 1.0 if extent is None else float(extent)
    else:
        dirs, eigenvalues = _top_directions(problem, dims, seed, callback)
        if extent is None:
            lam = min(eigenvalues)
            if not lam > 0:
                raise InputError(f"extent: the top Hessian eigenvalue {lam:.3g} of the slice is not positive, so "
                                 "there is no curvature scale for a default extent; pass extent", param="extent")
            ext = 2.0 * math.sqrt(2.0 * max(float(problem.loss_at_optimum), 1e-2) / lam)
        else:
            ext = float(extent)
    grid = slice_grid(ext, points)
    theta = problem.theta0.to(torch.float64)
    base = torch.stack(dirs)  # (dims, P) float64
    evaluate = _Evaluator(problem, chunk, callback, points ** dims)

    def make(c: torch.Tensor) -> torch.Tensor:  # (k, dims) coordinates → (k, P) points θ* + Σ c_i d_i
        return theta[None, :] + c.to(base.device) @ base

    if dims == 1:
        coords = grid[:, None]
    else:  # row-major: point i·G + j is (x[i], y[j])
        coords = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 2)
    loss = evaluate(coords, make)
    cosine = float(dirs[0] @ dirs[1] / (dirs[0].norm() * dirs[1].norm())) if dims == 2 else None
    common: dict[str, Any] = dict(
        num_points=points, extent=ext, seed=seed, normalisation=NORMALISATION if directions == "random" else None,
        direction_norms=[float(d.norm()) for d in dirs], direction_cosine=cosine,
        direction_eigenvalues=eigenvalues, loss_at_optimum=float(problem.loss_at_optimum),
        num_loss_evals=evaluate.done, num_hvps=problem.counters.num_hvps - hvps_before,
    )
    if dims == 1:
        return LandscapeResult("1d", directions, loss, t=grid, **common)
    return LandscapeResult("2d", directions, loss.reshape(points, points), x=grid, y=grid.clone(), **common)


def default_epsilon(loss_a: float, loss_b: float) -> float:
    """The default one-basin tolerance (loss units): ``max(1e-3·max(L(θa), L(θb)), 1e-6)`` — a 0.1 %
    rise over the higher end, with an absolute floor for endpoints at (near) zero loss."""
    return max(1e-3 * max(loss_a, loss_b), 1e-6)


@counted
def linear_path(problem: Problem, other: torch.Tensor, *, num_points: int = 25, epsilon: float | None = None,
                other_model: str | None = None, other_model_sha256: str | None = None, chunk: int = 16,
                callback: ProgressCallback | None = None) -> LandscapeResult:
    """``L`` on the straight line from θ* (``t = 0``) to ``other`` (``t = 1``), and its barrier.

    Args:
        problem: the model at θa = θ*.
        other: θb, ``(P,)`` in the problem's parameter order
            (:func:`basins.files.loading.load_parameters_like`); moved to the problem's device.
        num_points: equally spaced grid points on ``[0, 1]``, endpoints included.
        epsilon: the two lie in one basin when the barrier is at most ``epsilon`` (loss units);
            default :func:`default_epsilon`.
        other_model, other_model_sha256: recorded.
        chunk, callback: as :func:`landscape_slice`.

    Returns:
        A :class:`LandscapeResult` of kind ``"line"``; ``loss_a``/``loss_b`` are the grid's end
        values, ``L(θa)`` and ``L(θb)`` exactly. Cost: ``num_points + REFINE_STEPS`` loss evaluations.

    Raises:
        InputError: ``other`` of the wrong shape or not finite, bad ``num_points``, ``epsilon`` or ``chunk``.
        ComputeError: ``L(θb)`` is not finite.
    """
    _check_points(num_points)
    _check_chunk(chunk)
    if not isinstance(other, torch.Tensor) or other.shape != (problem.num_params,):
        shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
        raise InputError(f"other must have shape ({problem.num_params},), the problem's P, got {shape}", param="other")
    if not bool(torch.isfinite(other).all()):
        raise InputError("other has non-finite parameters", param="other")
    if epsilon is not None and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise InputError(f"epsilon must be a finite number ≥ 0, got {epsilon!r}", param="epsilon")
    a = problem.theta0.to(torch.float64)
    b = other.to(problem.device, torch.float64)
    step = b - a
    evaluate = _Evaluator(problem, chunk, callback, num_points + REFINE_STEPS)

    def make(t: torch.Tensor) -> torch.Tensor:  # θa + t·(θb − θa); exactly θb at t = 1
        t = t.to(a.device)
        return torch.where((t == 1.0)[:, None], b[None, :], a[None, :] + t[:, None] * step[None, :])

    t = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    t[0], t[-1] = 0.0, 1.0
    loss = evaluate(t, make)
    loss_a, loss_b = float(loss[0]), float(loss[-1])
    if not math.isfinite(loss_b):
        raise ComputeError(f"L(θb) = {loss_b} at the other model is not finite")
    best_t, best = _refined_maximum(t, loss, lambda s: evaluate(s, make))
    top_end = max(loss_a, loss_b)
    barrier = best - top_end if math.isfinite(best) else math.inf
    eps = default_epsilon(loss_a, loss_b) if epsilon is None else float(epsilon)
    return LandscapeResult(
        "line", "line", loss, num_points, t=t, extent=1.0, loss_at_optimum=float(problem.loss_at_optimum),
        barrier=barrier, barrier_t=best_t, loss_a=loss_a, loss_b=loss_b, epsilon=eps, same_basin=barrier <= eps,
        line_length=float(step.norm()), other_model=other_model, other_model_sha256=other_model_sha256,
        num_loss_evals=evaluate.done, num_hvps=0,
    )


def _refined_maximum(t: torch.Tensor, loss: torch.Tensor,
                     f: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """``(t, L)`` of the largest loss found: the grid's maximum, refined by dichotomous search
    (:data:`REFINE_STEPS` / 2 steps of two points each, ``f`` taking ``(2,)`` values of ``t``) for a
    maximum on ``[t[i−1], t[i+1]]`` (clipped to ``[0, 1]``) around the grid's argmax ``i``: each
    step keeps the part of the bracket on the higher point's side, ``1/2 + δ`` of it. A
    non-finite value (NaN counts as ``+inf``) is the maximum: found on the grid, it is returned
    with no refinement; found while refining, the search stops there."""
    bad = ~torch.isfinite(loss)
    if bool(bad.any()):
        return float(t[int(bad.nonzero()[0, 0])]), math.inf
    i = int(loss.argmax())
    best_t, best = float(t[i]), float(loss[i])
    lo, hi = float(t[max(i - 1, 0)]), float(t[min(i + 1, len(t) - 1)])
    for _ in range(REFINE_STEPS // 2):
        mid, half = (lo + hi) / 2, _DELTA * (hi - lo)
        c, d = mid - half, mid + half
        fc, fd = (float(v) for v in f(torch.tensor([c, d], dtype=torch.float64)))
        for tt, ff in ((c, fc), (d, fd)):
            if not math.isfinite(ff):
                return tt, math.inf
            if ff > best:
                best, best_t = ff, tt
        if fc > fd:  # for a maximum unimodal on the bracket: it lies in [lo, d]
            hi = d
        else:  # in [c, hi]
            lo = c
    return best_t, best
