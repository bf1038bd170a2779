"""The one memory budget: how many bytes a basins computation may plan to hold.

Every size decision (keeping a stream's chunks, caching the HVP gradient graph, the dense
Hessian of ``nullity(method="exact")``, the feature Gram matrix) asks :func:`memory_budget`.
The default is a quarter of :func:`process_memory_bytes`: the machine's physical RAM split
between the ``LOCAL_WORLD_SIZE`` processes ``torchrun`` started on it (the GPU's memory for a
CUDA device), 2 GiB in all when the OS does not say. A quarter leaves room for the model,
its activations and the Lanczos basis next to whatever the budget is spent on.

The memory plan (:class:`MemoryPlan`) is the whole run's: a budget (:func:`plan_budget`,
``memory_bytes``; default 80% of what this process holds plus what is free), what is resident,
the HVP route's graph or functional pieces (:func:`hvp_piece_bytes`, from the bytes a
``create_graph`` gradient saves per example, measured), then the Lanczos basis in memory,
bounded by thick restart, or on disk, and the trace's block (:func:`plan_lanczos`). It is made
before the work, printed and stored; when nothing fits, an ``InputError`` says so with the sizes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["memory_budget", "process_memory_bytes", "DEFAULT_FRACTION", "MemoryPlan", "plan_budget",
           "available_memory_bytes", "resident_bytes", "hvp_piece_bytes", "plan_lanczos", "default_max_basis",
           "plan_sgld"]

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

            raise InputError(f"memory_bytes must be ≥ 0, got {memory_bytes}", param="memory_bytes")
        return int(memory_bytes)
    return int(process_memory_bytes(device) * DEFAULT_FRACTION)


# ---------------------------------------------------------------------- the memory plan
#: Share of the memory available at planning (free memory plus what this process holds) the
#: whole computation may plan to hold by default (``memory_bytes`` overrides it).
PLAN_FRACTION = 0.8
#: Peak buffers of one double-backward HVP over a piece of data, in units of the tensors that a
#: ``create_graph`` gradient saves on that piece (measured on one example): the saved forward, the
#: first backward's saved tensors, and the transients of the second (logits-sized ones included).
DOUBLE_BACKWARD_FACTOR = 3.0
#: Parameter-sized vectors one HVP holds besides its block: gradient, tangent, result, accumulator.
HVP_VECTORS = 4
#: Vectors the streamed (on-disk) Lanczos basis keeps in memory: the block being orthogonalised,
#: its product and one column block of the basis.
DISK_BASIS_VECTORS = 4
#: The largest block of vectors one HVP piece vmaps (the trace estimators' default block).
MAX_PIECE_BLOCK = 16


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes(device: Any = None) -> int:
    """Bytes this process holds now: its resident set on the CPU (``/proc/self/statm``; 0 where the
    OS does not say), the memory torch has allocated on a CUDA device."""
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


def available_memory_bytes(device: Any = None) -> int:
    """Bytes this process could hold in all: what it holds now plus the free memory (MemAvailable
    on Linux; the free device memory on CUDA), at most :func:`process_memory_bytes`."""
    total = process_memory_bytes(device)
    if device is not None and getattr(device, "type", None) == "cuda":
        try:
            import torch

            return min(total, int(torch.cuda.mem_get_info(device)[0]) + resident_bytes(device))
        except Exception:  # noqa: BLE001 - no CUDA runtime information
            return total
    free = _meminfo_available()
    if free is None:
        return total
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return min(total, free // local + resident_bytes(device))


def plan_budget(memory_bytes: int | None = None, device: Any = None) -> int:
    """The whole computation's budget: ``memory_bytes`` when given, else :data:`PLAN_FRACTION` of
    :func:`available_memory_bytes` (bytes).

    Raises:
        InputError: a negative ``memory_bytes``.
    """
    if memory_bytes is not None:
        return memory_budget(memory_bytes, device)
    return int(available_memory_bytes(device) * PLAN_FRACTION)


def hvp_piece_bytes(per_example: float, rows: int, block: int, num_params: int, itemsize: int) -> int:
    """Peak bytes of one functional HVP over ``rows`` examples with ``block`` vmapped vectors.

    ``per_example``: bytes a ``create_graph`` gradient saves per example (measured). The forward
    and first backward are shared by the block; the tangents are not: ``(1 + block) / 2`` of
    :data:`DOUBLE_BACKWARD_FACTOR` times the saved bytes, plus ``HVP_VECTORS + 2·block``
    parameter-sized vectors."""
    buffers = DOUBLE_BACKWARD_FACTOR * per_example * rows * (1 + block) / 2
    return int(buffers) + (HVP_VECTORS + 2 * block) * num_params * itemsize


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.0f} MiB"


@dataclass
class MemoryPlan:
    """What a computation will hold, decided before the work starts (bytes throughout).

    Attributes:
        budget: the bytes the plan must fit (``memory_bytes``, or :func:`plan_budget`'s default).
        given: whether the budget was given (``memory_bytes``) rather than the default share.
        device: where the tensors live.
        resident: what the process held when planned (model, θ*, data, runtime), measured.
        per_example: bytes a ``create_graph`` gradient saves per example (measured on one).
        route: the HVP route taken.
        graph: bytes of the cached gradient graph (route ``graph``), else 0.
        piece_rows: examples per functional HVP piece (None: whole chunks).
        piece_block: vectors vmapped per functional HVP piece.
        hvp: peak bytes of one HVP piece (or one product through the graph).
        basis_vectors, basis_storage, basis_bytes: the Lanczos basis (``max_basis`` vectors) and
            where it lives: ``memory``, ``disk`` (a memory-mapped scratch file, streamed in blocks;
            ``basis_bytes`` is then what stays resident) or ``none`` (no Lanczos run planned).
        restart_bound: the basis was shrunk to fit memory (thick restart at fewer vectors).
        max_basis: the ``max_basis`` Lanczos is given (None: its default).
        scratch_bytes: size of the scratch file of an on-disk basis.
        trace_block, trace: the trace estimator's block and the bytes of its vectors.
        checks: bytes of the error-bound checks (their vectors, in float64).
        sgld_chains, sgld: the SGLD chains advanced together and the bytes of their state and one
            step (:func:`plan_sgld`; 0 when no sampling is planned).
        quadratic: bytes of ``llc_quadratic``'s vectors (a phase of full-data HVPs beside the graph).
    """

    budget: int
    given: bool
    device: str
    resident: int
    per_example: int
    route: str
    graph: int
    piece_rows: int | None
    piece_block: int
    hvp: int
    basis_vectors: int = 0
    basis_storage: str = "none"
    basis_bytes: int = 0
    restart_bound: bool = False
    max_basis: int | None = None
    scratch_bytes: int = 0
    trace_block: int = 0
    trace: int = 0
    checks: int = 0
    sgld_chains: int = 0
    sgld: int = 0
    quadratic: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Bytes the plan holds at its peak: what is resident, the graph, one HVP, then the larger of
        the Lanczos phase (its basis, or the streamed basis' resident blocks), the trace phase and
        ``llc_quadratic``'s, and the checks; or, when larger, what is resident and the SGLD phase (which runs after the
        full-data HVPs, with the gradient graph freed)."""
        hvps = self.graph + self.hvp + max(self.basis_bytes, self.trace, self.quadratic) + self.checks
        return self.resident + max(hvps, self.sgld)

    def describe(self) -> str:
        """One line for stderr (its notes after semicolons)."""
        rows = "whole chunks" if self.piece_rows is None else f"pieces of {self.piece_rows} examples"
        parts = [f"memory plan: {_gib(self.total)} of {_gib(self.budget)} "
                 f"({'memory_bytes' if self.given else f'{PLAN_FRACTION:.0%} of available'}) on {self.device}",
                 f"resident {_gib(self.resident)}"]
        if self.route == "graph":
            parts.append(f"HVP route graph {_gib(self.graph)}")
        else:
            parts.append(f"HVP route {self.route}, {rows} × {self.piece_block} vectors {_gib(self.hvp)}")
        if self.basis_storage != "none":
            if self.basis_storage == "memory":
                parts.append(f"Lanczos basis {self.basis_vectors} vectors in memory {_gib(self.basis_bytes)}"
                             + (" (thick restart bounded to fit)" if self.restart_bound else ""))
            else:
                parts.append(f"Lanczos basis {self.basis_vectors} vectors on disk (memory-mapped scratch file, "
                             f"{_gib(self.scratch_bytes)}; {_gib(self.basis_bytes)} resident)")
        if self.trace:
            parts.append(f"trace blocks of {self.trace_block} {_gib(self.trace)}")
        if self.sgld:
            parts.append(f"SGLD {self.sgld_chains} chains {_gib(self.sgld)}")
        return "; ".join([", ".join(parts), *self.notes])

    def as_dict(self) -> dict[str, Any]:
        """The plan for a report's attributes (``memory_plan_*``) and ``--json``."""
        d = {k: v for k, v in asdict(self).items() if k != "notes"}
        d["total"] = self.total
        d["line"] = self.describe()
        return d


#: Spare vectors a restart-bounded basis keeps beyond the wanted pairs (thick restart at ``w + this``).
RESTART_SPARE = 10


def default_max_basis(num_params: int, need: int, block: int) -> int:
    """:func:`basins.linalg.lanczos.lanczos`'s default basis size for ``need`` wanted pairs."""
    return min(num_params, max(2 * need + 20, 40) + 2 * (block - 1))


def plan_lanczos(plan: MemoryPlan, num_params: int, itemsize: int, *, need: int, block: int,
                 max_basis: int | None = None, storage: str | None = None, trace_hvps: int = 0,
                 trace_block: int = 16, check_vectors: int = 0) -> MemoryPlan:
    """``plan`` completed with the Lanczos basis, the trace blocks and the checks.

    The basis (``max_basis`` vectors, plus the block being built and the ``need`` Ritz vectors
    returned) stays in memory when it fits what the plan leaves of its budget; else a basis bounded
    by thick restart at ``need + RESTART_SPARE`` (at least ``need + 2·block``) vectors when that fits;
    else on disk (:class:`basins.linalg.scratch.ScratchRows`: ``DISK_BASIS_VECTORS + block`` vectors
    resident; the Ritz vectors returned are a view on the scratch file). Hutch++ holds ``trace_hvps // 3 + 3·trace_block`` vectors: the block is halved until
    they fit. ``storage`` (``memory``/``disk``) or ``max_basis`` given are kept as given.

    Raises:
        InputError: not even the on-disk basis, or the trace's sketch, fits (one line, with sizes).
    """
    from basins.errors import InputError

    vec = num_params * itemsize
    left = plan.budget - (plan.resident + plan.graph + plan.hvp + check_vectors * 8 * num_params)
    default = default_max_basis(num_params, need, block) if max_basis is None else min(max_basis, num_params)
    out = replace(plan, checks=check_vectors * 8 * num_params)

    def in_memory(n: int) -> int:
        return (n + block + need) * vec

    if storage == "disk":
        out = replace(out, basis_storage="disk", basis_vectors=default, max_basis=max_basis,
                      basis_bytes=(DISK_BASIS_VECTORS + block) * vec, scratch_bytes=default * vec)
    elif storage == "memory" or max_basis is not None or in_memory(default) <= left:
        out = replace(out, basis_storage="memory", basis_vectors=default, max_basis=max_basis,
                      basis_bytes=in_memory(default))
    else:
        small = min(num_params, max(need + RESTART_SPARE, need + 2 * block))
        if small < default and in_memory(small) <= left:
            out = replace(out, basis_storage="memory", basis_vectors=small, max_basis=small,
                          basis_bytes=in_memory(small), restart_bound=True)
        else:
            out = replace(out, basis_storage="disk", basis_vectors=default, max_basis=max_basis,
                          basis_bytes=(DISK_BASIS_VECTORS + block) * vec, scratch_bytes=default * vec)
    if out.basis_bytes > left:
        raise InputError(
            f"nothing fits the memory budget of {plan.budget / 2**30:.2f} GiB: the Lanczos workspace needs "
            f"{out.basis_bytes / 2**30:.2f} GiB next to {(plan.budget - left) / 2**30:.2f} GiB for the model, "
            "data and HVP; raise memory_bytes, or lower k or block_size", param="memory_bytes"
        )
    if trace_hvps:
        s = trace_hvps // 3
        tb = max(1, min(trace_block, plan.piece_block))
        while tb > 1 and (s + 3 * tb + need) * vec > left:
            tb //= 2
        if (s + 3 * tb + need) * vec > left:
            raise InputError(
                f"nothing fits the memory budget of {plan.budget / 2**30:.2f} GiB: the trace's sketch of {s} vectors "
                f"needs {(s + 3 + need) * vec / 2**30:.2f} GiB; raise memory_bytes, or lower trace_hvps",
                param="memory_bytes"
            )
        out = replace(out, trace_block=tb, trace=(s + 3 * tb + need) * vec)
    return out


#: Parameter-sized arrays per chain an SGLD step holds: position, start, the two noise draws,
#: ∇Û, the minibatch gradient, three temporaries of the update or the curvature check's
#: (:mod:`basins.analyses.llc.sampler`).
SGLD_VECTORS = 10
#: More per chain for a preconditioned sampler (RMSProp's G and its running second moment).
SGLD_PRECONDITIONER_VECTORS = 2


def plan_sgld(plan: MemoryPlan, num_params: int, itemsize: int, *, chains: int, rows: int,
              preconditioned: bool = False) -> MemoryPlan:
    """``plan`` completed with SGLD's phase: ``chains`` chains advanced together, each step a
    minibatch gradient over pieces of ``rows`` examples per chain. The phase follows the full-data
    HVPs (λ_max at w*), with the gradient graph freed: it shares the budget with what is resident only.

    Bytes: :data:`SGLD_VECTORS` (+ :data:`SGLD_PRECONDITIONER_VECTORS`) ``(chains, P)`` arrays in the
    model's dtype, two float64 ``(P,)`` transients (one chain's noise as drawn, one distance), and
    the tensors a ``create_graph`` gradient saves per example (``plan.per_example``, an upper bound
    for a first-order gradient) times ``chains · rows``.

    Raises:
        InputError: it does not fit next to the rest of the plan (one line, with sizes).
    """
    from basins.errors import InputError

    per_chain = SGLD_VECTORS + (SGLD_PRECONDITIONER_VECTORS if preconditioned else 0)
    need = (per_chain * chains * itemsize + 2 * 8) * num_params + int(plan.per_example * chains * rows)
    left = plan.budget - plan.resident
    if need > left:
        raise InputError(
            f"nothing fits the memory budget of {plan.budget / 2**30:.2f} GiB: SGLD with {chains} chains and pieces "
            f"of {rows} examples needs {need / 2**30:.2f} GiB next to {plan.resident / 2**30:.2f} GiB resident (model "
            "and data); lower num_chains or minibatch, or raise memory_bytes", param="memory_bytes"
        )
    return replace(plan, sgld_chains=chains, sgld=need)
