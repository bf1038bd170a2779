"""Data parallelism over processes and machines with :mod:`torch.distributed`, launched by ``torchrun``.

Each process (*rank*) holds a contiguous shard of the dataset; every full-data quantity is
a sum of per-rank partial sums (each chunk weighted by ``n_c / n`` with the **global** n),
combined with :func:`all_reduce_sum`. Because an all-reduce hands every rank the same
result, Lanczos, SLQ and random probing — seeded, drawing on the CPU — then compute the
same thing on every rank, and rank 0 alone prints and writes reports.

Data: a map-style ``Dataset``, an ordered ``DataLoader`` (``module:factory``) or an HDF5 file
is streamed, and each rank reads only its own shard, a chunk at a time
(:mod:`basins.engine.data`). Tensors from a ``.pt``/``.npz`` file, a bundle or a factory are
loaded whole by every rank before it keeps its shard (memory ∝ n per process at load time).

Known limitations: ranks must not take decisions from
local measurements (timings, memory) without agreeing on them (:func:`broadcast_object`,
:func:`all_gather_object`), or the ranks' collective calls stop matching and they hang
until ``torchrun`` tears them down.

Launch::

    torchrun --nproc-per-node 2 -m basins.cli hessian model.pt

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env` reads them. Backend: ``nccl`` for CUDA devices,
``gloo`` otherwise (``BASINS_DIST_BACKEND`` overrides). When one rank fails, ``torchrun``
stops the others and exits non-zero.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from basins.errors import ComputeError, InputError

__all__ = [
    "DistContext",
    "launched",
    "env_rank",
    "env_world_size",
    "env_local_rank",
    "is_main_process",
    "is_initialized",
    "rank",
    "world_size",
    "choose_backend",
    "local_device",
    "init_from_env",
    "shard_sizes",
    "shard_range",
    "all_reduce_sum",
    "all_gather_object",
    "broadcast_object",
    "barrier",
    "reducer",
    "teardown",
]

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a collective waits for a missing peer before failing (``BASINS_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the process group.

    Attributes:
        rank: this process' global rank, ``0 ≤ rank < world_size``.
        world_size: number of processes.
        local_rank: rank within the machine (selects ``cuda:local_rank``).
        backend: ``gloo`` or ``nccl``.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------- environment
def launched() -> bool:
    """True when ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``) is present."""
    return all(k in os.environ for k in _ENV)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise InputError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from exc


def env_rank() -> int:
    """``RANK`` from the environment (0 when absent)."""
    return _env_int("RANK", 0)


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when absent)."""
    return _env_int("WORLD_SIZE", 1)


def env_local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when absent)."""
    return _env_int("LOCAL_RANK", 0)


def is_initialized() -> bool:
    """True when a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process' rank: from the process group when initialised, else from the environment."""
    if is_initialized():
        return int(torch.distributed.get_rank())
    return env_rank() if launched() else 0


def world_size() -> int:
    """Number of processes: from the process group when initialised, else from the environment."""
    if is_initialized():
        return int(torch.distributed.get_world_size())
    return env_world_size() if launched() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a single process. Usable before :func:`init_from_env`."""
    return rank() == 0


def choose_backend(device: torch.device) -> str:
    """``nccl`` for CUDA devices (when built in), ``gloo`` otherwise; ``BASINS_DIST_BACKEND`` overrides."""
    forced = os.environ.get("BASINS_DIST_BACKEND", "")
    if forced:
        if forced not in ("gloo", "nccl", "mpi"):
            raise InputError(f"BASINS_DIST_BACKEND={forced!r}: use gloo, nccl or mpi")
        return forced
    if device.type == "cuda" and torch.distributed.is_nccl_available():
        return "nccl"
    return "gloo"


def local_device(device: str | torch.device | None) -> str | torch.device | None:
    """The device of this rank: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` under torchrun with CUDA.

    An explicit ``cuda:N`` or ``cpu`` is kept. In a single process the argument is returned as is.
    """
    if not launched() or env_world_size() <= 1:
        return device
    text = "auto" if device is None else str(device)
    if text in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"cuda:{env_local_rank() % max(count, 1)}"
    return device


# ---------------------------------------------------------------------- setup / teardown
def init_from_env(device: torch.device | str = "cpu", *, timeout_s: float | None = None) -> DistContext | None:
    """Join the process group ``torchrun`` describes in the environment (``env://``).

    Args:
        device: the device this rank computes on; picks the backend (:func:`choose_backend`)
            and, for CUDA, becomes the current device.
        timeout_s: how long a collective waits for a peer (default ``BASINS_DIST_TIMEOUT``
            or 1800 s). ``torchrun`` stops the surviving ranks sooner when one fails.

    Returns:
        The context, or None when not launched by torchrun (a single process). Idempotent: a
        second call returns the existing group's context. The group is destroyed at exit.

    Raises:
        InputError: malformed environment, or a CUDA device without CUDA.
        ComputeError: the rendezvous failed (the message says which address was tried).
    """
    if not launched():
        return None
    if not torch.distributed.is_available():
        raise InputError("torchrun launched this process, but this torch build has no torch.distributed")
    dev = torch.device(device)
    backend = choose_backend(dev)
    if is_initialized():
        return DistContext(rank(), world_size(), env_local_rank(), str(torch.distributed.get_backend()))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {dev} asked for, but CUDA is not available here; use device='cpu'",
                             param="device")
        torch.cuda.set_device(dev)
    seconds = timeout_s if timeout_s is not None else float(os.environ.get("BASINS_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    try:
        torch.distributed.init_process_group(
            backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=seconds), **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - rendezvous failures come as many types
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise ComputeError(
            f"could not join the process group at {where} with backend {backend}: {type(exc).__name__}: {exc}"
        ) from exc
    atexit.register(teardown)
    return DistContext(rank(), world_size(), env_local_rank(), backend)


def teardown() -> None:
    """Destroy the default process group if there is one (safe to call twice)."""
    if is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - at exit, a dead peer must not turn into a second error
            pass


# ---------------------------------------------------------------------- sharding
def shard_sizes(n: int, world: int) -> list[int]:
    """Examples per rank for ``n`` examples over ``world`` ranks: the first ``n % world`` get one more.

    Raises:
        InputError: ``n < world`` (a rank would hold no example).
    """
    if world < 1:
        raise InputError(f"world must be positive, got {world}", param="world")
    if n < world:
        raise InputError(f"{n} examples cannot be split across {world} processes: use at most {n} processes")
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard_range(n: int, world: int, rank_: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank_``'s contiguous shard; the shards tile ``range(n)`` exactly."""
    if not 0 <= rank_ < world:
        raise InputError(f"rank {rank_} is outside 0..{world - 1}")
    sizes = shard_sizes(n, world)
    start = sum(sizes[:rank_])
    return start, start + sizes[rank_]


# ---------------------------------------------------------------------- collectives
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks; every rank receives the same (bitwise) result.

    Returns a new tensor (``t`` is not modified); ``t`` itself in a single process. Cost:
    one all-reduce of ``t.numel()`` elements.
    """
    if not is_initialized() or world_size() == 1:
        return t
    out = t.detach().clone(memory_format=torch.contiguous_format)
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small, picklable), in rank order; ``[obj]`` in a single process."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (small, picklable) on every rank; ``obj`` in a single process."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def reducer() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """:func:`all_reduce_sum` when more than one rank runs, else None (for ``Problem(reduce=...)``)."""
    return all_reduce_sum if is_initialized() and world_size() > 1 else None
