"""Extreme eigenpairs of a symmetric operator by block Lanczos with thick restart.

The operator (:class:`~basins.linalg.operator.Operator`, or a dense symmetric tensor) is seen only
through its checked product on blocks ``V`` of shape ``(P, b)``; for a Hessian one call is one
pass of ``b`` Hessian-vector products over the data.
Basis vectors stay in the operator's dtype; the projected matrix, Ritz values and residuals are
always float64. Every new block is reorthogonalised twice against all stored basis vectors
(a third time where the second pass still cancels, Daniel, Gragg, Kaufman & Stewart 1976), so no
spurious ("ghost") copies of converged eigenvalues appear. Known limitations: with
``block_size=1`` an eigenvalue of exact multiplicity ``μ > 1`` is in general returned once (a
Krylov space holds one vector per eigenspace; see :func:`lanczos` for when more copies are
found); use ``block_size >= μ`` to resolve it. A Ritz pair is only as good as its residual: a
true eigenvalue lies within ``± residual`` of each returned one.

References:
    G. H. Golub and C. F. Van Loan, *Matrix Computations*, 4th ed., 2013, sections 10.1-10.3.
    G. H. Golub and G. Meurant, *Matrices, Moments and Quadrature with Applications*, 2010.
    K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
    SIAM J. Matrix Anal. Appl. 22(2), 602-616, 2000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import torch

from basins.errors import InputError
from basins.linalg.operator import Operator, as_operator
from basins.linalg.scratch import ScratchRows
from basins.progress import Progress, ProgressCallback

__all__ = ["LanczosResult", "LanczosBothEnds", "lanczos", "STORAGES", "STREAM_BYTES"]

_F64 = torch.float64
#: Where the basis may live (:func:`lanczos`'s ``storage``).
STORAGES = ("memory", "disk")
#: Bytes of one column block of an on-disk basis read at a time.
STREAM_BYTES = 1 << 26


@dataclass
class LanczosResult:
    """Ritz pairs at one end of the spectrum.

    Attributes:
        eigenvalues: ``(k,)`` float64, descending for ``which="top"``, ascending for ``"bottom"``.
        residuals: ``(k,)`` float64, ``||H y - θ y||`` for the unit Ritz vector ``y``, read off
            the Lanczos relation (``||B_m S_m||``); a true eigenvalue lies within ``θ ± residual``.
        converged: ``(k,)`` bool, ``residual <= tol * scale``.
        num_matvecs: single-vector products ``H v`` spent by the whole run (a block of ``b``
            counts ``b``); for ``which="both"`` both ends share one run and this same count.
        which: ``"top"`` or ``"bottom"``.
        eigenvectors: ``(P, k)`` unit Ritz vectors in the operator's dtype, or ``None``.
        num_restarts: thick restarts performed.
        scale: largest ``|Ritz value|`` found, the yardstick of ``tol``.
        tol: the relative tolerance asked for.
        exhausted: the Krylov space filled all of ``R^P``, so the pairs are exact.
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    which: str
    eigenvectors: torch.Tensor | None
    num_restarts: int
    scale: float
    tol: float
    exhausted: bool

    @property
    def all_converged(self) -> bool:
        """Whether every returned pair converged."""
        return bool(self.converged.all())


@dataclass
class LanczosBothEnds:
    """Result of ``which="both"``: one run, two ends (``top`` descending, ``bottom`` ascending).

    When ``2k > P`` the two ends overlap. ``num_matvecs`` is the run's total, not a sum.
    """

    top: LanczosResult
    bottom: LanczosResult

    @property
    def num_matvecs(self) -> int:
        """Single-vector products spent by the run."""
        return self.top.num_matvecs

    @property
    def all_converged(self) -> bool:
        """Whether every pair at both ends converged."""
        return self.top.all_converged and self.bottom.all_converged


@overload
def lanczos(operator: Operator | torch.Tensor, *, k: int = ..., which: Literal["top", "bottom"] = ...,
            tol: float = ..., max_matvecs: int | None = ..., block_size: int = ...,
            max_basis: int | None = ..., dtype: torch.dtype = ..., device: str | torch.device | None = ...,
            seed: int = ..., return_eigenvectors: bool = ...,
            callback: ProgressCallback | None = ..., start: torch.Tensor | None = ...,
            storage: str = ..., scratch: str | None = ...) -> LanczosResult: ...
@overload
def lanczos(operator: Operator | torch.Tensor, *, k: int = ..., which: Literal["both"],
            tol: float = ..., max_matvecs: int | None = ..., block_size: int = ...,
            max_basis: int | None = ..., dtype: torch.dtype = ..., device: str | torch.device | None = ...,
            seed: int = ..., return_eigenvectors: bool = ...,
            callback: ProgressCallback | None = ..., start: torch.Tensor | None = ...,
            storage: str = ..., scratch: str | None = ...) -> LanczosBothEnds: ...
def lanczos(operator: Operator | torch.Tensor, *, k: int = 10, which: str = "top",
            tol: float = 1e-4, max_matvecs: int | None = None, block_size: int = 1,
            max_basis: int | None = None, dtype: torch.dtype = _F64,
            device: str | torch.device | None = None, seed: int = 0, return_eigenvectors: bool = False,
            callback: ProgressCallback | None = None, start: torch.Tensor | None = None,
            storage: str = "memory", scratch: str | None = None,
            ) -> LanczosResult | LanczosBothEnds:
    r"""The ``k`` largest and/or smallest eigenpairs of a symmetric operator.

    Block Lanczos with full reorthogonalisation and thick restart (Wu & Simon 2000). After every
    block step the small projected matrix ``T`` (float64) is diagonalised and the run stops as
    soon as every wanted Ritz pair has

    .. math:: \|H y - \theta y\| \le \mathrm{tol}\cdot\max_j |\theta_j|,

    or when the next block would exceed ``max_matvecs``. When the basis becomes invariant
    (``β ≈ 0``, e.g. on a low-rank ``H``, or every Ritz pair converged at once), the run goes on
    from vectors orthogonal to the basis (fresh random ones on exact breakdown) and stops only
    once the latest of these runs adds no pair strictly inside a wanted window (beyond its edge
    by more than ``tol * scale``): so past the rank of ``H`` its zero is returned as often as
    wanted.

    Args:
        operator: ``H`` as an :class:`~basins.linalg.operator.Operator` (its matvec gets blocks
            ``(P, c)``, ``c <= block_size``, once per block step) or a dense symmetric tensor.
        k: eigenpairs wanted at each requested end, ``1 <= k <= P``.
        which: ``"top"`` (largest algebraic), ``"bottom"`` (smallest algebraic; negative means
            not a minimum) or ``"both"`` (a :class:`LanczosBothEnds` from one run).
        tol: relative residual tolerance, ``> 0``.
        max_matvecs: budget of single-vector products (hard cap, never exceeded). Default
            ``max(200, 20 * w)``, ``w = k`` (``min(2k, P)`` for ``"both"``), rounded up to a
            multiple of ``block_size``; a run whose basis covers ``R^P`` stops earlier, exact.
        block_size: ``b``, vectors per ``matvec`` call; resolves multiplicities up to ``b``.
        max_basis: basis vectors kept before a thick restart. Default
            ``max(2w + 20, 40) + 2(b - 1)``, capped at ``P`` (then no restart is ever needed);
            must be ``>= w + 2b``. Memory: at most ``max_basis + block_size`` vectors of length
            ``P`` (plus ``k`` or ``2k`` for the returned eigenvectors), e.g. ``P = 10^7``
            float32, ``k = 50``: ``max_basis = 120`` vectors, 4.8 GB.
        dtype: dtype of the basis vectors, ``torch.float32`` or ``torch.float64``.
        device: device of the basis vectors (default the operator's).
        seed: start vectors are ``randn(b, P)`` from ``torch.Generator().manual_seed(seed)`` on
            the CPU in float64, then moved, so CPU and GPU runs agree.
        return_eigenvectors: also return the ``(P, k)`` Ritz vectors.
        callback: called with a :class:`~basins.progress.Progress` after every block step
            (phase ``"lanczos"``, unit ``"matvecs"``; ``max_residual`` is the largest
            ``residual / scale`` of the wanted pairs, ``nan`` while fewer Ritz values than
            wanted exist, and ``num_converged`` counts the converged ones).
        storage: where the basis lives: ``"memory"`` (a tensor on ``device``) or ``"disk"``: a
            memory-mapped scratch file (:class:`~basins.linalg.scratch.ScratchRows`, on the CPU;
            blocks are moved to the operator's device for its products), read and written in
            column blocks of at most :data:`STREAM_BYTES`, so that only the block being
            orthogonalised, its product and one column block of the basis are resident. Same
            arithmetic as ``"memory"`` up to the summation order of the projections (equal
            eigenvalues to rounding); the returned eigenvectors are then a view on the scratch file.
        scratch: the directory of the scratch file (default ``$BASINS_SCRATCH`` or the system's
            temporary directory).

    Returns:
        A :class:`LanczosResult` (``"top"`` / ``"bottom"``) or :class:`LanczosBothEnds`.
        Cost: ``num_matvecs`` products; ``O(P · max_basis · b)`` work per block step.

    Raises:
        InputError: a bad argument, or a matvec that returns the wrong shape.
        ComputeError: the matvec returned non-finite values.

    Example:
        >>> H = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> r = lanczos(H, k=3, tol=1e-10)
        >>> [round(x, 9) for x in r.eigenvalues.tolist()], r.all_converged
        ([100.0, 99.0, 98.0], True)
    """
    op = as_operator(operator)
    num_params = op.num_params
    _check_args(num_params, k, which, tol, block_size, dtype, seed, callback)
    if start is not None:
        if not isinstance(start, torch.Tensor) or start.dim() not in (1, 2) or start.shape[0] != num_params:
            shape = tuple(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__
            raise InputError(f"start must be a tensor of shape (P,) or (P, m) with P = {num_params}, not {shape}",
                             param="start")
        if not bool(torch.isfinite(start).all()):
            raise InputError("start has non-finite entries", param="start")
    need = min(2 * k, num_params) if which == "both" else k
    if max_matvecs is None:
        max_matvecs = block_size * math.ceil(max(200, 20 * need) / block_size)
    least = block_size * math.ceil(need / block_size)
    if not _is_int(max_matvecs) or max_matvecs < least:
        raise InputError(f"max_matvecs={max_matvecs!r} cannot build {need} Ritz values with "
                         f"block_size={block_size}; use max_matvecs >= {least}", param="max_matvecs")
    if max_basis is None:
        max_basis = max(2 * need + 20, 40) + 2 * (block_size - 1)
    elif not _is_int(max_basis) or (max_basis < num_params and max_basis < need + 2 * block_size):
        raise InputError(f"max_basis={max_basis!r} is too small for {need} wanted pairs and "
                         f"block_size={block_size}; use max_basis >= {need + 2 * block_size}", param="max_basis")
    if storage not in STORAGES:
        raise InputError(f"storage={storage!r} must be 'memory' or 'disk'", param="storage")
    solver = _Solver(op, num_params, k, which, float(tol), int(max_matvecs), block_size,
                     min(int(max_basis), num_params), dtype, op.device if device is None else torch.device(device), seed, callback,
                     storage, scratch)
    return solver.run(return_eigenvectors, start)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_args(num_params: int, k: object, which: object, tol: object,
                block_size: object, dtype: object, seed: object, callback: object) -> None:
    if not _is_int(k) or not 1 <= k <= num_params:  # type: ignore[operator]
        raise InputError(f"k={k!r} must be an integer in [1, num_params={num_params}]", param="k")
    if which not in ("top", "bottom", "both"):
        raise InputError(f"which={which!r} must be 'top', 'bottom' or 'both'", param="which")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not 0 < tol < math.inf:
        raise InputError(f"tol={tol!r} must be a positive finite number, e.g. 1e-4", param="tol")
    if not _is_int(block_size) or not 1 <= block_size <= num_params:  # type: ignore[operator]
        raise InputError(f"block_size={block_size!r} must be an integer in [1, num_params={num_params}]",
                         param="block_size")
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"dtype={dtype!r} must be torch.float32 or torch.float64", param="dtype")
    if not _is_int(seed):
        raise InputError(f"seed={seed!r} must be an integer", param="seed")
    if callback is not None and not callable(callback):
        raise InputError(f"callback={callback!r} must be callable or None", param="callback")


def _eigh(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of the small projected matrix on one thread: threaded LAPACK gains nothing at
    this size (``O(n³)`` flops for an ``n ≤`` a few hundred matrix, less than handing it to a
    thread pool) and a pool stalls on a busy CPU."""
    threads = torch.get_num_threads()
    if threads == 1 or T.shape[0] > 512:
        return torch.linalg.eigh(T)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(T)
    finally:
        torch.set_num_threads(threads)


def _against(W: torch.Tensor, kept: list[int], w: torch.Tensor, passes: int) -> torch.Tensor:
    """Remove the columns ``W[:, kept]`` from ``w`` (P, 1) in place; returns the coefficients."""
    coef = torch.zeros(W.shape[1], dtype=_F64)
    for _ in range(passes):
        for j in kept:
            r = float(W[:, j] @ w[:, 0])
            w.sub_(r * W[:, j : j + 1])
            coef[j] += r
    return coef


class _Solver:
    """State of one run: basis rows ``V[:m]`` (multiplied), pending block ``V[m:m+c]``.

    Invariant (``E`` selects the last multiplied block, ``Q`` the pending one):
    ``H V[:m]^T = V[:m]^T T[:m, :m] + Q^T R E^T`` with ``T`` block-Hessenberg (float64).
    """

    def __init__(self, op: Operator, P: int, k: int, which: str, tol: float, max_matvecs: int,  # noqa: PLR0913
                 b: int, max_basis: int, dtype: torch.dtype, device: torch.device, seed: int,
                 callback: ProgressCallback | None, storage: str = "memory", scratch: str | None = None) -> None:
        self.op, self.P, self.k, self.which, self.tol = op, P, k, which, tol
        self.max_matvecs, self.b, self.max_basis, self.callback = max_matvecs, b, max_basis, callback
        self.need = min(2 * k, P) if which == "both" else k
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator().manual_seed(seed)
        self.eps = torch.finfo(dtype).eps
        self.scratch: ScratchRows | None = None
        if storage == "disk":  # the basis in a memory-mapped file on the host, streamed in column blocks
            self.scratch = ScratchRows(max_basis, P, dtype, scratch)
            self.V = self.scratch.tensor
            self.device = torch.device("cpu")
            itemsize = torch.empty((), dtype=dtype).element_size()
            self.cols = max(1, STREAM_BYTES // (max_basis * itemsize))
        else:
            self.V = torch.empty(max_basis, P, dtype=dtype, device=device)
            self.cols = P
        self.T = torch.zeros(max_basis, max_basis, dtype=_F64)
        self.young = torch.ones(max_basis, dtype=_F64)  # weight on rows since the last breakdown
        self.m = self.num_matvecs = self.num_restarts = 0
        self.hnorm = 0.0  # largest ||H v|| seen, the yardstick of breakdown

    def _random(self, c: int) -> torch.Tensor:
        g = torch.randn(c, self.P, generator=self.gen, dtype=_F64)
        return g.to(device=self.device, dtype=self.dtype).T.contiguous()

    def _project(self, n: int, X: torch.Tensor) -> torch.Tensor:
        """Remove ``span V[:n]`` from the columns of ``X`` in place; twice, thrice if needed."""
        coef = torch.zeros(n, X.shape[1], dtype=_F64)
        if n == 0:
            return coef
        before = torch.linalg.vector_norm(X, dim=0)
        for it in range(3):
            c = self._dot(n, X)
            self._subtract(n, X, c)
            coef += c.to(device="cpu", dtype=_F64)
            after = torch.linalg.vector_norm(X, dim=0)
            if it >= 1 and bool((after >= 0.7 * before).all()):
                break
            before = after
        self._release()
        return coef

    def _dot(self, n: int, X: torch.Tensor) -> torch.Tensor:
        """``V[:n] @ X`` (n, c), streamed in column blocks for an on-disk basis."""
        if self.scratch is None:
            return self.V[:n] @ X
        out = torch.zeros(n, X.shape[1], dtype=X.dtype)
        for a in range(0, self.P, self.cols):
            out += self.V[:n, a : a + self.cols] @ X[a : a + self.cols]
            self.scratch.release(n, a, a + self.cols)  # one block resident at a time
        return out

    def _subtract(self, n: int, X: torch.Tensor, c: torch.Tensor) -> None:
        """``X -= V[:n]^T c`` in place, streamed in column blocks for an on-disk basis."""
        if self.scratch is None:
            X.addmm_(self.V[:n].T, c, alpha=-1)
            return
        for a in range(0, self.P, self.cols):
            X[a : a + self.cols].addmm_(self.V[:n, a : a + self.cols].T, c, alpha=-1)
            self.scratch.release(n, a, a + self.cols)

    def _release(self) -> None:
        if self.scratch is not None:
            self.scratch.release()

    def _orthonormalise(self, W: torch.Tensor, n: int, delta: float
                        ) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
        """Orthonormalise ``W`` (P, c) against ``V[:n]`` and itself, in place.

        Columns whose remainder is ``<= delta`` are deficient: replaced by random probes
        orthogonal to everything (their row of ``R`` is zero), or dropped when ``R^P`` is full.
        Returns ``h`` (n, c) with ``V^T W``, ``R`` (c, c) with ``W = Q R``, kept columns, and the
        number of deficient columns.
        """
        h = self._project(n, W)
        c = W.shape[1]
        R = torch.zeros(c, c, dtype=_F64)
        kept: list[int] = []
        deficient = 0
        for i in range(c):
            w = W[:, i : i + 1]
            before = float(w.norm())
            R[:, i] += _against(W, kept, w, 2)
            nrm = float(w.norm())
            if delta < nrm < 0.5 * before:  # cancellation inside the block: clean once more
                h[:, i] += self._project(n, w)[:, 0]
                R[:, i] += _against(W, kept, w, 1)
                nrm = float(w.norm())
            if nrm > delta:
                w.div_(nrm)
                R[i, i] = nrm
                kept.append(i)
                continue
            deficient += 1
            if self.P - n - len(kept) <= 0:
                continue
            z = self._random(1)
            self._project(n, z)
            _against(W, kept, z, 2)
            nz = float(z.norm())
            if nz > 1e3 * self.eps:
                w.copy_(z / nz)
                kept.append(i)
        return h, R, kept, deficient

    def _start_block(self, start: torch.Tensor | None) -> torch.Tensor:
        """The first block ``(P, b)``: random (cold), or random plus the warm ``start`` (see :func:`lanczos`)."""
        W = self._random(self.b)  # drawn either way: the same random stream as a cold start
        if start is None:
            return W
        S = start.reshape(self.P, -1).to(device=self.device, dtype=_F64)
        S = S / torch.linalg.vector_norm(S, dim=0).clamp_min(torch.finfo(_F64).tiny)
        for j in range(self.b):
            s = S[:, j :: self.b].sum(1)
            ns = float(s.norm())
            if ns > 0:
                g = W[:, j].to(_F64)
                W[:, j] = (g / g.norm() + s / ns).to(self.dtype)
        return W

    def run(self, return_eigenvectors: bool, start: torch.Tensor | None = None) -> LanczosResult | LanczosBothEnds:
        W = self._start_block(start)
        _, _, kept, _ = self._orthonormalise(W, 0, 100 * self.eps * math.sqrt(self.P))
        self._place(W, kept)
        while True:
            m0, self.m = self.m, self.m + len(kept)
            W = self._apply(self.V[m0 : self.m])
            delta = 10 * self.eps * math.sqrt(self.m) * self.hnorm
            h, R, kept, deficient = self._orthonormalise(W, self.m, delta)
            self.T[: self.m, m0 : self.m] = h
            R = R[kept]
            Ts = self.T[: self.m, : self.m]
            theta, S = _eigh((Ts + Ts.T) / 2)
            res = torch.linalg.vector_norm(R @ S[m0 : self.m], dim=0)
            scale = float(theta.abs().max())
            q = min(self.k, self.m)  # Ritz values ascending: the top window reads backwards
            top = list(range(self.m - 1, self.m - 1 - q, -1)) if self.which != "bottom" else []
            bottom = list(range(q)) if self.which != "top" else []
            wanted = sorted(set(top + bottom))
            enough = self.m >= self.need
            ok = res[wanted] <= self.tol * scale
            if self.callback is not None:
                rel = res[wanted] / scale if scale > 0 else torch.where(res[wanted] > 0, math.inf, 0.0)
                worst = float(rel.max()) if enough else math.nan
                nconv = int(ok.sum()) if enough else 0
                rtext = "-" if math.isnan(worst) else f"{worst:.1e}"
                self.callback(Progress("lanczos", self.num_matvecs, self.max_matvecs, "matvecs",
                                       info=f"max residual/‖H‖ {rtext}, {nconv} converged",
                                       max_residual=worst, num_converged=nconv))
            exhausted = not kept
            converged = enough and bool(ok.all())
            # an invariant basis (to tolerance: every Ritz pair converged); the next block probes
            # the rest of R^P
            invariant = deficient == self.m - m0 or float(res.max()) <= self.tol * scale
            if exhausted:
                done = True
            elif invariant:
                done = converged and not self._young_interior(theta, S, top, bottom, scale)
            else:  # a partial breakdown inserted probes: judge after they are multiplied
                done = converged and deficient == 0
            if done or self.num_matvecs + len(kept) > self.max_matvecs:
                return self._result(theta, S, res, scale, top, bottom, exhausted, return_eigenvectors)
            if invariant:
                self.young[: self.m] = 0.0
            if self.m + len(kept) > self.max_basis:
                self._restart(theta, S, R, m0, len(kept))
            else:
                self.T[self.m : self.m + len(kept), m0 : self.m] = R
            self._place(W, kept)

    def _place(self, W: torch.Tensor, kept: list[int]) -> None:
        """Store the kept columns of ``W`` as the pending rows ``V[m:m+c]`` (no temporaries)."""
        for r, j in enumerate(kept):
            self.V[self.m + r] = W[:, j]
        self.young[self.m : self.m + len(kept)] = 1.0
        self._release()

    def _apply(self, block: torch.Tensor) -> torch.Tensor:
        """``H @ block.T`` as a fresh writable (P, c) tensor in the basis dtype; counts matvecs."""
        X = block.T
        if self.scratch is not None:  # the block leaves the scratch file for the operator's device
            X = X.to(self.op.device)
        W = self.op.apply(X)  # checked: shape (InputError), finite (ComputeError); dtype of X
        W = W.to(self.device)
        self.num_matvecs += X.shape[1]
        if W.untyped_storage().data_ptr() == self.V.untyped_storage().data_ptr():
            W = W.clone()
        W = W.contiguous()
        self.hnorm = max(self.hnorm, float(torch.linalg.vector_norm(W, dim=0).max()))
        return W

    def _young_interior(self, theta: torch.Tensor, S: torch.Tensor, top: list[int],
                        bottom: list[int], scale: float) -> bool:
        """At an invariant basis: did the latest run put a pair strictly inside a wanted window?

        Probes of the rest only find further copies of eigenvalues the latest run found (one
        vector per eigenspace), which matter only strictly beyond a window's edge. The test is
        on the span of those Ritz vectors (its weight on the latest run's rows), which does not
        depend on how ``eigh`` splits a multiple Ritz value.
        """
        slack = max(self.tol, 100 * self.eps) * scale
        youth = (S**2 * self.young[: self.m, None]).sum(0)
        inner = [j for j in top if theta[j] > theta[top[-1]] + slack]
        inner += [j for j in bottom if theta[j] < theta[bottom[-1]] - slack]
        return float(youth[inner].sum()) > 0.5

    def _restart(self, theta: torch.Tensor, S: torch.Tensor, R: torch.Tensor, m0: int,
                 c: int) -> None:
        """Thick restart: keep the Ritz vectors nearest the wanted end(s) (Wu & Simon 2000)."""
        nkeep = min(self.max_basis - 2 * self.b, max(self.need + self.b, (self.max_basis + self.need) // 2))
        m = self.m
        if self.which == "top":
            keep = list(range(m - nkeep, m))
        elif self.which == "bottom":
            keep = list(range(nkeep))
        else:
            nb = nkeep // 2
            keep = list(range(nb)) + list(range(m - (nkeep - nb), m))
        Sk = S[:, keep]
        self.young[:nkeep] = (Sk**2 * self.young[:m, None]).sum(0)
        self._rotate(Sk)
        self.T.zero_()
        self.T[:nkeep, :nkeep] = torch.diag(theta[keep])
        self.T[nkeep : nkeep + c, :nkeep] = R @ S[m0:m, keep]
        self.m = nkeep
        self.num_restarts += 1

    def _rotate(self, Sk: torch.Tensor) -> None:
        """``V[:q] <- Sk^T V[:m]`` in place, in column chunks (memory: a ``q x chunk`` buffer)."""
        m, q = Sk.shape
        Sd = Sk.to(device=self.device, dtype=self.dtype).T.contiguous()
        chunk = max(1, (1 << 22) // max(q, 1))
        for a in range(0, self.P, chunk):
            self.V[:q, a : a + chunk] = Sd @ self.V[:m, a : a + chunk]
            if self.scratch is not None:
                self.scratch.release(m, a, a + chunk)
        self._release()

    def _result(self, theta: torch.Tensor, S: torch.Tensor, res: torch.Tensor, scale: float,
                top: list[int], bottom: list[int], exhausted: bool, vectors: bool
                ) -> LanczosResult | LanczosBothEnds:
        # the rows in the order returned (top descending, then the bottom's new ones), so that an
        # on-disk basis returns its vectors as a view on the scratch file, not a copy in memory
        union = top + [j for j in bottom if j not in top]
        if vectors:
            self._rotate(S[:, union])
        where = {j: i for i, j in enumerate(union)}

        def end(idx: list[int], which: str) -> LanczosResult:
            Y = None
            if vectors:
                rows = [where[j] for j in idx]
                contiguous = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
                if self.scratch is not None and contiguous and rows:
                    Y = self.V[rows[0] : rows[0] + len(rows)].T
                else:
                    Y = self.V[rows].T
            return LanczosResult(eigenvalues=theta[idx], residuals=res[idx],
                                 converged=res[idx] <= self.tol * scale, num_matvecs=self.num_matvecs,
                                 which=which, eigenvectors=Y, num_restarts=self.num_restarts,
                                 scale=scale, tol=self.tol, exhausted=exhausted)

        if self.which == "both":
            return LanczosBothEnds(top=end(top, "top"), bottom=end(bottom, "bottom"))
        return end(top or bottom, self.which)
