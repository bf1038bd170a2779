"""Attention on a path that Hessian-vector products can go through.

PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, the CPU flash
kernel) have no double backward and no forward-mode AD ("derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented", torch 2.13), so
every HVP route fails through them. :func:`force_differentiable_attention` switches a Hugging
Face model to its ``eager`` attention; :func:`math_attention` runs any other model's
``F.scaled_dot_product_attention`` on the ``MATH`` backend (plain matmul and softmax).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["force_differentiable_attention", "math_attention"]


def force_differentiable_attention(module: torch.nn.Module) -> str:
    """Put attention on a path that has a double backward and forward-mode AD, and say which.

    PyTorch's fused scaled-dot-product-attention kernels (flash, memory-efficient, the CPU
    flash kernel) have neither, so Hessian-vector products fail through them. A Hugging Face
    model (it has ``config._attn_implementation``) that uses ``sdpa`` or a flash kernel is switched
    to ``eager`` attention (``set_attn_implementation``): returns ``"eager"``. Any other model's
    ``F.scaled_dot_product_attention`` calls run under the ``MATH`` SDPA backend while a
    :class:`~basins.engine.problem.Problem` evaluates it (:meth:`basins.engine.problem.Problem.forward`): returns ``"sdpa-math"``.
    """
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, str) and impl != "eager" and hasattr(module, "set_attn_implementation"):
        try:
            module.set_attn_implementation("eager")  # type: ignore[operator]
        except Exception:  # noqa: BLE001 - a model without an eager path: the math backend still applies
            return f"sdpa-math ({impl} kept: no eager attention)"
        return f"eager (switched from {impl})"
    if isinstance(impl, str) and impl == "eager":
        return "eager"
    return "sdpa-math"


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """Scaled-dot-product attention on the ``MATH`` backend (differentiable twice and forward-mode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
