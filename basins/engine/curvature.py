"""The curvature operators of a :class:`~basins.engine.problem.Problem`: its Hessian and its
generalised Gauss–Newton matrix, as :class:`~basins.linalg.operator.Operator` subclasses.

Both go through the problem's own data loop (:meth:`Problem.chunks`, each chunk weighted by its
share of the N averaged terms), its process reduction (:meth:`Problem.reduce`) and its counters,
so a product costs and counts the same whichever analysis asks for it.

* :class:`HessianOperator`: ``V ↦ H V`` by :meth:`Problem.hvp` (the problem's HVP route).
* :class:`GGNOperator`: ``V ↦ G V``, ``G = Σ_c w_c J_cᵀ H_out,c J_c`` with ``J_c`` the Jacobian of
  chunk c's outputs and ``H_out,c`` the Hessian of its loss in the outputs (evaluated in float64
  on the outputs, as the problem's loss is). PSD for a loss convex in the outputs. One product is
  a ``jvp``, a ``jvp`` of the loss gradient and a ``vjp`` per chunk (Schraudolph 2002; Martens 2014).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.func import grad, jvp, vjp, vmap

from basins.linalg.operator import Operator

if TYPE_CHECKING:
    from basins.engine.problem import Problem

__all__ = ["HessianOperator", "GGNOperator", "curvature_operator", "CURVATURES"]

#: The curvatures an analysis may ask for by name.
CURVATURES = ("hessian", "ggn")


class HessianOperator(Operator):
    """The Hessian of ``problem``'s full-data loss at θ*: one column = one HVP (:meth:`Problem.hvp`)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(None, int(problem.num_params), problem.dtype, problem.device)
        self.problem = problem

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        return self.problem.hvp(V)


class GGNOperator(Operator):
    """The generalised Gauss–Newton matrix of ``problem`` at θ* (module docstring).

    Counted in ``problem.counters.num_ggn_products`` (one per column); summed over processes.
    """

    def __init__(self, problem: Problem) -> None:
        super().__init__(None, int(problem.num_params), problem.dtype, problem.device)
        self.problem = problem

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        p = self.problem
        single = V.dim() == 1
        W = V.to(p.device, p.dtype).reshape(p.num_params, -1)
        theta0 = p.theta0
        total = torch.zeros_like(W)
        for x, y, m, w in p.chunks():
            y64 = y.to(torch.float64) if y.is_floating_point() else y

            def f(theta: torch.Tensor, x: Any = x, m: int = m) -> torch.Tensor:
                return p.forward(p.space.unflatten(theta), x)[:m]

            def lo(o: torch.Tensor, y64: torch.Tensor = y64) -> torch.Tensor:
                return p.loss_value(o, y64)

            def col(v: torch.Tensor, f: Any = f, lo: Any = lo) -> torch.Tensor:
                out, Jv = jvp(f, (theta0,), (v,))  # type: ignore[misc]
                _, Hout = jvp(grad(lo), (out.to(torch.float64),), (Jv.to(torch.float64),))  # type: ignore[misc]
                _, pull = vjp(f, theta0)  # type: ignore[misc]
                return pull(Hout.to(out.dtype))[0]

            total = total + w * vmap(col, in_dims=1, out_dims=1)(W)
        p.counters.num_ggn_products += int(W.shape[1])
        out = p.reduce(total)
        return out[:, 0] if single else out


def curvature_operator(problem: Problem, curvature: str = "hessian") -> Operator:
    """:class:`HessianOperator` or :class:`GGNOperator` by name (one of :data:`CURVATURES`)."""
    from basins.errors import InputError

    if curvature == "hessian":
        return HessianOperator(problem)
    if curvature == "ggn":
        return GGNOperator(problem)
    raise InputError(f"unknown curvature {curvature!r}: use one of {', '.join(CURVATURES)}", param="curvature")
