"""Built-in losses, written so that every HVP route works.

Each loss maps a chunk's ``outputs`` and ``targets`` to the **mean** over the chunk's
averaged terms (PyTorch's ``reduction="mean"``), so that the full-data loss is the
size-weighted sum of chunk losses. They are written with elementary ops because
``torch.func.jvp(grad(...))`` fails on ``F.mse_loss(reduction="mean")`` in torch 2.13
("ZeroTensors are immutable", measured with torch 2.13 on CPU).

==================  ===========================  ====================================
name                outputs / targets            averaged terms N (n examples)
==================  ===========================  ====================================
``mse``             same shape, float            n·k (all output entries)
``cross-entropy``   logits (n, C, ...) / class   n·(spatial size)
                    indices (n, ...), integer,
                    or probabilities (n, C, ...)
``nll``             log-probs / indices          as cross-entropy
``bce``             logits / targets in [0, 1]   n·k; binary cross-entropy **on logits**
==================  ===========================  ====================================

A user loss ``module:function`` must follow the same contract: ``function(outputs,
targets) -> scalar mean over the batch``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from basins.errors import InputError

__all__ = [
    "LossFn", "NamedLoss", "BUILTIN_LOSSES", "infer_loss_name", "get_loss", "loss_name", "check_targets",
    "check_loss_on_chunk", "num_terms_per_example",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NamedLoss:
    """A user's loss callable with the name reports record (e.g. the ``module:function`` it came from).

    The engine takes a loss by built-in name or as a callable; resolving ``module:function``
    specs is the loaders' job (:func:`basins.files.loading.load_loss`).
    """

    def __init__(self, fn: LossFn, name: str) -> None:
        self.fn = fn
        self.name = name
        self.__name__ = name

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.fn(outputs, targets)

    def __repr__(self) -> str:
        return f"NamedLoss({self.name!r})"


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every output entry, ``mean((o - t)²)``."""
    return ((outputs - targets) ** 2).mean()


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of logits ``(n, C, ...)``.

    Targets are class indices ``(n, ...)`` (integer) or class probabilities of the
    outputs' shape (floating; "soft labels", as ``F.cross_entropy`` accepts).
    """
    if targets.is_floating_point():
        return -(targets * torch.log_softmax(outputs, dim=1)).sum(1).mean()
    picked = outputs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return (torch.logsumexp(outputs, dim=1) - picked).mean()


def nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of log-probabilities ``(n, C, ...)`` at integer targets
    (or of class-probability targets of the outputs' shape)."""
    if targets.is_floating_point():
        return -(targets * outputs).sum(1).mean()
    return -outputs.gather(1, targets.unsqueeze(1)).squeeze(1).mean()


def bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits, numerically stable, mean over all entries."""
    return (F.softplus(outputs) - outputs * targets).mean()


BUILTIN_LOSSES: dict[str, LossFn] = {
    "mse": mse,
    "cross-entropy": cross_entropy,
    "nll": nll,
    "bce": bce,
}


def infer_loss_name(targets: torch.Tensor) -> str:
    """The default loss for these targets: integer → ``cross-entropy``, floating → ``mse``."""
    if targets.is_floating_point():
        return "mse"
    if targets.dtype == torch.bool:
        return "bce"
    return "cross-entropy"


def get_loss(loss: str | LossFn) -> LossFn:
    """A built-in loss by name, or a callable passed through.

    Raises:
        InputError: ``loss`` is neither a built-in name nor callable (``module:function``
            specs are resolved by :func:`basins.files.loading.load_loss`, not here).
    """
    if callable(loss):
        return loss
    if loss in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[loss]
    hint = " (resolve module:function specs with basins.files.loading.load_loss)" if ":" in str(loss) else ""
    raise InputError(f"unknown loss {loss!r}: use one of {', '.join(BUILTIN_LOSSES)} or a callable{hint}")


def loss_name(loss: str | LossFn) -> str:
    """The name a report records for ``loss``: the built-in name, or a callable's ``__name__``."""
    return loss if isinstance(loss, str) else str(getattr(loss, "__name__", "custom"))


def check_targets(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Check that ``targets`` fit loss ``name`` for a model giving ``outputs``.

    Returns the targets, reshaped where unambiguous (``(n,)`` targets for ``(n, 1)``
    outputs under ``mse``/``bce``). Raises :class:`InputError` naming the mismatch.
    """
    if name in ("cross-entropy", "nll"):
        if targets.is_floating_point() and targets.shape == outputs.shape and outputs.dim() >= 2:
            total = targets.sum(1)
            if float(targets.min()) < 0 or not torch.allclose(total, torch.ones_like(total), atol=1e-4):
                raise InputError(
                    f"loss {name!r} with floating targets of the outputs' shape needs class probabilities "
                    "(non-negative, summing to 1 over dimension 1)"
                )
            return targets
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise InputError(
                f"loss {name!r} needs integer class indices as targets (or class probabilities of the outputs' "
                f"shape {tuple(outputs.shape)}), but the targets are {targets.dtype} of shape {tuple(targets.shape)}; "
                "use --loss mse for real-valued targets, or convert class indices with .long()"
            )
        if outputs.dim() < 2 or tuple(outputs.shape[2:]) != tuple(targets.shape[1:]):
            raise InputError(
                f"loss {name!r} needs outputs (n, C, ...) and targets (n, ...); got outputs "
                f"{tuple(outputs.shape)} and targets {tuple(targets.shape)}"
            )
        num_classes = outputs.shape[1]
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= num_classes:
            raise InputError(
                f"targets hold class indices in [{lo}, {hi}] but the model has {num_classes} outputs per example"
            )
        return targets.long()  # uint8/int32 labels as the int64 indices gather() needs
    if name in ("mse", "bce"):
        if not targets.is_floating_point():
            targets = targets.to(outputs.dtype)
        if targets.shape != outputs.shape:
            if targets.dim() == 1 and outputs.shape == (*targets.shape, 1):
                return targets.unsqueeze(1)
            raise InputError(
                f"loss {name!r} needs targets of the outputs' shape; got outputs {tuple(outputs.shape)} "
                f"and targets {tuple(targets.shape)} (per example: {tuple(outputs.shape[1:])} vs {tuple(targets.shape[1:])})"
            )
        if name == "bce" and (float(targets.min()) < 0 or float(targets.max()) > 1):
            raise InputError("loss 'bce' needs targets in [0, 1]")
        return targets
    return targets


def check_loss_on_chunk(loss: LossFn, name: str, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Evaluate ``loss`` once, eagerly, on the first chunk's outputs and (fitted) targets, and check it.

    This is the one check every loss passes before any transformed (``grad``/``jvp``/``vmap``)
    code sees it, so a misbehaving user loss is bad input (:class:`InputError`, exit 2) with
    the function named, not an internal error later. Checked:

    * the value is a 0-dim floating tensor (the mean over the chunk's averaged terms), finite
      when the outputs are;
    * for ``nll``, that the outputs are log-probabilities: ``logsumexp`` over the class
      dimension 1 is 0 within ``max(1e-6, 1000·eps)`` for every example, else the outputs are
      logits and ``cross-entropy`` is meant.

    Raises:
        InputError: the loss raised (its message kept; the original is chained for ``--debug``),
            returned something else than a finite scalar tensor, or ``nll`` got logits.
    """
    if name == "nll" and outputs.is_floating_point() and outputs.dim() >= 2:
        with torch.no_grad():
            lse = torch.logsumexp(outputs.detach(), dim=1)
        tol = max(1e-6, 1000 * torch.finfo(outputs.dtype).eps)
        worst = float(lse.abs().max()) if lse.numel() else 0.0
        if not worst <= tol:
            raise InputError(
                f"loss 'nll' needs log-probabilities (log_softmax outputs, logsumexp 0 over dimension 1), "
                f"but the model's outputs have |logsumexp| up to {worst:.3g}: they look like logits; "
                "use loss 'cross-entropy' (--loss cross-entropy), which applies log_softmax itself"
            )
    try:
        with torch.no_grad():
            value = loss(outputs.detach(), targets)
    except InputError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise InputError(f"loss {name!r} raised {type(err).__name__}: {first}") from err
    if not isinstance(value, torch.Tensor):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InputError(
            f"loss {name!r} returned {type(value).__name__} {shown}, not a tensor: return a 0-dim torch "
            "tensor computed from the outputs (the mean over the batch), so it can be differentiated"
        )
    if value.dim() != 0 or not value.is_floating_point():
        raise InputError(
            f"loss {name!r} returned a {value.dtype} tensor of shape {tuple(value.shape)}, not a floating "
            "scalar: reduce it to the mean over the batch's averaged terms (e.g. .mean())"
        )
    if not bool(torch.isfinite(value)) and bool(torch.isfinite(outputs).all()):  # non-finite outputs: a ComputeError later
        raise InputError(
            f"loss {name!r} is {float(value)} on the first chunk at the saved parameters: check the loss "
            "and that the outputs and targets are what it expects"
        )


def num_terms_per_example(name: str, outputs: torch.Tensor) -> int:
    """How many averaged terms one example contributes (``k`` for mse/bce, spatial size for CE)."""
    per_example = outputs[0]
    if name in ("cross-entropy", "nll"):
        return max(1, per_example[0].numel())
    return per_example.numel()
