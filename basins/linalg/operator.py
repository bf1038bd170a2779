"""The one operator type of :mod:`basins.linalg`: a symmetric linear map seen only through products.

Every solver here (:func:`~basins.linalg.lanczos.lanczos`, :func:`~basins.linalg.slq.slq`,
:func:`~basins.linalg.trace.hutchinson`, :func:`~basins.linalg.trace.hutchpp`) takes an
:class:`Operator` or a dense symmetric ``(P, P)`` tensor (wrapped by :func:`as_operator`). For a
Hessian the matvec is one pass of Hessian-vector products over the data, so one column of a block
counts one HVP. :meth:`Operator.apply` is the one checked product (shape and finiteness), and
:meth:`Operator.materialise` the one place a dense matrix is assembled from products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from basins.errors import ComputeError, InputError
from basins.progress import Progress, ProgressCallback

__all__ = ["Operator", "as_operator"]

Matvec = Callable[[torch.Tensor], torch.Tensor]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Operator:
    """A symmetric ``H`` of size ``P × P`` given by products.

    Attributes:
        matvec: maps a block ``V`` of shape ``(P, b)`` (or a vector ``(P,)``) to ``H @ V`` of
            the same shape; must not modify ``V``. It may return another float dtype or device
            (the checked :meth:`apply` converts back to those of ``V``).
        num_params: ``P``.
        dtype: the dtype ``H`` is computed in (the default precision of vectors and of
            :meth:`materialise`).
        device: where ``matvec`` wants its inputs.

    Raises:
        InputError: ``matvec`` is not callable, ``num_params`` is not a positive integer, or
            ``dtype`` is not a floating dtype.
    """

    matvec: Matvec
    num_params: int
    dtype: torch.dtype = torch.float64
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if not callable(self.matvec):
            raise InputError(f"matvec must be callable, got {type(self.matvec).__name__}")
        if not _is_int(self.num_params) or self.num_params < 1:
            raise InputError(f"num_params={self.num_params!r} must be a positive integer")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise InputError(f"dtype={self.dtype!r} must be a floating torch dtype")
        object.__setattr__(self, "device", torch.device(self.device))

    @classmethod
    def dense(cls, matrix: torch.Tensor) -> Operator:
        """The operator ``V ↦ matrix @ V`` of a dense symmetric ``(P, P)`` float tensor.

        Symmetry is the caller's promise (not checked: a check costs as much as a product).

        Raises:
            InputError: ``matrix`` is not a square floating 2-D tensor.
        """
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            raise InputError(f"a dense operator must be a square (P, P) tensor, got {shape}")
        if not matrix.dtype.is_floating_point:
            raise InputError(f"a dense operator must be a floating tensor, got {matrix.dtype}")
        M = matrix.detach()
        return cls(lambda V: M @ V.to(M.dtype), int(M.shape[0]), M.dtype, M.device)

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V``, checked, detached, in the dtype and on the device of ``V``.

        Args:
            V: ``(P,)`` or ``(P, b)``. Cost: ``b`` products (1 for a vector).

        Raises:
            InputError: ``matvec`` returned something other than a tensor of ``V``'s shape.
            ComputeError: ``matvec`` returned non-finite values.
        """
        W = self.matvec(V)
        if not isinstance(W, torch.Tensor) or tuple(W.shape) != tuple(V.shape):
            shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
            raise InputError(f"matvec returned {shape} for an input of shape {tuple(V.shape)}; "
                             "it must map a (P, b) block to H @ V of the same shape")
        W = W.detach().to(device=V.device, dtype=V.dtype)
        if not bool(torch.isfinite(W).all()):
            raise ComputeError(f"matvec returned non-finite values for an input of shape {tuple(V.shape)}; "
                               "check that the loss and model are finite here")
        return W

    def materialise(self, *, dtype: torch.dtype | None = None, block: int = 64, symmetrise: bool = True,
                    callback: ProgressCallback | None = None) -> torch.Tensor:
        """The dense ``(P, P)`` matrix from products with blocks of unit vectors.

        Args:
            dtype: dtype of the unit vectors and of the result (default :attr:`dtype`).
            block: unit vectors per product, ``≥ 1`` (memory: ``P × block`` extra elements).
            symmetrise: return ``(H + Hᵀ)/2`` (the assembled matrix is symmetric only up to
                rounding); False returns the columns as computed.
            callback: :class:`~basins.progress.Progress` (phase ``"materialise"``, unit
                ``"matvecs"``) after every block.

        Returns:
            ``(P, P)`` tensor of ``dtype`` on :attr:`device`. Cost: ``P`` products; memory
            ``P²`` elements.

        Raises:
            InputError: a bad ``block``, or a ``matvec`` of the wrong output shape.
            ComputeError: non-finite products.
        """
        if not _is_int(block) or block < 1:
            raise InputError(f"block={block!r} must be a positive integer")
        P, dt = self.num_params, dtype or self.dtype
        H = torch.empty(P, P, dtype=dt, device=self.device)
        for s in range(0, P, block):
            e = min(s + block, P)
            E = torch.zeros(P, e - s, dtype=dt, device=self.device)
            E[torch.arange(s, e), torch.arange(e - s)] = 1
            H[:, s:e] = self.apply(E)
            if callback is not None:
                callback(Progress("materialise", e, P, "matvecs"))
        return (H + H.T) / 2 if symmetrise else H


def as_operator(operator: Operator | torch.Tensor) -> Operator:
    """``operator`` itself, or :meth:`Operator.dense` of a dense symmetric tensor.

    Raises:
        InputError: neither an :class:`Operator` nor a square floating tensor.
    """
    if isinstance(operator, Operator):
        return operator
    if isinstance(operator, torch.Tensor):
        return Operator.dense(operator)
    raise InputError(f"expected an Operator or a dense (P, P) tensor, got {type(operator).__name__}; "
                     "wrap a matvec as Operator(matvec, num_params)")
