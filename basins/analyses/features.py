"""The feature Gram matrix: the Gauss–Newton part of the Hessian seen from the outputs (empirical NTK).

Write ``J ∈ ℝ^{(n·k)×P}`` for the Jacobian of the model's outputs (n examples × k outputs
each) with respect to θ, and ``H_ℓ`` for the block-diagonal Hessian of the loss with respect to
the outputs (one ``k×k`` block per example, with the loss's normalisation). The Hessian is

.. math:: H = G + R,\\qquad G = J^\\top H_\\ell J

(``R`` involves the residuals and the model's second derivatives; ``R = 0`` at a zero-residual
mse optimum, where ``H = (2/N) JᵀJ``, N = n·k averaged terms). The nonzero eigenvalues of
``G`` are those of the ``(n·k)×(n·k)`` feature Gram matrix

.. math:: K = H_\\ell^{1/2} J J^\\top H_\\ell^{1/2}

(for mse ``K = (2/N)·JJᵀ``, the scaled empirical neural tangent kernel; for cross-entropy
``H_ℓ = (diag p − ppᵀ)/n`` per example, so ``rank K ≤ n(k−1)``). Each eigenvector of ``K``
is an independent "feature" direction in output space and its eigenvalue that feature's
curvature; ``P − rank K`` directions of parameter space leave G flat.

Known limitations: needs the loss to be a mean of per-example terms (all built-in losses
are; checked) and a loss convex in the outputs (for a non-convex user loss the negative part
of ``H_ℓ`` is dropped, with a note); data must not be sharded across processes. Memory:
``8·(n·k·P + 2(n·k)²)`` bytes when ``n·k ≤ P`` (route ``gram``), else ``8·2P²`` plus one
chunk's Jacobian (route ``outer``, ``G`` accumulated chunk by chunk).

Cost: ``n·k`` vector-Jacobian products (per-example ``vmap(jacrev)``; for ``k ≪ P`` this is
far cheaper than ``P`` forward-mode products), one ``O(min(nk, P)²·max(nk, P))`` product and
one symmetric eigendecomposition, and ``gn_probes`` HVPs for the check ``‖Hv − Gv‖/‖Hv‖``.

Rank cutoff (documented rule): a Jacobian computed in precision ``ε`` (the problem's dtype)
is known to ``e = 10·√max(nk, P)·ε·σ_max`` in each singular value ``σ = √μ`` (Weyl, with a
random-rounding estimate of the error's norm), and the float64 Gram eigenvalues to
``f = max(nk, P)·ε₆₄·μ_max`` (the ``σ_max·max(dims)·eps`` rule of ``numpy.linalg.matrix_rank``
applied to K). An eigenvalue is *certainly* above a threshold t when
``max(√μ − e, 0)² − f > t`` and *possibly* above when ``(√μ + e)² + f > t``; the numerical
rank counts ``μ > e² + f``. References: Jacot, Gabriel & Hongler, NeurIPS 2018 (NTK);
Sagun et al. 2017 and Papyan 2020 (the Gauss–Newton part and the bulk near zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from basins.analyses.jacobian import (
    JACOBIAN_MODES,
    check_separable,
    choose_mode,
    factored_rows,
    outputs_per_example,
)
from basins.engine.memory import memory_budget
from basins.engine.problem import Problem, counted
from basins.errors import InputError
from basins.progress import Progress, ProgressCallback
from basins.record import EIGEN_UNITS, Array, Record

__all__ = [
    "FeatureRank",
    "FeaturesResult",
    "feature_analysis",
    "FEATURE_ROUTES",
    "JACOBIAN_MODES",
    "FeatureGram",
    "feature_gram",
    "features_memory_bytes",
    "outputs_per_example",
]

#: ``gram``: the (nk)×(nk) matrix K from the stored factored Jacobian; ``outer``: the P×P
#: matrix G accumulated chunk by chunk (nothing of size nk·P is stored); ``auto``: the
#: smaller of the two.
FEATURE_ROUTES = ("auto", "gram", "outer")
#: Safety factor of the Jacobian's rounding-error estimate (see the module docstring).
_NOISE_FACTOR = 10.0


@dataclass
class FeatureGram:
    """Spectrum of the feature Gram matrix K (= nonzero spectrum of G = JᵀH_ℓJ).

    Attributes:
        eigenvalues: ``(min(nk, P),)`` float64, descending: K's eigenvalues, i.e. G's
            nonzero eigenvalues (loss units per unit θ²), numerical zeros included.
        num_params: P.
        num_examples: n.
        outputs_per_example: k.
        num_outputs: n·k (rows of J).
        loss_name: the loss.
        scale: for mse, ``2/N``: ``K = scale·JJᵀ`` (``eigenvalues/scale`` are the NTK's); else None.
        sigma_noise: ``e``, the error of each singular value ``√μ`` (module docstring).
        float_floor: ``f``, the float64 error of each eigenvalue of K.
        rank: numerical rank, ``#{μ > cutoff}``.
        cutoff: ``e² + f``.
        participation_ratio: ``(Σμ)² / Σμ²`` over μ > 0: the effective number of features.
        route: ``gram`` or ``outer``.
        jacobian_mode: ``per-example`` or ``batch``.
        jacobian_dtype: dtype the Jacobian was computed in.
        eigenvectors: ``(nk, q)`` unit eigenvectors of K for the top q eigenvalues (rows are
            example-major: row ``i·k + j`` is output j of example i), or None.
        gn_residuals: ``‖Hv − Gv‖/‖Hv‖`` for each random Gaussian v (how far H is from G).
        residual_scale: ``max ‖(H − G)v‖/‖v‖`` over those v (loss / parameter²): a rough size of
            ``R = H − G`` in eigenvalue units (an rms, so at most ``‖R‖₂``); below it H's small
            eigenvalues need not match G's. None without a check.
        num_hvps: HVPs used (the Gauss–Newton check).
        num_vjps: vector-Jacobian products (Jacobian rows computed, both passes).
        notes: remarks for the user (non-convex loss, eigenvector pass, ...).
    """

    eigenvalues: torch.Tensor
    num_params: int
    num_examples: int
    outputs_per_example: int
    num_outputs: int
    loss_name: str
    scale: float | None
    sigma_noise: float
    float_floor: float
    rank: int
    cutoff: float
    participation_ratio: float
    route: str
    jacobian_mode: str
    jacobian_dtype: str
    eigenvectors: torch.Tensor | None = None
    gn_residuals: list[float] = field(default_factory=list)
    residual_scale: float | None = None
    num_hvps: int = 0
    num_vjps: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue of K (= of G)."""
        return float(self.eigenvalues[0]) if self.eigenvalues.numel() else 0.0

    @property
    def gn_residual(self) -> float | None:
        """The largest of :attr:`gn_residuals` (None when no check was made)."""
        return max(self.gn_residuals) if self.gn_residuals else None

    def rank_at(self, threshold: float) -> tuple[int, int, int]:
        """``(rank, rank_lower, rank_upper)``: eigenvalues above ``threshold``, as computed,
        certainly and possibly (see the module docstring)."""
        mu = self.eigenvalues
        s = mu.clamp_min(0).sqrt()
        e, f = self.sigma_noise, self.float_floor
        rank = int((mu > threshold).sum())
        certain = int(((s - e).clamp_min(0) ** 2 - f > threshold).sum())
        possible = int(((s + e) ** 2 + f > threshold).sum())
        return rank, certain, possible

    def loadings(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where eigenvector ``index`` of K lives: ``(per_output (k,), per_example (n,))``,
        the squared entries summed over examples / over outputs (each sums to 1)."""
        if self.eigenvectors is None or index >= self.eigenvectors.shape[1]:
            raise InputError(f"eigenvector index {index} was not computed: ask for more top_vectors", param="index")
        u2 = self.eigenvectors[:, index].reshape(self.num_examples, self.outputs_per_example) ** 2
        return u2.sum(dim=0), u2.sum(dim=1)


def features_memory_bytes(num_outputs: int, num_params: int, route: str = "auto") -> tuple[str, int]:
    """The route :func:`feature_gram` takes and the bytes it needs (float64 storage)."""
    if route == "auto":
        route = "gram" if num_outputs <= num_params else "outer"
    if route == "gram":
        return route, 8 * (num_outputs * num_params + 2 * num_outputs**2)
    return route, 8 * 2 * num_params**2


def feature_gram(
    problem: Problem,
    *,
    route: str = "auto",
    jacobian: str = "auto",
    top_vectors: int = 0,
    gn_probes: int = 3,
    seed: int = 0,
    memory_bytes: int | None = None,
    callback: ProgressCallback | None = None,
) -> FeatureGram:
    """Eigenvalues (and optionally top eigenvectors) of the feature Gram matrix of ``problem``.

    Args:
        problem: a :class:`basins.Problem` (outputs ``(n, ...)``, k = entries per example).
        route: one of :data:`FEATURE_ROUTES`.
        jacobian: one of :data:`JACOBIAN_MODES`.
        top_vectors: how many top eigenvectors of K to return (loadings per output/example).
            With route ``outer`` they cost a second Jacobian pass.
        gn_probes: random vectors for the check ``‖Hv − Gv‖/‖Hv‖`` (one HVP each; 0: none).
        seed: seeds the check's vectors.
        memory_bytes: budget (default a quarter of physical memory).
        callback: called with a :class:`~basins.progress.Progress`: phase ``jacobian`` /
            ``eigenvectors`` (unit ``examples``), ``eigh`` (no unit), ``gn-check`` (HVPs).

    Returns:
        A :class:`FeatureGram`. Cost: ``n·k`` VJPs (twice for ``outer`` with eigenvectors),
        one dense eigendecomposition of size ``min(nk, P)``, ``gn_probes`` HVPs.

    Raises:
        InputError: bad options; K (or G) would not fit ``memory_bytes`` (use the nullity
            method ``slq`` or fewer examples); a loss that is not a mean of per-example terms;
            route ``gram`` or ``top_vectors`` with data split across processes.
    """
    if route not in FEATURE_ROUTES:
        raise InputError(f"unknown features route {route!r}: use one of {', '.join(FEATURE_ROUTES)}", param="route")
    if jacobian not in JACOBIAN_MODES:
        raise InputError(f"unknown jacobian mode {jacobian!r}: use one of {', '.join(JACOBIAN_MODES)}",
                         param="jacobian")
    for name, value in (("top_vectors", top_vectors), ("gn_probes", gn_probes)):
        if value < 0:
            raise InputError(f"{name} must be ≥ 0, got {value}", param=name)
    sharded = getattr(problem, "num_local_examples", problem.num_examples) != problem.num_examples
    if sharded:
        # data split across processes (torchrun): each process sums its rows into G = JᵀH_ℓJ,
        # then G is all-reduced; the (n·k)² Gram matrix and per-example loadings would need every row
        if route == "gram" or top_vectors:
            raise InputError("with data split across processes (torchrun) the features route is 'outer' and "
                             "per-example loadings (top_vectors) are not available; use route='outer' and top_vectors=0, "
                             "or run in one process", param="route" if route == "gram" else "top_vectors")
        route = "outer"
    P, n = int(problem.num_params), int(problem.num_examples)
    k = outputs_per_example(problem)
    M = n * k
    route, need = features_memory_bytes(M, P, route)
    budget = memory_budget(memory_bytes, problem.device)
    if need > budget:
        raise InputError(
            f"the feature Gram matrix needs {need / 2**30:.1f} GiB ({'(n·k)² with n·k' if route == 'gram' else 'P² with P'} "
            f"= {M if route == 'gram' else P:,}) but the budget is {budget / 2**30:.1f} GiB; raise memory_bytes, or use the nullity "
            "method 'slq', or fewer examples", param="memory_bytes"
        )
    notes: list[str] = []
    check_separable(problem)

    def report(phase: str, done: int, total: int | None, unit: str) -> None:
        if callback is not None:
            callback(Progress(phase, done, total, unit))

    mode = choose_mode(problem, jacobian, notes)
    num_vjps = 0
    Jh: torch.Tensor | None = None
    G: torch.Tensor | None = None
    if route == "gram":
        Jh = torch.empty(M, P, dtype=torch.float64, device=problem.device)
    else:
        G = torch.zeros(P, P, dtype=torch.float64, device=problem.device)
    for start, rows in factored_rows(problem, k, mode, notes, lambda d: report("jacobian", d, n, "examples")):
        if Jh is not None:
            Jh[start * k : start * k + rows.shape[0]] = rows
        else:
            assert G is not None
            G.addmm_(rows.T, rows)
        num_vjps += rows.shape[0]

    if G is not None and sharded:
        G = problem.reduce(G)  # sum of the processes' parts: identical on every rank
        num_vjps = int(problem.reduce(torch.tensor(float(num_vjps), dtype=torch.float64, device=G.device)).item())
    report("eigh", 0, None, "")
    eigenvectors = None
    if Jh is not None:
        K = Jh @ Jh.T
        if top_vectors:
            mu, U = torch.linalg.eigh(K)
            eigenvectors = U.flip(1)[:, : min(top_vectors, M)].contiguous()
        else:
            mu = torch.linalg.eigvalsh(K)
        del K
    else:
        assert G is not None
        if top_vectors:
            mu, V = torch.linalg.eigh(G)
            V = V.flip(1)[:, : min(top_vectors, M, P)]
        else:
            mu = torch.linalg.eigvalsh(G)
    mu = mu.flip(0)[: min(M, P)].cpu()
    mu_max = max(float(mu[0]), 0.0)
    if mu_max == 0:
        notes.append(f"the loss {problem.loss_name!r} has zero curvature in the model's outputs, so G = 0 "
                     "(for nll on log-probabilities, use cross-entropy on logits); use the nullity method 'exact' or 'slq'")

    eps = torch.finfo(problem.dtype).eps
    sigma_noise = _NOISE_FACTOR * math.sqrt(max(M, P)) * eps * math.sqrt(mu_max)
    float_floor = max(M, P) * torch.finfo(torch.float64).eps * mu_max
    cutoff = sigma_noise**2 + float_floor
    positive = mu.clamp_min(0)
    pr = float(positive.sum() ** 2 / (positive**2).sum()) if mu_max > 0 else 0.0

    if G is not None and top_vectors:
        # u = J_h v / σ: a second Jacobian pass, projecting each chunk's rows on the top v's.
        sig = mu[: V.shape[1]].clamp_min(0).sqrt()
        good = sig > math.sqrt(cutoff)
        eigenvectors = torch.zeros(M, V.shape[1], dtype=torch.float64)
        for start, rows in factored_rows(problem, k, mode, notes, lambda d: report("eigenvectors", d, n, "examples")):
            eigenvectors[start * k : start * k + rows.shape[0]] = (rows @ V).cpu()
            num_vjps += rows.shape[0]
        eigenvectors[:, good] /= sig[good]
        if not bool(good.all()):
            eigenvectors = eigenvectors[:, good]
            notes.append("eigenvectors of numerically zero eigenvalues were dropped")

    gn: list[float] = []
    scale_r: float | None = None
    num_hvps = 0
    if gn_probes:
        gen = torch.Generator().manual_seed(seed)
        Vr = torch.randn(P, gn_probes, generator=gen, dtype=torch.float64)
        HV = problem.hvp(Vr.to(problem.device, problem.dtype)).to(torch.float64).cpu()
        num_hvps += gn_probes
        Vd = Vr.to(problem.device)
        if Jh is not None:
            GV = (Jh.T @ (Jh @ Vd)).cpu()
        else:
            assert G is not None
            GV = (G @ Vd).cpu()
        for j in range(gn_probes):
            diff, denom = float((HV[:, j] - GV[:, j]).norm()), float(HV[:, j].norm())
            gn.append(diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf))
            scale_r = max(scale_r or 0.0, diff / float(Vr[:, j].norm()))
        report("gn-check", gn_probes, gn_probes, "HVPs")

    return FeatureGram(
        eigenvalues=mu.to(torch.float64),
        num_params=P, num_examples=n, outputs_per_example=k, num_outputs=M,
        loss_name=problem.loss_name,
        scale=2.0 / problem.num_terms if problem.loss_name == "mse" else None,
        sigma_noise=sigma_noise, float_floor=float_floor, rank=int((mu > cutoff).sum()), cutoff=cutoff,
        participation_ratio=pr, route=route, jacobian_mode=mode,
        jacobian_dtype=str(problem.dtype).replace("torch.", ""),
        eigenvectors=None if eigenvectors is None else eigenvectors.cpu(),
        gn_residuals=gn, residual_scale=scale_r, num_hvps=num_hvps, num_vjps=num_vjps, notes=notes,
    )


@dataclass
class FeatureRank:
    """One rung of the rank ladder: the Gram matrix's rank above ``threshold = rtol·λ_max + atol``.

    ``[rank_lower, rank_upper]`` brackets it (eigenvalues certainly / possibly above, see
    :meth:`FeatureGram.rank_at`); ``flat = P − rank`` directions leave G flat.
    """

    rtol: float
    atol: float
    threshold: float
    rank: int
    rank_lower: int
    rank_upper: int
    flat: int


@dataclass
class FeaturesResult:
    """The feature Gram matrix with its rank ladder and the loadings of its top eigenvectors.

    Attributes:
        gram: the :class:`FeatureGram`.
        ranks: one :class:`FeatureRank` per rtol.
        loadings: per top eigenvector ``{"index", "eigenvalue", "per_output", "per_example"}``
            (squared loadings, :meth:`FeatureGram.loadings`).
        seed: the seed used.
        hvp_route: the problem's HVP route.
        work: what ``problem.counters`` counted during the call (:func:`basins.engine.problem.counted`).
    """

    gram: FeatureGram
    ranks: list[FeatureRank]
    loadings: list[dict[str, Any]]
    seed: int = 0
    hvp_route: str | None = None
    work: dict[str, int] = field(default_factory=dict)

    def record(self) -> Record:
        """The report group ``/features`` and the ``--json`` keys (README, "Architecture")."""
        fg = self.gram
        attrs: dict[str, Any] = {
            "method": "feature Gram matrix H_ℓ^½ J Jᵀ H_ℓ^½ (nonzero spectrum of G = JᵀH_ℓJ)",
            "rank": fg.rank, "cutoff": fg.cutoff, "sigma_noise": fg.sigma_noise, "float_floor": fg.float_floor,
            "participation_ratio": fg.participation_ratio, "lambda_max": fg.lambda_max, "scale": fg.scale,
            "num_outputs": fg.num_outputs, "outputs_per_example": fg.outputs_per_example, "route": fg.route,
            "jacobian_mode": fg.jacobian_mode, "jacobian_dtype": fg.jacobian_dtype,
            "ranks": [asdict(r) for r in self.ranks],
            "gn_residual": fg.gn_residual, "gn_residuals": fg.gn_residuals, "residual_scale": fg.residual_scale,
            "notes": fg.notes, "seed": self.seed,
            "num_hvps": fg.num_hvps, "num_vjps": fg.num_vjps, "hvp_route": self.hvp_route,
            **self.work,
        }
        arrays = {"eigenvalues": Array(fg.eigenvalues, "feature Gram eigenvalues = nonzero spectrum of G, descending",
                                       EIGEN_UNITS)}
        if fg.eigenvectors is not None:
            arrays["eigenvectors"] = Array(fg.eigenvectors.float(), "top unit eigenvectors of the Gram matrix (n·k, q), "
                                           "row i·k + j = output j of example i, float32", None, in_json=False)
        return Record(attrs, arrays, json_only={"loadings": self.loadings})


def rank_ladder(fg: FeatureGram, rtols: Sequence[float], atol: float = 0.0) -> list[FeatureRank]:
    """The rank of ``fg`` at ``t = rtol·λ_max(K) + atol`` for each rtol, with its bracket. No HVPs.

    Raises:
        InputError: a negative or non-finite rtol or atol.
    """
    if not (atol >= 0 and math.isfinite(atol)):
        raise InputError(f"atol must be a non-negative number, got {atol}", param="atol")
    out = []
    for r in rtols:
        if not (r >= 0 and math.isfinite(r)):
            raise InputError(f"rtols must be non-negative numbers, got {r}", param="rtols")
        thr = r * fg.lambda_max + atol
        rank, lo, hi = fg.rank_at(thr)
        out.append(FeatureRank(r, atol, thr, rank, lo, hi, fg.num_params - rank))
    return out


@counted
def feature_analysis(
    problem: Problem,
    *,
    rtols: Sequence[float] = (1e-6, 1e-4, 1e-2),
    atol: float = 0.0,
    route: str = "auto",
    top_vectors: int = 0,
    gn_probes: int = 3,
    seed: int = 0,
    memory_bytes: int | None = None,
    callback: ProgressCallback | None = None,
) -> FeaturesResult:
    """:func:`feature_gram`, its rank ladder (:func:`rank_ladder`) and the loadings of the top
    ``top_vectors`` eigenvectors, in one call. Cost: as :func:`feature_gram`."""
    fg = feature_gram(problem, route=route, top_vectors=top_vectors, gn_probes=gn_probes, seed=seed,
                      memory_bytes=memory_bytes, callback=callback)
    loadings = []
    for i in range(0 if fg.eigenvectors is None else fg.eigenvectors.shape[1]):
        per_output, per_example = fg.loadings(i)
        loadings.append({"index": i, "eigenvalue": float(fg.eigenvalues[i]), "per_output": per_output,
                         "per_example": per_example})
    return FeaturesResult(fg, rank_ladder(fg, rtols, atol), loadings, seed, getattr(problem, "hvp_route", None))
