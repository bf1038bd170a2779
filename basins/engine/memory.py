"""The one memory budget: how many bytes a basins computation may plan to hold.

Every size decision (keeping a stream's chunks, caching the HVP gradient graph, the dense
Hessian of ``nullity --method exact``, the feature Gram matrix) asks :func:`memory_budget`.
The default is a quarter of :func:`process_memory_bytes`: the machine's physical RAM split
between the ``LOCAL_WORLD_SIZE`` processes ``torchrun`` started on it (the GPU's memory for a
CUDA device), 2 GiB in all when the OS does not say. A quarter leaves room for the model,
its activations and the Lanczos basis next to whatever the budget is spent on.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["memory_budget", "process_memory_bytes", "DEFAULT_FRACTION"]

#: Share of :func:`process_memory_bytes` one budgeted structure may take by default.
DEFAULT_FRACTION = 0.25
_UNKNOWN_TOTAL = 2 << 30


def process_memory_bytes(device: Any = None) -> int:
    """Bytes this process may count on where its tensors live.

    Args:
        device: a ``torch.device`` (or None: the CPU). For a CUDA device, the GPU's total memory.

    Returns:
        The GPU's total for CUDA; else physical RAM divided by ``LOCAL_WORLD_SIZE`` (the
        processes sharing this machine under ``torchrun``; 1 otherwise).
    """
    if device is not None and getattr(device, "type", None) == "cuda":
        try:
            import torch

            return int(torch.cuda.mem_get_info(device)[1])
        except Exception:  # noqa: BLE001 - no CUDA runtime information: fall back to RAM
            pass
    try:
        total = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        total = _UNKNOWN_TOTAL
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return total // local


def memory_budget(memory_bytes: int | None = None, device: Any = None) -> int:
    """``memory_bytes`` when given, else a quarter of :func:`process_memory_bytes` (bytes).

    Raises:
        InputError: a negative ``memory_bytes``.
    """
    if memory_bytes is not None:
        if int(memory_bytes) < 0:
            from basins.errors import InputError

            raise InputError(f"memory_bytes must be ≥ 0, got {memory_bytes}")
        return int(memory_bytes)
    return int(process_memory_bytes(device) * DEFAULT_FRACTION)
