"""Rays from θ*: random directions, each regenerated from its own seed, and where the loss crosses ε along them.

A direction is a unit vector ``u`` of length ``P``. Pair ``j`` of a family is drawn from its own
generator, ``torch.Generator().manual_seed(ray_seed(seed, family, j))``, in float64 on the CPU,
so any single ray can be regenerated without storing P-vectors, and the rays of one family do
not change when other families are asked for. Rays come in **antithetic pairs** ``±u``: pair
``j`` gives rays ``2j`` (``+u``) and ``2j + 1`` (``−u``), which measure the basin's asymmetry
for free and are resampled together by the bootstrap.

Families (the subspace the directions fill):

* ``isotropic``: ``u = g / ‖g‖``, ``g ~ N(0, I_P)``: uniform on the unit sphere of ℝᴾ.
* ``top``: ``u = V c / ‖c‖``, ``c ~ N(0, I_k)``, ``V`` (P, k) orthonormal top Hessian
  eigenvectors: uniform on the unit sphere of their span (the steep walls).
* ``floor``: ``u = (I − V Vᵀ) g / ‖·‖``: uniform on the sphere of the orthogonal complement
  (the floor of the basin, once the top-k directions are deflated).

Normalisations: ``isotropic`` (plain unit vectors) or ``filter`` (Li et al. 2018, "Visualizing
the loss landscape of neural nets"): each filter of the Gaussian draw (a row, i.e. a slice
along dim 0, of every parameter tensor with ≥ 2 dims; each 1-D tensor such as a bias as one
filter) is rescaled to the norm of the same filter of θ*, then the whole vector to unit norm.
Known limitation: filter-normalised directions are not uniform on the sphere, so a volume
computed from them is not the basin's volume (:mod:`basins.analyses.volume.probe` reports none for them).

Radii along these rays: :mod:`basins.analyses.volume.radii`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from basins.errors import ComputeError, InputError

__all__ = [
    "FAMILIES",
    "NORMALISATIONS",
    "DirectionSampler",
    "ray_seed",
    "filter_groups",
    "orthonormal_basis",
]

FAMILIES = ("isotropic", "top", "floor")
NORMALISATIONS = ("isotropic", "filter")

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def ray_seed(seed: int, family: str, index: int) -> int:
    """The seed of pair ``index`` of ``family`` under the run's ``seed``: a 63-bit integer.

    A SplitMix64 hash of ``(seed, crc32(family), index)``: stable across processes and
    platforms (unlike Python's ``hash``), distinct for neighbouring indices.
    """
    h = _splitmix64((int(seed) & _MASK64) ^ 0x5BD1E995)
    h = _splitmix64(h ^ zlib.crc32(family.encode()))
    h = _splitmix64(h ^ (int(index) & _MASK64))
    return h & ((1 << 63) - 1)


def filter_groups(shapes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slices of the flat vector, one per filter (Li et al. 2018).

    Args:
        shapes: the parameter tensors' shapes, in flat order (``ParamSpace.shapes``).

    Returns:
        One slice per row (slice along dim 0) of each tensor with ≥ 2 dims, and one per
        tensor with ≤ 1 dim.
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= int(s)
        if len(shape) >= 2 and shape[0] > 0:
            row = numel // int(shape[0])
            groups.extend((start + i * row, start + (i + 1) * row) for i in range(int(shape[0])))
        elif numel:
            groups.append((start, start + numel))
        start += numel
    return groups


def orthonormal_basis(vectors: torch.Tensor) -> torch.Tensor:
    """An orthonormal float64 basis ``(P, k)`` of the span of ``vectors`` (P, k), by QR.

    Raises:
        InputError: the vectors are not of full column rank.
    """
    V = vectors.detach().to("cpu", torch.float64)
    if V.dim() != 2 or V.shape[1] == 0:
        raise InputError(f"a basis must be a (P, k) matrix with k ≥ 1, got shape {tuple(V.shape)}")
    Q, R = torch.linalg.qr(V)
    diag = R.diagonal().abs()
    if bool((diag <= 1e-10 * diag.max()).any()):
        raise InputError("the basis vectors are linearly dependent")
    return Q


@dataclass
class DirectionSampler:
    """Draws the directions of one family, pair by pair, from per-pair seeds.

    Args:
        num_params: ``P``.
        family: one of :data:`FAMILIES`.
        normalisation: one of :data:`NORMALISATIONS`.
        basis: ``(P, k)`` orthonormal float64 basis (top eigenvectors); needed by ``top`` and
            ``floor``.
        theta0: ``(P,)`` θ*, needed by ``filter``.
        groups: filter slices (:func:`filter_groups`), needed by ``filter``; default one
            group (the whole vector).
        seed: the run's seed.
    """

    num_params: int
    family: str = "isotropic"
    normalisation: str = "isotropic"
    basis: torch.Tensor | None = None
    theta0: torch.Tensor | None = None
    groups: Sequence[tuple[int, int]] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InputError(f"unknown ray family {self.family!r} in families: use one of {', '.join(FAMILIES)}",
                             param="families")
        if self.normalisation not in NORMALISATIONS:
            raise InputError(
                f"unknown normalisation {self.normalisation!r}: use one of {', '.join(NORMALISATIONS)}",
                param="normalisation"
            )
        if self.family != "isotropic":
            if self.basis is None:
                raise InputError(f"ray family {self.family!r} needs the top Hessian eigenvectors (basis)",
                                 param="basis")
            self.basis = orthonormal_basis(self.basis)
            if self.basis.shape[0] != self.num_params:
                raise InputError(f"basis has {self.basis.shape[0]} rows, expected P = {self.num_params}", param="basis")
            if self.family == "floor" and self.basis.shape[1] >= self.num_params:
                raise InputError("the floor family needs fewer eigenvectors than parameters")
        if self.normalisation == "filter":
            if self.theta0 is None:
                raise InputError("filter-normalised directions need θ*")
            self._theta = self.theta0.detach().to("cpu", torch.float64).reshape(-1)
            self._groups = list(self.groups) if self.groups is not None else [(0, self.num_params)]

    @property
    def dimension(self) -> int:
        """Dimension of the subspace the directions fill (``P``, ``k`` or ``P − k``)."""
        if self.family == "isotropic":
            return self.num_params
        assert self.basis is not None
        k = int(self.basis.shape[1])
        return k if self.family == "top" else self.num_params - k

    @property
    def is_uniform(self) -> bool:
        """Whether the directions are uniform on the unit sphere of their subspace (volumes valid)."""
        return self.normalisation == "isotropic"

    def pair_seed(self, index: int) -> int:
        """Seed of pair ``index`` (see :func:`ray_seed`)."""
        return ray_seed(self.seed, self.family, index)

    def direction(self, index: int) -> torch.Tensor:
        """The unit direction ``+u`` of pair ``index``: ``(P,)`` float64 on the CPU."""
        gen = torch.Generator().manual_seed(self.pair_seed(index))
        if self.family == "top":
            assert self.basis is not None
            c = torch.randn(self.basis.shape[1], generator=gen, dtype=torch.float64)
            v = self.basis @ c
        else:
            v = torch.randn(self.num_params, generator=gen, dtype=torch.float64)
            if self.family == "floor":
                assert self.basis is not None
                v = v - self.basis @ (self.basis.T @ v)
        if self.normalisation == "filter":
            v = self._filter_normalise(v)
        norm = float(v.norm())
        if not norm > 0:
            raise ComputeError(f"direction {index} has zero norm (θ* is zero on every filter it touches?)")
        return v / norm

    def _filter_normalise(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for a, b in self._groups:
            gn = float(v[a:b].norm())
            if gn > 0:
                out[a:b] = v[a:b] * (float(self._theta[a:b].norm()) / gn)
        return out

    def pairs(
        self, indices: Sequence[int], *, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """The ``+u`` directions of the given pairs as rows: ``(len(indices), P)`` in ``dtype`` on ``device``."""
        if not indices:
            return torch.zeros(0, self.num_params, dtype=dtype, device=device)
        return torch.stack([self.direction(i) for i in indices]).to(device=device, dtype=dtype)



# ---------------------------------------------------------------------- radius search
