"""The output Jacobian of a :class:`~basins.engine.problem.Problem`, chunk by chunk, for the feature Gram matrix.

The pieces :func:`basins.analyses.features.feature_gram` is built from: how many outputs an
example has, the check that the loss is a mean of per-example terms, the factor ``H_ℓ^{1/2}``
of the loss's Hessian in the outputs, the choice between per-example (``vmap(jacrev)``) and
whole-batch Jacobians, and the factored rows ``H_ℓ^{1/2} J`` over the data. Cost: ``k``
vector-Jacobian products per example (``n·k`` in all). See the module docstring of
:mod:`basins.analyses.features` for the mathematics, and README, "Architecture".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.func import hessian, jacfwd, jacrev, vmap

from basins.engine.batch import Inputs, take
from basins.engine.losses import count_terms
from basins.engine.problem import Problem
from basins.errors import ComputeError, InputError

__all__ = ["JACOBIAN_MODES", "outputs_per_example", "check_separable", "loss_factor", "choose_mode",
           "factored_rows", "jacobian_block"]

#: ``per-example``: ``vmap`` over examples of ``jacrev`` of one example's outputs (k VJPs an
#: example); ``batch``: ``jacrev`` (or ``jacfwd`` when P < outputs) of a whole chunk, for
#: models that only accept their fixed batch size; ``auto``: per-example, else batch.
JACOBIAN_MODES = ("auto", "per-example", "batch")
#: Bytes of one per-example Jacobian block computed at once (bounds vmap's memory).
_JACOBIAN_BLOCK_BYTES = 128 << 20


def outputs_per_example(problem: Problem) -> int:
    """k: the number of output entries of one example of ``problem`` (one forward pass of a chunk)."""
    x, _, m, _ = next(problem.chunks())
    with torch.no_grad():
        out = problem.forward(problem.params, x)
    return int(out[0].numel())


def _example_total(problem: Problem, value: object, y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An example's (or chunk's) loss value as the **sum** of its averaged terms: a ``(sum, count)``
    loss its sum, a token loss its mean × its valid tokens, any other the mean × its examples."""
    if isinstance(value, tuple):
        return value[0]
    assert isinstance(value, torch.Tensor)
    return value * count_terms(problem.loss_name, shape, y, y.shape[0])


def check_separable(problem: Problem) -> None:
    """Require L = Σ over examples of a term that depends on that example alone, over N: true for the
    built-in losses (a mean over examples, or over valid tokens) and checked on the first examples."""
    x, y, m, _ = next(problem.chunks())
    c = min(m, 8)
    with torch.no_grad():
        out = problem.forward(problem.params, x)[:c].to(torch.float64)
        yy = y[:c].to(torch.float64) if y.is_floating_point() else y[:c]
        shape = tuple(out.shape[1:])
        whole = float(_example_total(problem, problem.loss_fn(out, yy), yy, shape))
        parts = sum(float(_example_total(problem, problem.loss_fn(out[i : i + 1], yy[i : i + 1]), yy[i : i + 1],
                                         shape)) for i in range(c))
    if not math.isclose(whole, parts, rel_tol=1e-8, abs_tol=1e-12):
        raise InputError(
            f"the loss {problem.loss_name!r} is not a sum of per-example terms (one-example losses add up to "
            f"{parts!r}, the batch's loss to {whole!r}); the feature Gram matrix needs one: use the nullity "
            "method 'exact' or 'slq'", param="loss"
        )


def loss_factor(problem: Problem, out: torch.Tensor, y: torch.Tensor, notes: list[str]) -> torch.Tensor | float:
    """Per-example symmetric square roots ``S_i`` of ``H_ℓ,i`` ((c, k, k), float64), or a scalar (mse).

    ``H_ℓ,i = ∇²_o s(o_i, y_i) / N`` with ``s`` the sum of example i's averaged terms and N
    (:attr:`~basins.engine.problem.Problem.num_terms`) their total: L = (1/N) Σᵢ s(oᵢ, yᵢ). For
    the token losses s sums over the example's valid tokens, so padded positions get zero rows
    (the Gram matrix over valid tokens).
    """
    N = problem.num_terms
    if problem.loss_name == "mse":
        return math.sqrt(2.0 / N)
    c = out.shape[0]
    shape = tuple(out.shape[1:])
    flat = out.detach().to(torch.float64).reshape(c, -1)
    yy = y.to(torch.float64) if y.is_floating_point() else y

    def one(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = problem.loss_fn(o.reshape(1, *shape), t.unsqueeze(0))
        return v[0] if isinstance(v, tuple) else v

    Hl = vmap(hessian(one))(flat, yy)
    if problem.pair_loss:
        Hl = Hl / N
    else:  # a mean over the example's terms: times its count (0 for an example with no valid token)
        counts = torch.tensor([count_terms(problem.loss_name, shape, yy[i : i + 1], 1) for i in range(c)],
                              dtype=torch.float64, device=Hl.device)
        Hl = Hl * (counts / N).reshape(c, 1, 1)
    Hl = (Hl + Hl.transpose(1, 2)) / 2
    evals, U = torch.linalg.eigh(Hl)
    lo = float(evals.min())
    if lo < -1e-12 * max(float(evals.abs().max()), 1e-300) and not any("not convex" in s for s in notes):
        notes.append(f"the loss is not convex in the outputs here (an output-Hessian eigenvalue {lo:.3g}); "
                     "its negative part was dropped from G")
    return (U * evals.clamp_min(0).sqrt().unsqueeze(1)) @ U.transpose(1, 2)


def choose_mode(problem: Problem, mode: str, notes: list[str]) -> str:
    """``per-example`` if the model runs on single examples under ``vmap`` (tried on two), else ``batch``."""
    if mode == "batch":
        return mode
    x, _, m, _ = next(problem.chunks())
    try:
        jacobian_block(problem, x, 0, min(m, 2), m, "per-example")
        return "per-example"
    except Exception as exc:
        if mode == "per-example":
            raise ComputeError(f"the per-example Jacobian fails for this model: {type(exc).__name__}: {exc}") from exc
        notes.append(f"the model does not run on single examples under vmap ({type(exc).__name__}); "
                     "the Jacobian was computed a whole chunk at a time")
        return "batch"


def factored_rows(
    problem: Problem, k: int, mode: str, notes: list[str], progress: Callable[[int], None]
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_example, rows)`` with rows ``S_i J_i`` ((c·k, P), float64), block by block."""
    P = problem.num_params
    sub = max(1, _JACOBIAN_BLOCK_BYTES // max(1, 8 * k * P))
    start = 0
    for x, y, m, _ in problem.chunks():
        pieces = [(s, min(s + sub, m)) for s in range(0, m, sub)] if mode == "per-example" else [(0, m)]
        for a, b in pieces:
            J, out = jacobian_block(problem, x, a, b, m, mode)
            S = loss_factor(problem, out, y[a:b], notes)
            J = J.to(torch.float64)
            rows = J * S if isinstance(S, float) else torch.bmm(S.to(J.device), J)
            if not bool(torch.isfinite(rows).all()):
                raise ComputeError("the output Jacobian has non-finite entries")
            yield start + a, rows.reshape(-1, P)
            progress(start + b)
        start += m


def jacobian_block(problem: Problem, x: Inputs, a: int, b: int, m: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Output Jacobian ``(b−a, k, P)`` of examples ``a:b`` of chunk ``x`` (a tensor or named inputs;
    ``m`` real examples), and their outputs."""
    params = problem.params
    if mode == "per-example":

        def f1(p: dict[str, torch.Tensor], xi: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
            one = ({k: v.unsqueeze(0) for k, v in xi.items()} if isinstance(xi, dict) else xi.unsqueeze(0))
            o = problem.forward(p, one)[0]
            return o.reshape(-1), o

        jac, out = vmap(jacrev(f1, has_aux=True), in_dims=(None, 0))(params, take(x, a, b))
        return problem.space.flatten(jac), out
    # batch: the whole (possibly padded) chunk at once; reverse mode unless P < outputs
    with torch.no_grad():
        out = problem.forward(params, x)[:m]
    kk = out[0].numel()

    def fb(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return problem.forward(p, x)[:m].reshape(-1)

    jac = jacrev(fb, chunk_size=64)(params) if m * kk <= problem.num_params else jacfwd(fb)(params)
    return problem.space.flatten(jac).reshape(m, kk, -1), out
