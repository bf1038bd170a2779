"""Model inputs that are one tensor or a dict of named tensors, and model outputs of any container.

A batch of inputs is either a tensor ``(n, ...)`` (the model is called as ``model(x)``) or a
dict of named tensors that share their first dimension ``n`` (the model is called as
``model(**x)``), as Hugging Face models take ``input_ids (n, T)``, ``attention_mask (n, T)``,
``token_type_ids (n, T)`` or ``pixel_values (n, C, H, W)``. The helpers here slice, join,
move, pad, hash and describe both kinds the same way, so that the data sources, the chunk
loop and the fingerprints need not care which one they hold.

:func:`pick_output` takes the tensor an analysis differentiates from what a model returns: a
tensor as it is; from a ``ModelOutput`` or dict its ``logits``, else its only tensor; from a
tuple or list its first element; or the field named by ``output``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from basins.errors import InputError

__all__ = [
    "Inputs", "NAMED_INPUTS", "TARGET_KEYS", "is_named", "rows", "take", "cat", "to_device", "nbytes",
    "pad_rows", "describe", "floating", "pick_output", "call_model", "example_bytes",
]

#: A batch of inputs: one tensor, or named tensors passed as keyword arguments.
Inputs = torch.Tensor | dict[str, torch.Tensor]

#: Input names recognised in data files (any other name is passed on as well).
NAMED_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")
#: Keys of a data dict that hold the targets (first found wins).
TARGET_KEYS = ("labels", "targets")


def is_named(x: Any) -> bool:
    """True for a dict of named inputs."""
    return isinstance(x, Mapping)


def rows(x: Inputs) -> int:
    """Examples in the batch (the shared first dimension)."""
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def take(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``[start, stop)`` (views)."""
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def cat(parts: Sequence[Inputs]) -> Inputs:
    """Join batches along the examples."""
    first = parts[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return torch.cat(list(parts))  # type: ignore[arg-type]


def to_device(x: Inputs, device: torch.device, dtype: torch.dtype | None) -> Inputs:
    """On ``device``; floating tensors in ``dtype`` (integer ids and masks keep theirs)."""
    def one(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype) if (dtype is not None and t.is_floating_point()) else t.to(device)

    if isinstance(x, Mapping):
        return {k: one(v) for k, v in x.items()}
    return one(x)


def floating(x: Inputs, dtype: torch.dtype) -> Inputs:
    """Floating tensors cast to ``dtype``, the others as they are."""
    if isinstance(x, Mapping):
        return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in x.items()}
    return x.to(dtype) if x.is_floating_point() else x


def nbytes(x: Inputs) -> int:
    """Bytes held by the batch's tensors."""
    if isinstance(x, Mapping):
        return sum(v.numel() * v.element_size() for v in x.values())
    return x.numel() * x.element_size()


def example_bytes(x: Inputs) -> list[torch.Tensor]:
    """The batch's tensors, each ``(n, -1)`` as raw bytes (``uint8``) on the CPU, in name order: what a
    fingerprint hashes per example."""
    items = [x[k] for k in sorted(x)] if isinstance(x, Mapping) else [x]
    return [t.detach().cpu().contiguous().reshape(t.shape[0], -1).view(torch.uint8) for t in items]


def pad_rows(x: Inputs, size: int) -> Inputs:
    """At least ``size`` examples, by repeating the first (for models exported for a fixed batch)."""
    def one(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] >= size:
            return t
        return torch.cat([t, t[:1].expand(size - t.shape[0], *t.shape[1:])], dim=0)

    if isinstance(x, Mapping):
        return {k: one(v) for k, v in x.items()}
    return one(x)


def describe(x: Inputs) -> str:
    """Shapes and dtypes for messages, e.g. ``input_ids (batch, 16) int64, attention_mask (batch, 16) int64``."""
    def one(t: torch.Tensor) -> str:
        tail = ", ".join(map(str, t.shape[1:]))
        return f"(batch{', ' + tail if tail else ''}) {str(t.dtype).replace('torch.', '')}"

    if isinstance(x, Mapping):
        return ", ".join(f"{k} {one(v)}" for k, v in x.items())
    return one(x)


def call_model(module: torch.nn.Module, state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
               x: Inputs, output: str | None = None) -> torch.Tensor:
    """``functional_call(module, state, x)`` (named inputs as keyword arguments), reduced to one
    tensor by :func:`pick_output`."""
    from torch.func import functional_call

    if isinstance(x, Mapping):
        out = functional_call(module, state, (), dict(x))
    else:
        out = functional_call(module, state, (x,))
    return pick_output(out, output)


def pick_output(out: Any, output: str | None = None) -> torch.Tensor:
    """The tensor to differentiate from a model's return value.

    A tensor is taken as it is. From a ``ModelOutput`` or dict: the field ``output`` if given,
    else ``logits``, else its only tensor. From a tuple or list: element ``int(output)`` if given,
    else the first.

    Raises:
        InputError: no such field, or several tensors and no ``logits`` (names the fields), or
            the picked value is not a tensor.
    """
    if isinstance(out, torch.Tensor) and output is None:
        return out
    if isinstance(out, Mapping):
        fields = {k: v for k, v in out.items() if v is not None}
        if output is not None:
            if output not in fields:
                raise InputError(f"the model's output has no field {output!r}; its fields: {', '.join(map(str, fields))}",
                                 param="output")
            picked = fields[output]
        elif "logits" in fields:
            picked = fields["logits"]
        else:
            tensors = [k for k, v in fields.items() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise InputError(
                    f"the model returned {type(out).__name__} with fields {', '.join(map(str, fields))} and no "
                    "'logits': name the one to use with output=NAME", param="output"
                )
            picked = fields[tensors[0]]
    elif isinstance(out, (tuple, list)):
        if not out:
            raise InputError("the model returned an empty tuple")
        if output is not None:
            try:
                picked = out[int(output)]
            except (ValueError, IndexError) as err:
                raise InputError(
                    f"the model returned a {type(out).__name__} of {len(out)} items: output {output!r} must be an "
                    f"index in 0..{len(out) - 1}", param="output"
                ) from err
        else:
            picked = out[0]
    elif isinstance(out, torch.Tensor):
        raise InputError(f"the model returned one tensor; output {output!r} names a field of a dict or tuple output",
                         param="output")
    else:
        raise InputError(f"the model returned {type(out).__name__}, not a tensor, dict or tuple of tensors")
    if not isinstance(picked, torch.Tensor):
        raise InputError(f"the model's output {output or 'picked'!r} is a {type(picked).__name__}, not a tensor",
                         param="output" if output is not None else None)
    return picked


def has_named_inputs(obj: Any) -> bool:
    """True for a mapping that holds named model inputs (``input_ids``, ``pixel_values``, ...)
    rather than the ``inputs``/``targets`` pair."""
    return isinstance(obj, Mapping) and "inputs" not in obj and any(k in obj for k in NAMED_INPUTS)


def split_named(obj: Mapping[str, Any], source: str) -> tuple[dict[str, Any], Any]:
    """Named inputs and targets from a flat mapping (``input_ids``, ``attention_mask``, ..., ``labels``).

    The targets are ``labels``, else ``targets``; every other key is a model input (passed as a
    keyword argument). Without either, the targets default to ``input_ids`` with the positions
    where ``attention_mask == 0`` (padding) set to −100, as a causal LM's labels (loss ``causal-lm``).

    Raises:
        InputError: no targets and no ``input_ids`` to take them from.
    """
    key = next((k for k in TARGET_KEYS if k in obj), None)
    inputs = {str(k): v for k, v in obj.items() if k != key}
    if key is not None:
        return inputs, obj[key]
    if "input_ids" not in inputs:
        raise InputError(
            f"{source}: named inputs {', '.join(inputs)} but no labels or targets: add a 'labels' entry "
            "(or input_ids, whose tokens are a causal LM's labels)"
        )
    ids = inputs["input_ids"]
    labels = torch.as_tensor(ids).clone()
    mask = inputs.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(torch.as_tensor(mask) == 0, -100)
    return inputs, labels


def require_tensor(x: Inputs, what: str) -> torch.Tensor:
    """``x`` when it is one tensor; named inputs are refused by ``what`` (an analysis that needs them
    as one tensor).

    Raises:
        InputError: naming the inputs and ``what``.
    """
    if isinstance(x, torch.Tensor):
        return x
    raise InputError(f"{what} needs the inputs as one tensor; named inputs ({', '.join(x)}) are not supported there")
