"""Minibatch losses and gradients of many parameter vectors at once: what SGLD needs from a Problem.

For C parameter vectors ``θ_c`` (the chains) and C minibatches ``B_c`` of examples, one
``vmap`` over the chain axis gives every chain's minibatch estimate of the full-data mean loss

.. math:: \\hat L_{B_c}(θ_c) = \\sum_r \\frac{n_r}{b_r N} \\, S_{B_{c,r}}(θ_c),

with ``S_B`` the sum of the loss's averaged terms over the examples of ``B`` (valid tokens for
the token losses, the user's count for a loss returning ``(sum, count)``), ``N``
(:attr:`Problem.num_terms`) their number in the whole data, and ``b_r`` of the minibatch drawn
from the ``n_r`` examples of process ``r`` (stratified by shard: one process, ``b`` of ``n``).
It is unbiased for ``L(θ) = (1/N) Σ terms`` whatever the batch's number of terms, and with
``b = n`` it is ``L`` itself.

Everything goes through the Problem: its :meth:`~basins.engine.problem.Problem.forward`
(named inputs, ``ModelOutput`` picking, the differentiable attention path), its loss, the loss
evaluated in float64 on the outputs (as the Problem's own chunks are), its fixed batch size
(pieces are padded to it and the padding dropped), its memory chunk (a minibatch is evaluated
in pieces of at most :attr:`Problem.batch_size` examples per chain, gradients summed) and its
``reduce`` (sums over processes under torchrun, so every process holds the same numbers).
Cost: C minibatch gradients (or losses) per call; nothing is added to ``problem.counters``
(these are minibatch, not full-data, evaluations: :class:`MinibatchLoss` counts its own).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import vmap

from basins.engine.batch import Inputs
from basins.engine.losses import TOKEN_LOSSES, count_terms
from basins.engine.problem import Problem
from basins.errors import InputError

__all__ = ["Batch", "MinibatchLoss", "share_of_minibatch"]

_F64 = torch.float64


def share_of_minibatch(size: int, shard_sizes: Sequence[int]) -> list[int]:
    """Examples each process draws for a global minibatch of ``size``: proportional to its shard
    (largest remainders), at least 1 and at most its shard. ``[min(size, n)]`` in one process."""
    n = sum(shard_sizes)
    size = min(size, n)
    exact = [size * k / n for k in shard_sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: out[i] - exact[i])[: size - sum(out)]:
        out[i] += 1
    return [max(1, min(k, o)) if k else 0 for k, o in zip(shard_sizes, out)]


@dataclass
class Batch:
    """C minibatches of ``size`` examples of this process: ``inputs``/``targets`` ``(C, size, ...)``
    (named inputs: a dict of such), and ``scale``: the estimate is ``scale`` times the batch's sum of terms;
    ``idx`` ``(C, size)``: the examples' indices in this process' shard."""

    inputs: Inputs
    targets: torch.Tensor
    scale: float
    size: int
    idx: torch.Tensor | None = None


def _index(x: Inputs, idx: torch.Tensor) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v[idx] for k, v in x.items()}
    return x[idx]


def _slice(x: Inputs, a: int, b: int) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v[:, a:b] for k, v in x.items()}
    return x[:, a:b]


def _pad(x: Inputs, size: int) -> Inputs:
    """``(C, m, ...)`` → ``(C, size, ...)`` by repeating the first example (fixed-batch exports)."""
    def one(t: torch.Tensor) -> torch.Tensor:
        m = t.shape[1]
        return t if m >= size else torch.cat([t, t[:, :1].expand(t.shape[0], size - m, *t.shape[2:])], dim=1)

    if isinstance(x, Mapping):
        return {k: one(v) for k, v in x.items()}
    return one(x)


class MinibatchLoss:
    """Per-chain minibatch losses and gradients of a Problem (module docstring).

    Args:
        problem: the Problem (data held in memory; a stream is refused).
        size: the global minibatch ``b`` per chain (at most ``n``; one process draws all of it).
        batched: one ``vmap`` over chains; falls back to a loop over chains when the model
            cannot be vmapped (checked on the first call), as :attr:`batched` then says.

    Attributes:
        local_size: ``b_r``, the examples this process contributes to each minibatch.
        num_grads, num_losses: minibatch gradients / losses evaluated (one per chain per call).

    Raises:
        InputError: the data are streamed, or ``size < 1``.
    """

    def __init__(self, problem: Problem, size: int, *, batched: bool = True) -> None:
        if size < 1:
            raise InputError(f"minibatch must be ≥ 1, got {size}", param="minibatch")
        if problem.data.streamed:
            raise InputError(f"SGLD draws random minibatches, which needs the data in memory; {problem.data.source} "
                             "is streamed (set stream=False, and max_samples to hold fewer examples)", param="stream")
        self.problem = problem
        from basins.engine.distributed import rank

        shards = [int(k) for k in problem.gather(problem.num_local_examples)]
        self.size = min(int(size), problem.num_examples)
        self.local_size = share_of_minibatch(self.size, shards)[rank() if len(shards) > 1 else 0]
        self._inputs = problem.inputs
        targets = problem.targets  # floating targets in float64 once: the loss is evaluated in float64
        self._targets = targets.to(_F64) if targets.is_floating_point() else targets
        n_r = problem.num_local_examples
        #: L̂_B = scale · S_B on this process (module docstring)
        self.scale = n_r / (self.local_size * float(problem.num_terms)) if self.local_size else 0.0
        self.batched = batched
        self._checked = False
        self.num_grads = 0
        self.num_losses = 0
        self._fixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # θ, sums, known
        self._whole: torch.Tensor | None = None
        self._coefs: dict[tuple[int, int, float], torch.Tensor] = {}
        self._losses: dict[int, Callable[[dict[str, torch.Tensor], Inputs, torch.Tensor], torch.Tensor]] = {}

    # ------------------------------------------------------------------ batches
    def draw(self, generators: Sequence[torch.Generator]) -> Batch:
        """One minibatch per generator (chain): ``b_r`` examples of this process without replacement
        (all of them, in order, when ``b_r`` is the whole shard; no random numbers are drawn then)."""
        n_r, b = self.problem.num_local_examples, self.local_size
        if b >= n_r:
            idx = torch.arange(n_r).expand(len(generators), n_r)
        else:
            idx = torch.stack([torch.randperm(n_r, generator=g)[:b] for g in generators])
        return self.batch_at(idx)

    def batch_at(self, idx: torch.Tensor, scale: float | None = None) -> Batch:
        """The batch of this process' examples ``idx (C, m)``; ``scale`` replaces :attr:`scale`
        (1.0 gives each chain's sum of terms ``S_B``)."""
        dev_idx = idx.to(self.problem.device)
        return Batch(_index(self._inputs, dev_idx), self._targets[dev_idx], self.scale if scale is None else scale,
                     int(idx.shape[1]), idx.cpu())

    def _coef(self, y: torch.Tensor, m: int, scale: float) -> torch.Tensor:
        """``(C,)``: the factor turning the loss's value on a piece of ``m`` examples per chain (targets
        ``y (C, m, ...)``) into its share of the chain's estimate (its sum of terms times ``scale``).
        Kept for the next step unless it depends on the targets (token losses count valid tokens)."""
        C = y.shape[0]
        if self.problem.loss_name in TOKEN_LOSSES and not self.problem.pair_loss:
            coef = torch.tensor([scale * count_terms(self.problem.loss_name, (), y[c], m) for c in range(C)],
                                dtype=_F64)
            return coef.to(self.problem.device)
        key = (C, m, scale)
        if key not in self._coefs:
            per = scale if self.problem.pair_loss else scale * m * self.problem.terms_per_example
            self._coefs[key] = torch.full((C,), per, dtype=_F64).to(self.problem.device)
        return self._coefs[key]

    # ------------------------------------------------------------------ losses
    def _piece(self, m: int) -> Callable[[dict[str, torch.Tensor], Inputs, torch.Tensor], torch.Tensor]:
        if m not in self._losses:
            self._losses[m] = self._make_piece(m)
        return self._losses[m]

    def _make_piece(self, m: int) -> Callable[[dict[str, torch.Tensor], Inputs, torch.Tensor], torch.Tensor]:
        """The loss's value (float64) on a piece of ``m`` examples of one chain at ``params`` (the
        model's tensors, ``{name: (*shape)}``)."""
        problem = self.problem

        def loss(params: dict[str, torch.Tensor], x: Inputs, y: torch.Tensor) -> torch.Tensor:
            out = problem.forward(params, x)
            if out.shape[0] != m:  # padded for a fixed-batch export
                out = out[:m]
            if out.is_floating_point() and out.dtype != _F64:  # the loss in float64 (floating targets already are)
                out = out.to(_F64)
            value = problem.loss_fn(out, y)
            total = value[0] if isinstance(value, tuple) else value
            return total if total.dtype == _F64 else total.to(_F64)

        return loss

    def _pieces(self, batch: Batch) -> list[tuple[int, Inputs, torch.Tensor, torch.Tensor]]:
        chunk = self.problem.batch_size
        fixed = self.problem.fixed_batch_size
        out = []
        if batch.size <= chunk and not fixed:  # one piece: the batch itself
            return [(batch.size, batch.inputs, batch.targets, self._coef(batch.targets, batch.size, batch.scale))]
        for a in range(0, batch.size, chunk):
            b = min(batch.size, a + chunk)
            x = _slice(batch.inputs, a, b)
            y = batch.targets[:, a:b]
            out.append((b - a, _pad(x, fixed) if fixed else x, y, self._coef(y, b - a, batch.scale)))
        return out

    def _run(self, thetas: torch.Tensor, batch: Batch, with_grad: bool, reduce: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        C = thetas.shape[0]
        space = self.problem.space
        values: torch.Tensor | None = None
        grads: torch.Tensor | None = None
        for m, x, y, coef in self._pieces(batch):
            f = self._piece(m)
            if with_grad:  # per-chain gradients of the sum over chains (chains do not interact)
                leaf = thetas.detach().requires_grad_(True)  # unflatten splits it once: an O(P) backward
                v = self._apply(f, space.unflatten(leaf), x, y) * coef
                (g,) = torch.autograd.grad(v.sum(), leaf)
                grads = g if grads is None else grads + g
            else:
                v = self._apply(f, space.unflatten(thetas), x, y) * coef
            values = v.detach() if values is None else values + v.detach()
        if values is None:  # an empty batch
            values = torch.zeros(C, dtype=_F64, device=thetas.device)
            grads = torch.zeros_like(thetas) if with_grad else None
        if reduce and self.problem.distributed:
            if grads is None:
                values = self.problem.reduce(values)
            else:  # one collective for both, in float64 (the values keep their precision)
                both = self.problem.reduce(torch.cat([values[:, None], grads.to(_F64)], 1))
                values, grads = both[:, 0], both[:, 1:].to(thetas.dtype)
        if with_grad:
            self.num_grads += C
        else:
            self.num_losses += C
        return values, grads

    def _apply(self, fn: Callable[..., torch.Tensor], params: dict[str, torch.Tensor], x: Inputs, y: torch.Tensor
               ) -> torch.Tensor:
        """``fn`` of each chain's tensors ``params {name: (C, *shape)}`` and batch: ``(C,)``."""
        if self.batched:
            try:
                res = vmap(fn)(params, x, y)
                self._checked = True
                return res
            except Exception:  # noqa: BLE001 - a model vmap cannot trace: loop over chains
                if self._checked:
                    raise
                self.batched = False
        C = next(iter(params.values())).shape[0]
        return torch.stack([fn({k: t[c] for k, t in params.items()}, _index_chain(x, c), y[c]) for c in range(C)])

    def value_and_grad(self, thetas: torch.Tensor, batch: Batch, *, reduce: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L̂_B(θ_c) (C,) float64, ∇L̂_B(θ_c) (C, P))`` for ``thetas (C, P)``. Cost: C minibatch gradients."""
        with torch.enable_grad():
            v, g = self._run(thetas, batch, True, reduce)
        assert g is not None
        return v, g

    def value(self, thetas: torch.Tensor, batch: Batch, *, reduce: bool = True) -> torch.Tensor:
        """``L̂_B(θ_c)``, ``(C,)`` float64. Cost: C minibatch losses (no gradient)."""
        with torch.no_grad():
            return self._run(thetas, batch, False, reduce)[0]


    def value_fixed(self, theta: torch.Tensor, batch: Batch, *, reduce: bool = True) -> torch.Tensor:
        """``L̂_B(θ)`` ``(C,)`` for one fixed ``θ (P,)`` (SGLD's w*) on every chain's batch, from each
        example's sum of terms at θ, computed the first time the example is drawn and kept (``(n_r,)``
        float64): after the first sweeps over the data no forward pass is left. With the whole shard
        as the batch, the batch's value itself is kept. Equal to :meth:`value` up to rounding (the
        examples' sums are formed one example at a time). The sums are kept for the tensor ``θ`` (or an
        equal one): change it in place and they are stale. Cost: at most ``n_r`` one-example losses
        in all, in pieces of at most ``C·b``."""
        C = batch.targets.shape[0]
        if batch.idx is None:
            return self.value(theta.expand(C, -1), batch, reduce=reduce)
        if self._fixed is None or not (self._fixed[0] is theta or torch.equal(self._fixed[0], theta)):
            n_r = self.problem.num_local_examples
            self._fixed = (theta, torch.full((n_r,), math.nan, dtype=_F64),
                           torch.zeros(n_r, dtype=torch.bool))
            self._whole = None
        _, sums, known = self._fixed
        idx = batch.idx
        if batch.size >= self.problem.num_local_examples:  # the same batch every step: keep its value
            if self._whole is None or self._whole.shape[0] != C:
                self._whole = self._run(theta.expand(C, -1), batch, False, False)[0]
            values = self._whole
        else:
            need = torch.unique(idx[~known[idx]])
            piece = max(1, C * batch.size)
            for a in range(0, int(need.numel()), piece):
                part = need[a : a + piece]
                one = self.batch_at(part[:, None], scale=1.0)  # one chain per example: its sum of terms
                sums[part] = self._run(theta.expand(part.numel(), -1), one, False, False)[0].cpu()
                known[part] = True
            values = batch.scale * sums[idx].sum(1)
        values = values.to(theta.device, copy=True)  # the kept value is never handed out (reduce may work in place)
        return self.problem.reduce(values) if reduce else values


def _index_chain(x: Inputs, c: int) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v[c] for k, v in x.items()}
    return x[c]
