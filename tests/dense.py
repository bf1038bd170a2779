"""Dense float64 references for the linear-algebra tests: matrices with a prescribed spectrum.

``symmetric_with_spectrum(eigs, seed)`` returns ``H = Q diag(eigs) Q^T`` (exactly symmetric) with
``Q`` Haar-random for ``P <= 600`` and, above that, a product of random Householder
reflections (cost ``O(P^2)`` instead of a ``P x P`` QR; Krylov methods with a Gaussian start do
not see the difference). ``CountingMatvec`` wraps a matrix as a block matvec and counts calls.
"""

from __future__ import annotations

import torch

__all__ = ["random_orthogonal", "symmetric_with_spectrum", "CountingMatvec", "top", "bottom", "loss_hessian"]

F64 = torch.float64


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-distributed ``(n, n)`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def symmetric_with_spectrum(eigenvalues: torch.Tensor | list[float], seed: int = 0) -> torch.Tensor:
    """A random symmetric float64 matrix whose eigenvalues are exactly ``eigenvalues``."""
    lam = torch.as_tensor(eigenvalues, dtype=F64)
    n = lam.numel()
    if n <= 600:
        q = random_orthogonal(n, seed)
        h = (q * lam) @ q.T
    else:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g)
        h = torch.diag(lam[perm])
        for _ in range(4):  # H <- (I - 2uu^T) H (I - 2uu^T)
            u = torch.randn(n, 1, generator=g, dtype=F64)
            u /= u.norm()
            hu = h @ u
            h = h - 2 * hu @ u.T - 2 * u @ hu.T + 4 * float(u.T @ hu) * (u @ u.T)
    return (h + h.T) / 2


def top(eigenvalues: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest values, descending."""
    return torch.sort(eigenvalues, descending=True).values[:k]


def bottom(eigenvalues: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest values, ascending."""
    return torch.sort(eigenvalues).values[:k]


class CountingMatvec:
    """``V -> H @ V`` for blocks ``V`` of shape ``(P, b)``; counts calls and vectors."""

    def __init__(self, h: torch.Tensor) -> None:
        self.h = h
        self.calls = 0
        self.vectors = 0
        self.widths: list[int] = []

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        assert v.dim() == 2 and v.shape[0] == self.h.shape[0], tuple(v.shape)
        self.calls += 1
        self.vectors += v.shape[1]
        self.widths.append(v.shape[1])
        return self.h.to(v.dtype) @ v


def loss_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:  # noqa: ANN001
    """The dense Hessian of ``loss_fn(model(x), y)`` in the model's parameters (named-parameter
    order, flattened), by ``torch.func.hessian`` of the explicit full-data loss; symmetrised."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def full_loss(th: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            k = shape.numel()
            params[name] = th[i : i + k].reshape(shape)
            i += k
        return loss_fn(functional_call(model, params, (x,)), y)

    H = torch.func.hessian(full_loss)(theta)
    return (H + H.T) / 2
