"""Open a problem from files, as the command line does: :func:`open_problem`.

One call joins the processes of a ``torchrun`` launch, loads the model, the data and the loss
(:func:`basins.files.loading.resolve_inputs`), gives this process its shard, builds the
:class:`~basins.engine.problem.Problem` and the ``/problem`` record a report keeps about it. The
``basins`` commands and Python users build a problem the same way::

    import basins
    opened = basins.open_problem("model.pt2", data="data.npz", loss="cross-entropy")
    problem = opened.problem            # a basins.Problem
    opened.record["loss_at_optimum"]    # what the report's /problem group holds

Silent, like the rest of the library: what a user should read comes back in
:attr:`OpenedProblem.notes` and :attr:`OpenedProblem.warnings` (the CLI prints them); the
optional ``status`` context manager is entered around the slow phases (a spinner, say).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OpenedProblem", "open_problem", "CRITICAL_GRAD_TOL"]

#: A point whose gradient norm exceeds this (loss units per unit of θ) gets a warning.
CRITICAL_GRAD_TOL = 1e-3


@dataclass
class OpenedProblem:
    """A problem ready to analyse, with what a report records about it.

    Attributes:
        problem: the :class:`~basins.engine.problem.Problem`.
        record: the ``/problem`` record (model and data digests, sizes, loss, dtype, processes, ...).
        notes: informational lines (data streaming, processes, inferred loss, parameters, the problem's size).
        warnings: lines a user should not miss (e.g. θ* is not a critical point).
        setup_counts: the work of opening it (``Counters.as_dict()``: loss, gradient, the
            determinism check, the HVP route choice).
        model: the loaded model (:class:`basins.files.loading.LoadedModel`).
        data: the data as loaded or opened (reusable for the next checkpoint: ``loaded_data=``).
        source: this process' shard of the data (reusable likewise: ``loaded_source=``).
        world_size, rank: the processes of a ``torchrun`` launch (1 and 0 alone).
    """

    problem: Any
    record: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    setup_counts: dict[str, int] = field(default_factory=dict)
    model: Any = None
    data: Any = None
    source: Any = None
    world_size: int = 1
    rank: int = 0


def open_problem(
    model: str,
    *,
    data: str | None = None,
    loss: str | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    max_samples: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    stream: bool = False,
    dtype: str | None = None,
    device: str = "auto",
    hvp_route: str = "auto",
    params: Sequence[str] | None = None,
    include_frozen: bool = False,
    output: str | None = None,
    step: int | None = None,
    loaded_data: Any = None,
    loaded_source: Any = None,
    route_cache: dict[tuple[Any, ...], str] | None = None,
    base_model: str | None = None,
    memory_bytes: int | None = None,
    status: Callable[[str], AbstractContextManager[Any]] | None = None,
) -> OpenedProblem:
    """Load ``model`` (a path), its data and loss, and build the Problem and its ``/problem`` record.

    Args:
        model: a model file or directory (any kind :func:`basins.files.loading.load_model` reads).
        data, loss, arch, trust_pickle, max_samples, seed: as :func:`basins.files.loading.resolve_inputs`.
        batch_size, dtype, device, hvp_route, params, include_frozen: as :class:`basins.Problem`
            (``params``: its globs; ``device`` may be ``auto``).
        stream: read a stream again on every pass (``data_memory_bytes=0``) instead of holding it.
        output: the model output's field (``Problem(output=...)``).
        step: the training step, recorded.
        loaded_data, loaded_source: :attr:`OpenedProblem.data` and :attr:`~OpenedProblem.source`
            of an earlier call on the same data (several checkpoints): not loaded again.
        route_cache: HVP routes chosen by ``auto`` for earlier checkpoints, keyed by parameter
            shapes and options: a hit is reused (not timed again), a miss is recorded.
        base_model: for a peft adapter directory, its base model's local directory (default: the
            one ``adapter_config.json`` names).
        memory_bytes: the memory the run may plan to hold (``Problem(memory_bytes=...)``; None:
            the default share of what is available).
        status: ``status(message)`` is entered around loading and around the first evaluation.

    Returns:
        An :class:`OpenedProblem`. Cost: loading, plus the Problem's set-up (one loss and
        gradient, their determinism check, the HVP route choice).

    Raises:
        InputError: bad files, options or data (messages name the parameter).
    """
    from basins.engine import distributed as dist
    from basins.engine.data import combine_digests
    from basins.engine.problem import Problem, resolve_device
    from basins.engine.streams import StreamSpec
    from basins.files.loading import resolve_inputs, shard_for_process

    phase = status or (lambda message: nullcontext())
    # Under torchrun: join the process group first (backend from this rank's device).
    dev = dist.local_device(device or "auto")
    ctx = dist.init_from_env(resolve_device(dev)) if dist.launched() and dist.env_world_size() > 1 else None
    world, rank = (ctx.world_size, ctx.rank) if ctx is not None else (1, 0)
    with phase("loading model and data" if loaded_data is None else "loading model"):
        loaded, found, loss_spec = resolve_inputs(
            model, data=data, loss=loss, arch=arch, trust_pickle=trust_pickle, max_samples=max_samples, seed=seed,
            stream=True, loaded_data=loaded_data, base_model=base_model,
        )
    n = found.num_examples  # chunk weights use the global n
    notes: list[str] = []
    if loaded.source_dtype:
        notes.append(f"weights stored as {loaded.source_dtype}: upcast to {dtype or 'float32'}"
                     + ("" if dtype else " (dtype='float64' for float64)"))
    shapes = tuple((name, tuple(p.shape), str(p.dtype)) for name, p in loaded.module.named_parameters())
    route_key = (shapes, hvp_route, dtype, batch_size, tuple(params or ()))
    if route_cache is not None and hvp_route == "auto" and route_key in route_cache:
        hvp_route = route_cache[route_key]  # timed on the first checkpoint of the same shapes
        notes.append(f"HVP route {hvp_route} (chosen for the first checkpoint)")
    source = loaded_source if loaded_source is not None else shard_for_process(found, world_size=world, rank=rank)
    with phase("evaluating L(θ*) and ∇L(θ*)"):
        problem = Problem(
            loaded.module, source, None, loss_spec, batch_size=batch_size,
            fixed_batch_size=loaded.fixed_batch_size, dtype=dtype, device=dev,
            hvp_route=hvp_route, total_examples=n,
            data_memory_bytes=0 if stream else None,
            reduce=dist.all_reduce_sum if ctx is not None else None,
            gather=dist.all_gather_object if ctx is not None else None,
            params=list(params or []) or None,
            include_frozen=bool(include_frozen), output=output, memory_bytes=memory_bytes,
        )
    setup_counts = problem.counters.as_dict()
    if route_cache is not None:
        route_cache[route_key] = problem.hvp_route
    streamed = isinstance(found, StreamSpec)
    if isinstance(found, StreamSpec):
        data_sha256 = combine_digests(dist.all_gather_object(problem.data.digest))
        how = "read again on every pass" if problem.streaming else "held in memory after the first pass"
        if problem.streaming and problem.hvp_route == "graph":
            how += "; HVPs reuse the gradient graph, which holds every chunk"
        notes.append(f"data: {n:,} examples streamed from {found.source} in chunks of {problem.batch_size} ({how})")
    else:
        data_sha256 = found.sha256
    rank_examples = [int(k) for k in dist.all_gather_object(problem.num_local_examples)]
    if ctx is not None:
        notes.append(f"data parallel: {ctx.world_size} processes ({ctx.backend}), examples per rank "
                     f"{' + '.join(map(str, rank_examples))} = {sum(rank_examples):,}")
    if loss_spec is None:
        notes.append(f"loss: {problem.loss_name} (inferred from {problem.data_target_dtype} targets; give the loss to change it)")
    selection = problem.selection
    if selection.patterns or selection.frozen:
        notes.append(f"parameters: {selection.describe()}")
    if problem.attention != "sdpa-math" or loaded.kind == "hf":
        notes.append(f"attention: {problem.attention}")
    if problem.promoted_layers:
        more = len(problem.promoted_layers) - 6
        notes.append("float64: the model's requests for float32 in "
                     f"{', '.join(problem.promoted_layers[:6])}{f' and {more} more' if more > 0 else ''} "
                     "are served in float64 (the float64 function it is meant to be)")
    notes.append(
        f"P = {problem.num_params:,} parameters, n = {problem.num_examples:,} examples, "
        f"L(θ*) = {problem.loss_at_optimum:.6g}, ‖∇L(θ*)‖ = {problem.grad_norm:.3g}, "
        f"{str(problem.dtype).replace('torch.', '')} on {problem.device}, HVP route {problem.hvp_route}"
    )
    warnings = []
    if problem.grad_norm > CRITICAL_GRAD_TOL:
        warnings.append(f"‖∇L(θ*)‖ = {problem.grad_norm:.3g} > {CRITICAL_GRAD_TOL:g}: this point is not a critical "
                        "point, so its curvature is not that of a basin's minimum")
    record = {
        "model": str(model), "model_sha256": loaded.sha256, "model_kind": loaded.kind,
        "source_dtype": loaded.source_dtype, "base_model": loaded.base_model,
        "step": step,
        "data": found.source, "data_sha256": data_sha256, "data_streamed": streamed,
        "data_read_every_pass": problem.streaming, "num_params": problem.num_params,
        "num_examples": problem.num_examples, "loss": problem.loss_name,
        "loss_at_optimum": problem.loss_at_optimum, "grad_norm": problem.grad_norm,
        "dtype": str(problem.dtype).replace("torch.", ""), "device": str(problem.device),
        "seed": int(seed), "batch_size": problem.batch_size, "hvp_route": problem.hvp_route,
        "max_samples": max_samples,
        "world_size": len(rank_examples), "rank_examples": rank_examples,
        "dist_backend": ctx.backend if ctx is not None else None,
        # None for the default θ (every trainable parameter, none frozen), so older reports still match
        "params": (" ".join(selection.patterns) or "all trainable") if (selection.patterns or selection.frozen)
        else None,
        "params_frozen": ", ".join(selection.frozen) if selection.frozen else None,
        "num_params_fixed": sum(int(p.numel()) for nm, p in loaded.module.named_parameters()
                                if nm in set(selection.fixed)),
        "num_terms": problem.num_terms, "attention": problem.attention,
        "promoted_to_float64": ", ".join(problem.promoted_layers) or None,
        # the problem's memory plan (route, HVP pieces, what is resident): every command's report holds it;
        # an analysis with its own basis (hessian) completes it and stores the complete one in its group
        "memory_plan": problem.routes.plan.describe(), "memory_budget_bytes": problem.routes.plan.budget,
        "memory_plan_bytes": problem.routes.plan.total,
    }
    return OpenedProblem(problem, record, notes, warnings, setup_counts, loaded, found, source, world, rank)
