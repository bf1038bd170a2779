"""A flat view of a model's parameters.

Linear algebra in basins (Lanczos, probing) works on vectors of length ``P``, the number
of scalar parameters; ``torch.func`` works on ``dict[str, Tensor]``. :class:`ParamSpace`
converts between the two without copying more than needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["ParamSpace"]


class ParamSpace:
    """Names, shapes and offsets of a parameter dict, and conversions to and from flat vectors.

    Args:
        params: the parameters, ``{name: tensor}``; all must share one dtype and device.

    Attributes:
        names: parameter names, in the dict's order.
        shapes: shape of each parameter.
        offsets: start of each parameter in the flat vector; ``offsets[-1] == num_params``.
        num_params: ``P``, the total number of scalars.
    """

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.names: list[str] = list(params)
        self.shapes: list[torch.Size] = [params[n].shape for n in self.names]
        numels = [math.prod(s) for s in self.shapes]
        self.offsets: list[int] = [0]
        for k in numels:
            self.offsets.append(self.offsets[-1] + k)
        self.num_params: int = self.offsets[-1]
        first = next(iter(params.values()))
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``{name: tensor}`` into one vector of shape ``(P,)``.

        Leading batch dimensions are kept: tensors of shape ``(K, *shape)`` give ``(K, P)``.
        """
        first = tensors[self.names[0]]
        lead = first.shape[: first.dim() - len(self.shapes[0])]
        return torch.cat([tensors[n].reshape(*lead, -1) for n in self.names], dim=-1)

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a vector ``(..., P)`` into ``{name: (..., *shape)}`` views (no copy)."""
        if vector.shape[-1] != self.num_params:
            raise ValueError(f"expected a vector of length {self.num_params}, got shape {tuple(vector.shape)}")
        lead = vector.shape[:-1]
        return {
            n: vector[..., a:b].reshape(*lead, *s)
            for n, s, a, b in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])
        }

    def __repr__(self) -> str:
        return f"ParamSpace(num_params={self.num_params}, tensors={len(self.names)}, dtype={self.dtype})"
