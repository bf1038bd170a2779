"""A flat view of a model's parameters.

Linear algebra in basins (Lanczos, probing) works on vectors of length ``P``, the number
of scalar parameters; ``torch.func`` works on ``dict[str, Tensor]``. :class:`ParamSpace`
converts between the two without copying more than needed. :func:`select_parameters` picks
which parameters are θ (``params`` globs; frozen parameters are left out by default): the
others are held fixed at their saved values, so every analysis sees the Hessian of that block.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from basins.errors import InputError

__all__ = ["ParamSpace", "Selection", "select_parameters"]


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
        self._numels: list[int] = numels
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
        # one split, not a slice per tensor: differentiated, a split's backward concatenates the
        # pieces' gradients once, where each slice's backward fills a whole (..., P) zero gradient
        pieces = torch.split(vector, self._numels, dim=-1)
        return {n: t.reshape(*lead, *s) for n, s, t in zip(self.names, self.shapes, pieces)}

    def __repr__(self) -> str:
        return f"ParamSpace(num_params={self.num_params}, tensors={len(self.names)}, dtype={self.dtype})"


@dataclass
class Selection:
    """Which of a model's parameters are θ (differentiated) and which are held fixed.

    Attributes:
        selected: names of the parameters in θ, in the model's order.
        fixed: names of parameters held at their saved values (not selected, or frozen).
        frozen: names left out because ``requires_grad=False`` (a subset of ``fixed``).
        patterns: the ``params`` globs as given (empty: every trainable parameter).
    """

    selected: list[str]
    fixed: list[str]
    frozen: list[str]
    patterns: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``"12 of 40 tensors (transformer.h.0.*)"``."""
        total = len(self.selected) + len(self.fixed)
        how = ", ".join(self.patterns) if self.patterns else "all trainable"
        frozen = f"; {len(self.frozen)} frozen (requires_grad=False) left out" if self.frozen else ""
        return f"{len(self.selected)} of {total} parameter tensors ({how}){frozen}"


def select_parameters(
    named: Sequence[tuple[str, torch.Tensor]],
    patterns: Sequence[str] | None = None,
    *,
    include_frozen: bool = False,
) -> Selection:
    """Choose θ among a model's named parameters by shell-style globs.

    Patterns are applied in order, like ``.gitignore`` lines: a plain glob adds the parameters it
    matches, a glob starting with ``!`` removes them. When the first pattern is an exclusion the
    start is every parameter, otherwise none. Globs follow :func:`fnmatch.fnmatchcase` (``*``
    matches dots too: ``transformer.h.0.*`` is the first block). Parameters with
    ``requires_grad=False`` are left out unless ``include_frozen`` (or a pattern names them).

    Args:
        named: ``module.named_parameters()`` as a list of ``(name, tensor)``.
        patterns: globs, e.g. ``["transformer.h.0.*", "!*.bias"]``; None or empty: all.
        include_frozen: keep parameters with ``requires_grad=False`` in the default selection.

    Raises:
        InputError: a pattern matches no parameter (names a few that exist), or nothing is selected.
    """
    names = [n for n, _ in named]
    frozen = [n for n, p in named if not p.requires_grad]
    pats = [p for p in (patterns or []) if p.strip()]
    if not pats:
        chosen = [n for n in names if include_frozen or n not in frozen]
        left_frozen = [] if include_frozen else frozen
    else:
        keep: set[str] = set(names) - (set() if include_frozen else set(frozen)) if pats[0].startswith("!") else set()
        for pat in pats:
            negate = pat.startswith("!")
            glob = pat[1:] if negate else pat
            hits = {n for n in names if fnmatch.fnmatchcase(n, glob)}
            if not hits:
                shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                raise InputError(f"params pattern {pat!r} matches no parameter of the model (its parameters: {shown})",
                                 param="params")
            keep = keep - hits if negate else keep | hits
        chosen = [n for n in names if n in keep]
        left_frozen = [n for n in frozen if n not in keep]
    if not chosen:
        why = "every parameter is frozen (requires_grad=False)" if not pats else f"the patterns {pats} leave none"
        hint = ("; set include_frozen=True to keep frozen parameters, and name them in params globs to select them"
                if left_frozen else "")
        raise InputError(f"no parameters selected: {why}{hint}", param="params" if pats else None)
    fixed = [n for n in names if n not in set(chosen)]
    return Selection(chosen, fixed, left_frozen, list(pats))
