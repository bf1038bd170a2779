"""What precision a model really computes in: a dtype audit of one forward.

A model loaded in float64 can still compute part of its graph in lower precision: Llama's
``RMSNorm`` casts to float32 and back, attention softmaxes run in float32 in some families, and
``torch.autocast`` runs matmuls in bfloat16 on a GPU. Its HVPs then carry that precision's
rounding, and error bounds that assume float64 rounding do not hold (issue 22: λ1 ± 2.6e-9 on a
Llama whose float64 references scattered by 1–4e-7). :func:`audit_precision` runs one forward
on one example under a ``TorchFunctionMode`` that records every torch function or ATen op whose floating output is
narrower than the problem's dtype, and the module it ran in (global forward hooks keep a stack of
qualified module names). The analyses then measure the rounding at run time, as they do for a
float32 problem (:func:`basins.analyses.hessian.hessian_eigenvalues`), and warn with the layers.

Cost: one forward pass on one example (a fixed-batch model: one chunk), cached per problem.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from basins.engine.batch import take

if TYPE_CHECKING:
    from basins.engine.problem import Problem

__all__ = ["PrecisionAudit", "PromoteToFloat64", "audit_precision", "forget_audit"]

#: Layers named in a warning before "and N more".
MAX_NAMED = 6

_CACHE: weakref.WeakKeyDictionary[Any, PrecisionAudit] = weakref.WeakKeyDictionary()


@dataclass
class PrecisionAudit:
    """Floating dtypes one forward computed in.

    Attributes:
        dtype: the problem's dtype.
        lowest: the narrowest floating dtype an op produced (``dtype`` when none was narrower).
        layers: qualified names of the modules where ops computed below ``dtype`` (the model
            itself is ``"(model)"``), in order of first appearance.
        ops: the ATen ops that did (name → count).
        error: why the audit could not run (then nothing lower is assumed), or None.
    """

    dtype: torch.dtype
    lowest: torch.dtype
    layers: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def mixed(self) -> bool:
        """Whether part of the forward computed below the problem's dtype."""
        return self.lowest != self.dtype

    @property
    def eps(self) -> float:
        """Machine epsilon of the narrowest dtype computed in."""
        return float(torch.finfo(self.lowest).eps)

    def warning(self) -> str | None:
        """One line naming the layers, or None when the forward stayed in ``dtype``."""
        if not self.mixed:
            return None
        names = self.layers[:MAX_NAMED]
        more = f" and {len(self.layers) - MAX_NAMED} more" if len(self.layers) > MAX_NAMED else ""
        short = lambda d: str(d).replace("torch.", "")  # noqa: E731
        return (f"the {short(self.dtype)} model computes part of its graph in {short(self.lowest)} "
                f"({', '.join(names)}{more}): error bounds measure that rounding at run time")

    def as_dict(self) -> dict[str, Any]:
        short = lambda d: str(d).replace("torch.", "")  # noqa: E731
        return {"compute_dtype": short(self.lowest), "low_precision_layers": ", ".join(self.layers)}


_NARROW = (torch.float32, torch.float16, torch.bfloat16)


class PromoteToFloat64(TorchFunctionMode):
    """Serves a float64 model's requests for a narrower floating dtype in float64.

    ``x.to(torch.float32)``, ``x.float()``/``.half()``/``.bfloat16()`` and ``dtype=torch.float32``
    arguments (Llama's RMSNorm and rotary embedding, ViT's and Qwen's float32 softmax) are the
    model author's guard for half precision; in a float64 analysis they would put float32 rounding
    (~1e-7 relative) into the function whose Hessian is asked for. Under this mode the model runs as
    the float64 function it is meant to be, so float64 references and float64 error bounds apply.
    A torch-function mode sits above autograd and the ``torch.func`` transforms, so every HVP route
    differentiates the promoted graph. Cost: a Python call per torch function of the forward.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float or func is torch.Tensor.half or func is torch.Tensor.bfloat16:
            return args[0].to(torch.float64)
        args = tuple(torch.float64 if a in _NARROW else a for a in args)
        if kwargs.get("dtype") in _NARROW:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def forget_audit(problem: Problem) -> None:
    """Drop ``problem``'s cached audit (after its forward changed, e.g. once promoted)."""
    try:
        _CACHE.pop(problem, None)
    except TypeError:  # pragma: no cover - not weakly referenceable: never cached
        pass


class _Recorder(TorchFunctionMode):
    """Records the torch functions whose floating output is narrower than the problem's dtype. A
    torch-function mode (not a dispatch mode: those import ``torch._dynamo``, a second of start-up)
    sees every call of the forward, ``aten`` ops of an exported graph included, with its outputs."""

    def __init__(self, dtype: torch.dtype, stack: list[str], audit: PrecisionAudit) -> None:
        super().__init__()
        self.width = torch.finfo(dtype).bits
        self.stack, self.audit = stack, audit

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and torch.finfo(t.dtype).bits < self.width:
                a = self.audit
                name = str(getattr(func, "__name__", func)).split(".")[0]
                a.ops[name] = a.ops.get(name, 0) + 1
                layer = self.stack[-1] if self.stack else "(model)"
                if layer not in a.layers:
                    a.layers.append(layer)
                if torch.finfo(t.dtype).bits < torch.finfo(a.lowest).bits or (
                        torch.finfo(t.dtype).bits == torch.finfo(a.lowest).bits and t.dtype != a.lowest):
                    a.lowest = t.dtype
                break
        return out


def audit_precision(problem: Problem) -> PrecisionAudit:
    """The dtypes one forward of ``problem``'s model computes in (module docstring); cached."""
    try:
        return _CACHE[problem]
    except (KeyError, TypeError):
        pass
    audit = PrecisionAudit(problem.dtype, problem.dtype)
    names = {id(m): (n or "(model)") for n, m in problem.module.named_modules()}
    stack: list[str] = []

    def pre(module: torch.nn.Module, _args: Any) -> None:
        stack.append(names.get(id(module), type(module).__name__))

    def post(module: torch.nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    x = next(iter(problem.chunks()))[0]
    if problem.fixed_batch_size is None:
        x = take(x, 0, 1)
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
    try:
        with torch.no_grad(), _Recorder(problem.dtype, stack, audit):
            problem.forward(problem.params, x)
    except Exception as exc:  # noqa: BLE001 - a model the mode cannot follow: say so, assume nothing lower
        audit = PrecisionAudit(problem.dtype, problem.dtype, error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        for h in handles:
            h.remove()
    try:
        _CACHE[problem] = audit
    except TypeError:  # pragma: no cover - a problem that cannot be weakly referenced: not cached
        pass
    return audit
