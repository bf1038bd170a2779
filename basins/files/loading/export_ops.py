"""The operators a ``.pt2`` read without ``trust_pickle`` may call: the allowlist, written once.

A graph in an archive from elsewhere is code. :func:`resolve_all`, called once per graph before any
node is built, turns every node's target into what the module will call, or refuses it
(:class:`Refused`, naming the operator and why):

* **ATen and prims overloads only** (``torch.ops.aten.*``, ``torch.ops.prims.*``). Higher-order
  operators (``cond``, ``while_loop``, ``map``, ``print``, ``with_effects`` ...) live in
  ``torch.ops.higher_order`` and carry subgraphs: refusing the namespace refuses every subgraph,
  so a file read hidden in a ``cond`` branch is never reached. Custom namespaces run code from
  whatever library registered them: refused.
* **Pure by schema** (:func:`allowed`): every argument and return is a tensor, number, bool,
  string, dtype, layout, memory format or device (:data:`_ARG_TYPES`), so no generator, storage,
  stream or custom object; the operator returns something, except the size and metadata
  assertions of :data:`_ASSERTIONS` (an operator that returns nothing runs for its effects:
  ``_print``, ``record_stream``); it draws no random numbers (the ``nondeterministic_seeded``
  tag), except dropout, which inference mode turns off, and attention/recurrent layers whose
  dropout is 0 or whose ``train`` flag is off (read from the node's arguments); and it is not in
  :data:`_DENIED` nor takes a ``str`` file name (``from_file`` reads any file of the machine,
  ``manual_seed`` resets the global generator).
* **Size arithmetic** (:data:`SYM_OPS`): the Python operators ``torch.export`` emits for dynamic
  shapes, mapped to checked functions whose integer results must fit in int64 (no ``pow`` or
  shifts: a chain of them could grow an integer without bound).
"""

from __future__ import annotations

import builtins
import math
import operator
import re
from collections.abc import Callable
from typing import Any

import torch

from basins.errors import InputError

__all__ = ["Refused", "resolve_all", "allowed", "SYM_OPS"]

_NAMESPACES = ("aten", "prims")
_INT64 = 1 << 63
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}\Z")


class Refused(Exception):
    """The archive says something outside what is read without ``trust_pickle`` (the message names it)."""

#: operators with effects outside the graph, whatever their schema says
_DENIED = frozenset({"from_file", "_print", "save", "manual_seed", "seed", "set_rng_state", "_set_rng_state",
                     "_assert_async", "record_stream", "_nested_tensor_from_mask"})
#: operators that return nothing and are allowed: checks of sizes and metadata
_ASSERTIONS = frozenset({"_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range",
                         "sym_constrain_range_for_size"})
#: random operators allowed: dropout, which inference mode turns off, and attention and recurrent
#: layers whose dropout probability is 0 or whose ``train`` flag is off (:func:`_check_no_dropout`)
_DROPOUTS = frozenset({"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"})
MAYBE_DROPOUT = frozenset({"scaled_dot_product_attention", "lstm", "gru", "rnn_tanh", "rnn_relu"})
_ARG_TYPES = frozenset({"Tensor", "int", "float", "bool", "number", "str", "Device", "complex", "SymInt",
                        "ScalarType", "Layout", "MemoryFormat"})
_WRAPPER = re.compile(r"(?:Optional|List)\[(.*)\]\Z")


def _base_type(text: str) -> str:
    while (m := _WRAPPER.match(text)) is not None:
        text = m.group(1)
    return text


def allowed(op: torch._ops.OpOverload) -> str | None:
    """Why ``op`` may not run from a file, or None when it may (module docstring)."""
    schema = op._schema
    name = schema.name.split("::", 1)[1]
    if name in _DENIED or any(
            a.name in ("filename", "path", "file") and _base_type(str(a.type)) == "str" for a in schema.arguments):
        return "reads, writes or prints outside the model"
    if not schema.returns and name not in _ASSERTIONS:
        return "returns nothing (an operator run for its effects)"
    if torch.Tag.nondeterministic_seeded in op.tags and name not in _DROPOUTS | MAYBE_DROPOUT:
        return "draws random numbers"
    for a in list(schema.arguments) + list(schema.returns):
        base = _base_type(str(a.type))
        if base not in _ARG_TYPES:
            return f"takes or returns a {base}"
    return None


def resolve_all(nodes: list[Any]) -> dict[str, Callable[..., Any]]:
    """``{target: callable}`` for the targets of a serialised graph's nodes, each allowed (module
    docstring); an attention or recurrent call whose arguments turn dropout on is refused. Nodes that
    are not JSON objects are left for the reader to refuse.

    Raises:
        Refused: naming the first operator that may not run, and why.
    """
    ops: dict[str, Callable[..., Any]] = {}
    for node in nodes:
        if not isinstance(node, dict):
            continue
        target = node.get("target")
        op = ops[target] if isinstance(target, str) and target in ops else _resolve(target)
        ops[target] = op
        if isinstance(op, torch._ops.OpOverload) and op._schema.name.split("::")[1] in MAYBE_DROPOUT:
            _check_no_dropout(op, node.get("inputs"))
    return ops


def _resolve(target: Any) -> Callable[..., Any]:
    if not isinstance(target, str):
        raise Refused("an operator is not named")
    if target in SYM_OPS:
        return SYM_OPS[target]
    parts = target.split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"] or parts[2] not in _NAMESPACES or not all(
            _IDENT.match(p) for p in parts[3:]):
        raise Refused(f"operator {target[:80]!r} is not an aten or prims operator (higher-order operators, "
                       "custom namespaces and subgraphs are not read)")
    packet = getattr(getattr(torch.ops, parts[2]), parts[3], None)
    op = getattr(packet, parts[4], None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
    if not isinstance(op, torch._ops.OpOverload):
        raise Refused(f"operator {target[:80]!r} does not exist in this torch")
    why = allowed(op)
    if why is not None:
        raise Refused(f"operator {op._schema.name} {why}")
    return op


def _checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Size arithmetic that refuses results outside int64 (a crafted graph cannot grow integers forever)."""

    def checked(*args: Any) -> Any:
        out = fn(*args)
        if isinstance(out, int) and not -_INT64 <= out < _INT64:
            raise InputError(f"the exported program's size arithmetic ({fn.__name__}) overflows int64: "
                             "a damaged or crafted program")
        return out

    checked.__name__ = checked.__qualname__ = f"size_{fn.__name__.strip('_')}"
    checked.__module__ = __name__
    return checked


def _ite(cond: Any, a: Any, b: Any) -> Any:
    return a if cond else b


#: the Python size arithmetic torch.export emits for dynamic shapes (no pow, no shifts)
SYM_OPS: dict[str, Callable[..., Any]] = {
    f"_operator.{f.__name__}": _checked(f) for f in (
        operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.truediv,
        operator.neg, operator.pos, operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt,
        operator.and_, operator.or_)
}
SYM_OPS.update({"torch.sym_max": _checked(builtins.max), "torch.sym_min": _checked(builtins.min),
                 "torch.sym_not": _checked(operator.not_), "torch.sym_int": _checked(int),
                 "torch.sym_float": _checked(float), "torch.sym_ite": _checked(_ite),
                 "math.trunc": _checked(math.trunc)})
for _name, _fn in SYM_OPS.items():  # fx refers to them by their module's global name
    globals()[_fn.__name__] = _fn


def _check_no_dropout(op: torch._ops.OpOverload, inputs: Any) -> None:
    """Refuse an attention or recurrent call that would draw random numbers (dropout on, in training),
    from its serialised inputs (``[{"name", "arg": {kind: value}}, ...]``); a probability or flag that
    is not a constant counts as on."""
    given = {i.get("name"): i.get("arg") for i in inputs if isinstance(i, dict)} if isinstance(inputs, list) else {}

    def constant(name: str, default: Any) -> Any:
        if name not in given:
            return default
        arg = given[name]
        kind, value = next(iter(arg.items())) if isinstance(arg, dict) and len(arg) == 1 else (None, None)
        return value if kind in ("as_float", "as_int", "as_bool") else "not a constant"

    p = constant("dropout_p", constant("dropout", 0.0))
    if p and constant("train", True):
        raise Refused(f"operator {op._schema.name} applies dropout (p={p}), which draws random numbers")
