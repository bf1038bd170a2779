"""A second checkpoint of the same architecture, as a flat vector in a problem's parameter order.

Used by ``basins landscape MODEL --to OTHER`` (:func:`basins.analyses.landscape.linear_path`): the
line ``(1 − t)·θa + t·θb`` is only meaningful between two points of one parameter space, so the two
models must have the same parameters (names and shapes, all of them, not only those selected with
``--params``). What the line holds fixed (buffers such as BatchNorm running statistics, and the
parameters outside the selection) is the first model's; where OTHER's values of those differ the
caller is told, since the loss at ``t = 1`` is then not OTHER's own loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from basins.errors import InputError

from .models import LoadedModel, load_model

__all__ = ["OtherCheckpoint", "load_parameters_like"]


@dataclass
class OtherCheckpoint:
    """The parameters of a second checkpoint, matched against the first model's.

    Attributes:
        theta: ``(P,)`` the selected parameters ``names``, flattened in that order (row-major
            per tensor, as :class:`basins.engine.params.ParamSpace` does), on the CPU in the
            other model's own dtype.
        model: the loaded model (its ``sha256`` and ``source`` are recorded).
        differ: names of the first model's buffers and unselected parameters whose values in
            the other checkpoint differ (the line holds the first model's values of these).
    """

    theta: torch.Tensor
    model: LoadedModel
    differ: list[str]


def load_parameters_like(
    path: str,
    first: torch.nn.Module,
    names: Sequence[str],
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    base_model: str | None = None,
) -> OtherCheckpoint:
    """Load ``path`` and return its parameters ``names`` as one flat vector (module docstring).

    Args:
        path: the other model file or directory, opened as :func:`load_model` opens one
            (``arch`` for a state dict, ``trust_pickle`` for a pickled module, ``base_model``
            for a peft adapter).
        first: the first model (e.g. ``problem.module``): every one of its parameters must
            exist in the other with the same shape, and the other may have no parameter the
            first lacks.
        names: the selected parameters, in the flat vector's order (``problem.space.names``).

    Returns:
        An :class:`OtherCheckpoint`. Cost: loading one model; no loss evaluation.

    Raises:
        InputError: as :func:`load_model`; or the two architectures differ, naming the first
            parameter missing, extra or of another shape (one line).
    """
    model = load_model(path, arch=arch, trust_pickle=trust_pickle, base_model=base_model)
    theirs = dict(model.module.named_parameters())
    ours = dict(first.named_parameters())
    same = "the two must be checkpoints of the same architecture"
    for name, p in ours.items():
        if name not in theirs:
            raise InputError(f"{path} has no parameter {name!r}, which MODEL has: {same}")
        if tuple(theirs[name].shape) != tuple(p.shape):
            raise InputError(f"{path}: parameter {name!r} has shape {tuple(theirs[name].shape)}, MODEL's has "
                             f"{tuple(p.shape)}: {same}")
    extra = [n for n in theirs if n not in ours]
    if extra:
        raise InputError(f"{path} has parameter {extra[0]!r}, which MODEL lacks"
                         f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}: {same}")
    for name in names:
        if name not in ours:
            raise InputError(f"parameter {name!r} is not one of MODEL's parameters")
    theta = torch.cat([theirs[n].detach().reshape(-1).cpu() for n in names]) if names else torch.zeros(0)
    fixed = {n: p for n, p in ours.items() if n not in set(names)}
    differ = _differing({**dict(first.named_buffers()), **fixed},
                        {**dict(model.module.named_buffers()), **theirs})
    return OtherCheckpoint(theta, model, differ)


def _differing(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> list[str]:
    """Names in ``ours`` whose tensor in ``theirs`` is missing, of another shape or of other values."""
    out = []
    for name, a in ours.items():
        b = theirs.get(name)
        if b is None or b.shape != a.shape or not torch.equal(b.detach().to(a.device, a.dtype), a.detach()):
            out.append(name)
    return out
