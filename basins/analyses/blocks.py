"""The Hessian of each block of parameters: λ_max and trace per block (``basins hessian --per-block``).

A block ``B`` is a set of parameter tensors: the module prefixes at a depth (``depth=2`` groups
``transformer.h.0.attn.c_attn.weight`` under ``transformer.h``), or the parameters matching a
glob. Its Hessian is the principal sub-matrix ``H_BB`` of the full-data Hessian at θ*: the
Hessian of L in the block's parameters with the others held at θ* — the same operator as a
problem built with ``params=[glob]``. ``H_BB v`` is one HVP of the problem, with
``v`` zero outside the block, restricted to the block; no new problem is set up.

Per block: λ_max by Lanczos with its residual bound (an eigenvalue of ``H_BB`` lies within
``λ ± r``, Parlett Thm 4.5.1) and the trace by Hutch++ (Meyer et al. 2021) with its standard
error. Cost: per block, the Lanczos HVPs (until the top Ritz pair has a relative residual
``≤ tol``, at most ``max_hvps``) plus ``trace_hvps``; each is one full HVP of the problem.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from basins.analyses.eigen import hessian_operator, named_as
from basins.engine.problem import Problem
from basins.errors import InputError
from basins.linalg.operator import Operator
from basins.progress import Progress, ProgressCallback
from basins.record import EIGEN_UNITS, Array, Record

__all__ = ["BlockRow", "PerBlockResult", "blocks_by_depth", "blocks_by_globs", "parse_blocks", "per_block_hessian"]


@dataclass
class BlockRow:
    """One block: its name, ``P``, ``λ_max ± residual`` and ``trace ± s.e.`` (loss/θ² units), HVPs spent."""

    block: str
    num_params: int
    lambda_max: float
    residual: float
    converged: bool
    trace: float
    trace_stderr: float
    num_hvps: int


@dataclass
class PerBlockResult:
    """The per-block table, with the settings of the run."""

    rows: list[BlockRow]
    spec: str
    tol: float
    trace_hvps: int
    seed: int

    @property
    def num_hvps(self) -> int:
        return sum(r.num_hvps for r in self.rows)

    def record(self) -> Record:
        """The report group ``/hessian_blocks`` and the ``--json`` keys: one array per column."""
        attrs = {"blocks": self.spec, "block_names": [r.block for r in self.rows], "tol": self.tol,
                 "trace_method": "hutch++ (exact diagonal when P_B ≤ trace_hvps)", "trace_hvps": self.trace_hvps,
                 "seed": self.seed, "num_hvps": self.num_hvps, "num_blocks": len(self.rows)}
        arrays = {
            "block_num_params": Array([r.num_params for r in self.rows], "P of the block", None),
            "lambda_max": Array([r.lambda_max for r in self.rows], "largest eigenvalue of H_BB (Lanczos)", EIGEN_UNITS),
            "lambda_max_residual": Array([r.residual for r in self.rows], "residual norm ‖H y − λ y‖: an eigenvalue of "
                                         "H_BB lies within λ ± residual", EIGEN_UNITS),
            "lambda_max_converged": Array([r.converged for r in self.rows], "residual ≤ tol·|λ_max|", None),
            "trace": Array([r.trace for r in self.rows], "tr H_BB (Hutch++)", EIGEN_UNITS),
            "trace_stderr": Array([r.trace_stderr for r in self.rows], "standard error of the trace", EIGEN_UNITS),
            "block_num_hvps": Array([r.num_hvps for r in self.rows], "HVPs spent on the block", None),
        }
        return Record(attrs, arrays)


def _prefix(name: str, depth: int) -> str:
    parts = name.split(".")
    module = parts[:-1] or parts  # the parameter's module path (a top-level parameter is its own block)
    return ".".join(module[:depth])


def blocks_by_depth(names: Sequence[str], depth: int) -> list[tuple[str, list[str]]]:
    """Parameters grouped by their module prefix of ``depth`` dotted components, in model order.

    Raises:
        InputError: ``depth < 1``.
    """
    if depth < 1:
        raise InputError(f"per_block depth must be ≥ 1, got {depth}", param="per_block")
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(_prefix(n, depth), []).append(n)
    return list(groups.items())


def blocks_by_globs(names: Sequence[str], globs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """One block per glob (:func:`fnmatch.fnmatchcase`, ``*`` matches dots too), in the globs' order.

    Raises:
        InputError: a glob that matches no parameter of θ.
    """
    out = []
    for glob in globs:
        hit = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not hit:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise InputError(f"per_block glob {glob!r} matches no parameter of θ (e.g. {shown})", param="per_block")
        out.append((glob, hit))
    return out


def parse_blocks(names: Sequence[str], spec: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``spec``, the ``per_block`` option: one integer (a depth) or globs."""
    if len(spec) == 1 and spec[0].strip().isdigit():
        return blocks_by_depth(names, int(spec[0]))
    if not spec:
        raise InputError("per_block needs a depth or at least one glob", param="per_block")
    return blocks_by_globs(names, spec)


def block_operator(problem: Problem, names: Sequence[str]) -> Operator:
    """``H_BB`` as an :class:`Operator` of size ``P_B``: the Hessian restricted to the block
    (:meth:`~basins.linalg.operator.Operator.restrict`: full HVPs of vectors zero outside it)."""
    space = problem.space
    index = torch.cat([torch.arange(space.offsets[i], space.offsets[i + 1])
                       for i, n in enumerate(space.names) if n in set(names)])
    return hessian_operator(problem).restrict(index)


def per_block_hessian(
    problem: Problem,
    blocks: Sequence[tuple[str, Sequence[str]]],
    *,
    tol: float = 1e-4,
    max_hvps: int | None = None,
    trace_hvps: int = 100,
    seed: int = 0,
    spec: str = "",
    callback: ProgressCallback | None = None,
) -> PerBlockResult:
    """λ_max ± residual and trace ± s.e. of each block's Hessian ``H_BB`` (module docstring).

    Args:
        problem: the :class:`~basins.Problem` (its θ; blocks are subsets of ``problem.space.names``).
        blocks: ``(name, parameter names)`` pairs, e.g. from :func:`parse_blocks`.
        tol: Lanczos stops when the top Ritz pair's residual ≤ ``tol·|λ_max|``.
        max_hvps: Lanczos budget per block (default :func:`~basins.linalg.lanczos.lanczos`'s).
        trace_hvps: Hutch++ products per block (≥ 4; at most ``P_B``: a block smaller than that gets
            its exact trace from ``P_B`` products of the unit vectors).
        seed: seeds Lanczos and the trace probes, the same for every block (so a block's row equals
            that of a problem built with ``params=[block]`` and this seed).
        spec: what the blocks were given as, for the report.
        callback: :class:`~basins.progress.Progress` per block (unit ``"blocks"``).

    Returns:
        A :class:`PerBlockResult`. Cost: Σ over blocks of the Lanczos HVPs + ``trace_hvps``.
    """
    from basins.linalg.lanczos import lanczos
    from basins.linalg.trace import hutchpp

    if trace_hvps < 4:
        raise InputError(f"trace_hvps must be ≥ 4 for hutch++, got {trace_hvps}", param="trace_hvps")
    rows = []
    for i, (name, names) in enumerate(blocks):
        op = block_operator(problem, names)
        before = problem.counters.num_hvps
        with named_as(max_matvecs="max_hvps"):
            res = lanczos(op, k=1, which="top", tol=tol, max_matvecs=max_hvps, dtype=problem.dtype,
                          device=problem.device, seed=seed)
        lam, r = float(res.eigenvalues[0]), float(res.residuals[0])
        if op.num_params <= trace_hvps:  # cheaper and exact: the diagonal of H_BB from P_B unit vectors
            eye = torch.eye(op.num_params, dtype=problem.dtype, device=problem.device)
            tr, se = float(torch.diagonal(op.matvec(eye)).sum()), 0.0
        else:
            est = hutchpp(op, num_matvecs=trace_hvps, dtype=problem.dtype, device=problem.device, seed=seed)
            tr, se = float(est.estimate), float(est.stderr)
        rows.append(BlockRow(name, op.num_params, lam, r, bool(r <= tol * max(abs(lam), 1e-300)), tr, se,
                             problem.counters.num_hvps - before))
        if callback is not None:
            callback(Progress("blocks", i + 1, len(blocks), "blocks", info=name))
    return PerBlockResult(rows, spec, tol, trace_hvps, seed)
