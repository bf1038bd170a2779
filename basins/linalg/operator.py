"""The one operator type of :mod:`basins.linalg`: a symmetric linear map seen only through products.

Every solver here (:func:`~basins.linalg.lanczos.lanczos`, :func:`~basins.linalg.slq.slq`,
:func:`~basins.linalg.trace.hutchinson`, :func:`~basins.linalg.trace.hutchpp`) takes an
:class:`Operator` or a dense symmetric ``(P, P)`` tensor (wrapped by :func:`as_operator`). For a
Hessian the matvec is one pass of Hessian-vector products over the data, so one column of a block
counts one HVP. :meth:`Operator.apply` is the one checked product (shape and finiteness), and
:meth:`Operator.materialise` the one place a dense matrix is assembled from products.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from basins.errors import ComputeError, InputError
from basins.progress import Progress, ProgressCallback

__all__ = ["Operator", "SumOperator", "ScaledOperator", "RestrictedOperator", "as_operator"]

Matvec = Callable[[torch.Tensor], torch.Tensor]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Operator:
    """A symmetric ``H`` of size ``P × P`` given by products.

    Either pass ``matvec`` or subclass and implement only :meth:`_matvec` (curvlinops' model):
    sums (``A + B``), scalings (``c * A``, ``A * c``, ``-A``, ``A - B``) and restrictions to a
    subset of coordinates (:meth:`restrict`) are operators again, so analyses compose
    operators instead of hand-building closures.

    Attributes:
        num_params: ``P``.
        dtype: the dtype ``H`` is computed in (the default precision of vectors and of
            :meth:`materialise`).
        device: where :meth:`_matvec` wants its inputs.

    Args:
        matvec: maps a block ``V`` of shape ``(P, b)`` (or a vector ``(P,)``) to ``H @ V`` of
            the same shape; must not modify ``V``. It may return another float dtype or device
            (the checked :meth:`apply` converts back to those of ``V``). None in a subclass
            that implements :meth:`_matvec`.

    Raises:
        InputError: ``matvec`` is not callable (and :meth:`_matvec` not implemented),
            ``num_params`` is not a positive integer, or ``dtype`` is not a floating dtype.
    """

    def __init__(self, matvec: Matvec | None, num_params: int, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu") -> None:
        own = type(self)._matvec is not Operator._matvec
        if not own and not callable(matvec):
            raise InputError(f"matvec must be callable, got {type(matvec).__name__}", param="matvec")
        if not _is_int(num_params) or num_params < 1:
            raise InputError(f"num_params={num_params!r} must be a positive integer", param="num_params")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InputError(f"dtype={dtype!r} must be a floating torch dtype", param="dtype")
        self._fn = matvec
        self.num_params = int(num_params)
        self.dtype = dtype
        self.device = torch.device(device)

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` for ``V`` of shape ``(P,)`` or ``(P, b)``: what a subclass implements."""
        assert self._fn is not None
        return self._fn(V)

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """``H @ V`` unchecked (see :meth:`apply` for the checked product). Cost: ``b`` products."""
        return self._matvec(V)

    __matmul__ = matvec

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self.num_params}, dtype={self.dtype}, device={self.device})"

    def __add__(self, other: Operator) -> Operator:
        if not isinstance(other, Operator):
            return NotImplemented
        return SumOperator(self, other)

    def __sub__(self, other: Operator) -> Operator:
        if not isinstance(other, Operator):
            return NotImplemented
        return SumOperator(self, ScaledOperator(other, -1.0))

    def __mul__(self, scale: float) -> Operator:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        return ScaledOperator(self, float(scale))

    __rmul__ = __mul__

    def __neg__(self) -> Operator:
        return ScaledOperator(self, -1.0)

    def restrict(self, index: torch.Tensor | list[int]) -> Operator:
        """The principal sub-block ``H[index][:, index]`` (size ``len(index)``): products with
        vectors zero outside ``index``, read on ``index``. Cost: one product of this operator
        per product of the restriction.

        Raises:
            InputError: ``index`` empty, repeated, or out of ``[0, P)``.
        """
        return RestrictedOperator(self, index)

    @staticmethod
    def dense(matrix: torch.Tensor) -> Operator:
        """The operator ``V ↦ matrix @ V`` of a dense symmetric ``(P, P)`` float tensor.

        Symmetry is the caller's promise (not checked: a check costs as much as a product).

        Raises:
            InputError: ``matrix`` is not a square floating 2-D tensor.
        """
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            raise InputError(f"matrix must be a square (P, P) tensor (a dense operator), got {shape}", param="matrix")
        if not matrix.dtype.is_floating_point:
            raise InputError(f"matrix must be a floating tensor (a dense operator), got {matrix.dtype}", param="matrix")
        M = matrix.detach()
        return Operator(lambda V: M @ V.to(M.dtype), int(M.shape[0]), M.dtype, M.device)

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
                             "it must map a (P, b) block to H @ V of the same shape", param="matvec")
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
            raise InputError(f"block={block!r} must be a positive integer", param="block")
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


class SumOperator(Operator):
    """``A + B`` of two operators of the same size (computed in the wider of their dtypes, on ``A``'s device)."""

    def __init__(self, a: Operator, b: Operator) -> None:
        if a.num_params != b.num_params:
            raise InputError(f"cannot add operators of sizes {a.num_params} and {b.num_params}")
        super().__init__(None, a.num_params, torch.promote_types(a.dtype, b.dtype), a.device)
        self.parts = (a, b)

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        a, b = self.parts
        return a.matvec(V).to(V.dtype) + b.matvec(V.to(b.device)).to(V.device, V.dtype)


class ScaledOperator(Operator):
    """``c · A`` for a finite real ``c``."""

    def __init__(self, a: Operator, scale: float) -> None:
        if not math.isfinite(scale):
            raise InputError(f"scale={scale!r} must be a finite number", param="scale")
        super().__init__(None, a.num_params, a.dtype, a.device)
        self.inner, self.scale = a, float(scale)

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        return self.inner.matvec(V) * self.scale


class RestrictedOperator(Operator):
    """The principal sub-block ``A[index][:, index]`` (:meth:`Operator.restrict`)."""

    def __init__(self, a: Operator, index: torch.Tensor | list[int]) -> None:
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= a.num_params:
            raise InputError(f"index must hold positions in [0, {a.num_params}), got {idx.numel()} of them "
                             f"{'' if idx.numel() == 0 else f'in [{int(idx.min())}, {int(idx.max())}]'}", param="index")
        if int(torch.unique(idx).numel()) != idx.numel():
            raise InputError("index must not repeat a position", param="index")
        super().__init__(None, int(idx.numel()), a.dtype, a.device)
        self.inner, self.index = a, idx.to(a.device)

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        single = V.dim() == 1
        Vb = V.reshape(V.shape[0], -1)
        full = torch.zeros(self.inner.num_params, Vb.shape[1], dtype=V.dtype, device=self.inner.device)
        full[self.index] = Vb.to(self.inner.device)
        out = self.inner.matvec(full)[self.index]
        return out[:, 0] if single else out


def as_operator(operator: Operator | torch.Tensor) -> Operator:
    """``operator`` itself, or :meth:`Operator.dense` of a dense symmetric tensor.

    Raises:
        InputError: neither an :class:`Operator` nor a square floating tensor.
    """
    if isinstance(operator, Operator):
        return operator
    if isinstance(operator, torch.Tensor):
        return Operator.dense(operator)
    raise InputError(f"operator must be an Operator or a dense (P, P) tensor, got {type(operator).__name__}; "
                     "wrap a matvec as Operator(matvec, num_params)", param="operator")
