"""SGLD chains on the localized tempered posterior, with the step-size rule that survives singular points.

The chains sample ``p(w) ∝ exp(−U(w))``, ``U(w) = nβ·L(w) + (γ/2)‖w − w*‖²`` (restricted to a
block of coordinates by ``mask``), by

    w ← w − (ε/2)·G·∇Û(w) + ½√(εG)·(ξₜ + ξₜ₊₁),   Û = nβ·L̂_B + (γ/2)‖w − w*‖²,

the Leimkuhler–Matthews scheme (Leimkuhler & Matthews 2013, "Rational construction of stochastic
numerical methods for molecular sampling", AMRX; Leimkuhler, Matthews & Stoltz 2016, IMA J.
Numer. Anal. 36(1)): the same drift and cost as SGLD's Euler step w − (ε/2)G∇Û + √(εG)ξ, but
each step's noise is the mean of two consecutive draws. On a quadratic direction of curvature a
its stationary variance is exactly 1/a for every stable ε (εa < 4), where Euler's is
1/(a(1 − εa/4)) (λ̂ biased up by εa/4 there); the bias left is O(ε²) (plus the minibatch
noise's). That is what lets the rule below take ε = 1/a and a MALA target 0.8 instead of 0.1/a and 0.95: measured on the
analytic cases (tests/test_llc_analytic.py), a regular linear regression gives λ = 2.5 to
−0.9 ± 2% with this scheme at the rule's ε (Euler acceptance 0.90) and −1.4 ± 1.8% at 2.5× it
(acceptance 0.63), where Euler steps at 0.3/a give +6%; singular chains relax 3–5× faster. The MALA check stays that of the Euler proposal at the same ε and fresh noise ξₜ₊₁ (a
conservative measure of the local discretisation error).

``L̂_B`` the chain's unbiased minibatch estimate (:mod:`basins.engine.minibatch`), ``G = 1`` (SGLD)
or an RMSProp preconditioner fixed after the first half of burn-in (Li et al. 2016).

Step-size rule (``auto``; :data:`STEP_RULE` is the text ``--help`` and the README print):
ε = 1/a, a the largest curvature of U (times G) met so far: at w* by Lanczos on nβH + γ, then
at each chain's own position by power iteration on its minibatch Hessian (forward differences
of ∇Û) at the start and at 8 checkpoints of burn-in (ε only decreases). During burn-in ε also
backs off ×0.7 per 100 steps in which a chain's MALA acceptance (every 4th step, same
minibatch) is below 0.8, and a chain whose loss, gradient or parameters become non-finite, or
that leaves γ‖w − w*‖² ≤ 4·(dim + 10) (thrown out by an unstable step: the prior alone has
mass < e^{−1.5·(dim + 10)} there), has its ε halved and restarts from its start point (recorded). At the end of burn-in ε is frozen at
the smallest over chains, for every chain and draw. A divergence during the draws halves ε,
restarts the chain and the burn-in, discarding the draws (recorded). A given ε is used as is;
a divergence then ends the run.

Starts: chain c starts at ``w* + r_c·u_c``, ``u_c`` a random unit direction and ``r_c ≤ 1/√γ``
(the localization scale), halved until ``nβ(L̂_B(w) − L̂_B(w*)) ≤ P/2`` so that no chain starts
in a wall; dispersed starts let R-hat see a transient the chains would otherwise share.

Seeds: chain c of seed s draws its noise, its minibatches (per process) and its start from
``numpy.random.SeedSequence(s).spawn(C)[c]``'s children, so chains of different seeds never share
a stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from basins.engine.minibatch import Batch, MinibatchLoss
from basins.errors import ComputeError
from basins.progress import Progress, ProgressCallback

__all__ = ["Chains", "Restart", "STEP_RULE", "STEP_FACTOR", "ACCEPT_TARGET", "MALA_EVERY"]

STEP_FACTOR = 1.0
ACCEPT_TARGET = 0.8
BACKOFF = 0.7
WINDOW = 100
MALA_EVERY_BURNIN = 4
MALA_EVERY = 20
CHECKPOINTS = 8
POWER_ITERS = 8
MAX_RESTARTS = 12
RADIUS_CAP = 4.0
DIVERGED = "non-finite loss, gradient or parameters, or γ‖w − w*‖² > 4·(dim + 10)"

STEP_RULE = (
    "auto: ε = 1/a, a the largest curvature of nβ·L + γ‖w − w*‖²/2 met so far (Lanczos at w*, then "
    "power iteration on each chain's minibatch Hessian at its start and at 8 points of burn-in); during "
    "burn-in ε backs off ×0.7 per 100 steps with MALA acceptance < 0.8, and a divergence (non-finite, or γ‖w − w*‖² > 4(dim + 10)) halves the "
    "chain's ε and restarts it; ε is then frozen (smallest over chains) for the draws; Leimkuhler–Matthews "
    "steps (no O(ε) bias on quadratic directions)"
)

_F64 = torch.float64


@dataclass
class Restart:
    """A chain restarted: which, in which phase and step, why, and its new ε."""

    chain: int
    phase: str
    step: int
    reason: str
    step_size: float


class Diverged(Exception):
    def __init__(self, chain: int, step: int) -> None:
        super().__init__(f"chain {chain} diverged at step {step}")
        self.chain, self.step = chain, step


def _squares(x: torch.Tensor) -> torch.Tensor:
    """``‖x_c‖²`` of each row of ``x (C, P)`` in float64, ``(C,)``, one row at a time (a (P,) float64 transient)."""
    return torch.stack([row.to(_F64).square().sum() for row in x])


def _torch_seed(ss: np.random.SeedSequence) -> int:
    return int(ss.generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


@dataclass
class _Window:
    acc: torch.Tensor
    count: int = 0


@dataclass
class Chains:
    """C chains advancing together (see the module docstring).

    Args:
        mb: the minibatch losses; w_star: ``(P,)``; num_chains: C; nbeta, gamma: nβ, γ;
        seed: the run's seed; mask: ``(P,)`` 1 on the sampled coordinates (None: all);
        sampler: ``sgld`` or ``rmsprop``; step_size: a given ε (None: the auto rule);
        lambda_max: the largest eigenvalue of H at w* (auto rule's first a = nβ·λ_max + γ).
    """

    mb: MinibatchLoss
    w_star: torch.Tensor
    num_chains: int
    nbeta: float
    gamma: float
    seed: int
    mask: torch.Tensor | None
    sampler: str
    step_size: float | None
    lambda_max: float
    callback: ProgressCallback | None = None
    restarts: list[Restart] = field(default_factory=list)
    curvatures: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        from basins.engine.distributed import rank

        C, P = self.num_chains, self.w_star.numel()
        dev, dt = self.w_star.device, self.w_star.dtype
        kids = np.random.SeedSequence(self.seed).spawn(C)
        parts = [k.spawn(3) for k in kids]
        self._noise = [torch.Generator().manual_seed(_torch_seed(p[0])) for p in parts]
        self._data = [torch.Generator().manual_seed(_torch_seed(
            np.random.SeedSequence(p[1].entropy, spawn_key=(*p[1].spawn_key, rank())))) for p in parts]
        self._aux = [torch.Generator().manual_seed(_torch_seed(p[2])) for p in parts]
        self.m = (self.mask if self.mask is not None else torch.ones(P)).to(dev, dt).expand(C, P)
        self._masked = self.mask is not None  # False: the products by m (all ones) are skipped
        self._preconditioned = self.sampler != "sgld"  # False: G stays 1 and its products are skipped
        self.dim = int(self.m[0].sum())
        self.auto = self.step_size is None
        a0 = self.nbeta * max(self.lambda_max, 0.0) + self.gamma
        self.initial_step = STEP_FACTOR / a0 if self.auto else float(self.step_size)  # type: ignore[arg-type]
        self.eps = torch.full((C,), self.initial_step, dtype=_F64, device=dev)
        # RMSProp's preconditioner and second moment; SGLD's G is 1 (a scalar: no (C, P) arrays)
        pre = self._preconditioned
        self.G: torch.Tensor = torch.ones((C, P) if pre else (), dtype=dt, device=dev)
        self.V: torch.Tensor = torch.zeros(C, P, dtype=dt, device=dev) if pre else self.G
        self.start = self._dispersed_starts()
        self.w = self.start.clone()
        self._xi = self._randn(self._noise)
        if self.auto:  # the curvature at the starts, before the first step
            batch = self.draw()
            self._check_curvature(batch, self.grad_u(self.w, batch)[0])
        self.acc_sum = torch.zeros(C, dtype=_F64)
        self.acc_n = 0
        self.steps_done = 0  # per chain, every phase

    # ------------------------------------------------------------------ pieces
    def _randn(self, gens: list[torch.Generator]) -> torch.Tensor:
        P = self.w_star.numel()
        z = torch.empty(len(gens), P, dtype=self.w_star.dtype, device=self.w_star.device)
        for row, g in zip(z, gens):  # drawn in float64 on the CPU, one chain at a time
            row.copy_(torch.randn(P, generator=g, dtype=_F64))
        return z * self.m if self._masked else z

    def draw(self) -> Batch:
        return self.mb.draw(self._data)

    def grad_u(self, w: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(∇Û(w) (C, P) masked, L̂_B(w) (C,))``. Cost: C minibatch gradients."""
        lv, g = self.mb.value_and_grad(w, batch)
        gU = torch.add(self.nbeta * g, w - self.w_star, alpha=self.gamma)
        return (gU * self.m if self._masked else gU), lv

    def u_of(self, w: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        return self.nbeta * lv + 0.5 * self.gamma * _squares(w - self.w_star)

    def _dispersed_starts(self) -> torch.Tensor:
        C = self.num_chains
        u = self._randn(self._aux)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
        frac = torch.stack([torch.rand((), generator=g, dtype=_F64) for g in self._aux]) ** (1.0 / max(self.dim, 1))
        r = (frac / math.sqrt(self.gamma)).to(u.device)
        batch = self.draw()
        ws = self.w_star.expand(C, -1)
        l0 = self.mb.value(ws, batch)
        for _ in range(60):
            w = ws + r[:, None].to(u.dtype) * u
            excess = self.nbeta * (self.mb.value(w, batch) - l0)
            bad = ~(excess <= self.dim / 2)
            if not bool(bad.any()):
                break
            r = torch.where(bad, r / 2, r)
        self.start_radius = r.tolist()
        return w.detach()

    def curvature(self, batch: Batch, gU: torch.Tensor) -> torch.Tensor:
        """Largest |eigenvalue| of ``G½ ∇²Û_B G½`` at each chain's position (``(C,)`` float64), by
        :data:`POWER_ITERS` power iterations on forward differences of ∇Û. Cost: that many C gradients."""
        sq = self.G.sqrt()
        v = self._randn(self._aux)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        delta = math.sqrt(torch.finfo(self.w.dtype).eps) * self.w.norm(dim=1).clamp_min(1.0)
        lam = torch.zeros(self.num_chains, dtype=_F64, device=self.w.device)
        for _ in range(POWER_ITERS):
            g1, _ = self.grad_u(self.w + delta[:, None] * sq * v, batch)
            hv = sq * (g1 - gU) / delta[:, None] * self.m
            norm = hv.norm(dim=1)
            lam = norm.to(_F64)
            v = hv / norm[:, None].clamp_min(1e-300)
            if not bool(torch.isfinite(v).all()):
                break
        return torch.where(torch.isfinite(lam), lam, torch.full_like(lam, math.inf))

    def _check_curvature(self, batch: Batch, gU: torch.Tensor, reset: bool = False) -> None:
        lam = self.curvature(batch, gU)
        self.curvatures.append(float(lam.max()))
        target = STEP_FACTOR / lam
        target = torch.where(torch.isfinite(lam), target, self.eps / 2)
        self.eps = target if reset else torch.minimum(self.eps, target)

    def _restart(self, c: int, phase: str, step: int, reason: str) -> None:
        self.eps[c] = self.eps[c] / 2
        self.w[c] = self.start[c]
        self.restarts.append(Restart(c, phase, step, reason, float(self.eps[c])))
        if sum(r.chain == c for r in self.restarts) > MAX_RESTARTS:
            raise ComputeError(
                f"SGLD chain {c} diverged {MAX_RESTARTS + 1} times although its step size was halved each time "
                f"(now {float(self.eps[c]):.3g}); the loss may be unbounded below near w*, or not finite: use a "
                f"larger gamma (now {self.gamma:.3g})")

    def _inside(self, w: torch.Tensor) -> torch.Tensor:
        """``(C,)`` bool on the CPU: finite and ``γ‖w − w*‖² ≤ RADIUS_CAP·(dim + 10)``: outside, the
        localizing prior alone has mass < exp(−(RADIUS_CAP − 1)·(dim + 10)/2), so a chain there has
        not sampled its way out but been thrown out by an unstable step (diverged)."""
        r = torch.linalg.vector_norm(w - self.w_star, dim=-1).to(_F64)
        return (r.square() <= RADIUS_CAP * (self.dim + 10) / self.gamma).cpu()  # False where r is NaN or inf

    def _step(self, gU: torch.Tensor) -> torch.Tensor:
        """One Leimkuhler–Matthews step (sets ``self._xi_next``; the caller commits it on success)."""
        self._xi_next = self._randn(self._noise)
        if self._preconditioned:
            eG = self.eps.to(self.w.dtype)[:, None] * self.G
            return self.w - 0.5 * eG * gU + 0.5 * eG.sqrt() * (self._xi + self._xi_next)
        e = self.eps.to(self.w.dtype)[:, None]
        return torch.addcmul(self.w, e, gU, value=-0.5).addcmul_(e.sqrt(), self._xi + self._xi_next, value=0.5)

    def _euler(self, gU: torch.Tensor) -> torch.Tensor:
        """The Euler–Maruyama (SGLD) proposal at this ε with the step's fresh noise: what MALA checks."""
        e = self.eps.to(self.w.dtype)[:, None]
        return self.w - 0.5 * e * self.G * gU + (e * self.G).sqrt() * self._xi_next

    def _mala(self, w_new: torch.Tensor, gU: torch.Tensor, lv: torch.Tensor, batch: Batch) -> torch.Tensor:
        """MALA acceptance probability ``(C,)`` of the SGLD move ``w → w_new`` on the same minibatch."""
        gU2, lv2 = self.grad_u(w_new, batch)
        e = self.eps.to(self.w.dtype)[:, None]
        if self._preconditioned:
            Gs = (self.G * self.m + (1 - self.m)).sqrt()  # masked coordinates do not move: any G > 0
            fwd = _squares((w_new - self.w + 0.5 * e * self.G * gU) / Gs)
            bwd = _squares((self.w - w_new + 0.5 * e * self.G * gU2) / Gs)
        else:
            fwd = _squares(torch.addcmul(w_new - self.w, e, gU, value=0.5))
            bwd = _squares(torch.addcmul(self.w - w_new, e, gU2, value=0.5))
        log_a = -self.u_of(w_new, lv2) + self.u_of(self.w, lv) + (fwd - bwd) / (2 * self.eps)
        a = torch.exp(torch.clamp(log_a, max=0.0))
        return torch.where(torch.isfinite(a), a, torch.zeros_like(a)).cpu()

    def _progress(self, phase: str, done: int, total: int) -> None:
        if self.callback is not None:
            self.callback(Progress("sgld", done, total, "steps", info=f"{self.num_chains} chains, {phase}"))

    # ------------------------------------------------------------------ phases
    def burnin(self, steps: int, *, adapt: bool, progress: tuple[int, int] = (0, 0)) -> None:
        """``steps`` steps discarded; with ``adapt`` (auto ε, first burn-in) the rule of the module
        docstring, then ε frozen. Raises :class:`Diverged` only for a given ε."""
        C = self.num_chains
        checks = {round(k * steps / CHECKPOINTS) for k in range(1, CHECKPOINTS + 1)} - {steps} if adapt else set()
        adapt_until = steps // 2 if (self.sampler == "rmsprop" and adapt) else -1
        window = _Window(torch.zeros(C, dtype=_F64))
        for t in range(steps):
            batch = self.draw()
            gU, lv = self.grad_u(self.w, batch)
            ok = torch.isfinite(lv).cpu() & torch.isfinite(gU).all(1).cpu()
            if adapt and t in checks and bool(ok.all()):
                self._check_curvature(batch, gU)
            if t < adapt_until:
                self.V = gU**2 if t == 0 else 0.99 * self.V + 0.01 * gU**2
            elif t == adapt_until and t > 0:
                G = 1.0 / (1e-8 + self.V.sqrt())
                self.G = G / G.amax(dim=1, keepdim=True)
                self._check_curvature(batch, gU, reset=True)
            w_new = self._step(gU)
            ok &= self._inside(w_new)
            if adapt and t % MALA_EVERY_BURNIN == 0 and bool(ok.all()):
                window.acc += self._mala(self._euler(gU), gU, lv, batch)
                window.count += 1
            self.w = torch.where(ok[:, None].to(self.w.device), w_new, self.w)
            self._xi = self._xi_next
            for c in (~ok).nonzero().flatten().tolist():
                if not adapt:
                    raise Diverged(c, t)
                self._restart(c, "burn-in", t, DIVERGED)
            if adapt and (t + 1) % WINDOW == 0 and window.count:
                low = window.acc / window.count < ACCEPT_TARGET
                self.eps = torch.where(low.to(self.eps.device), self.eps * BACKOFF, self.eps)
                window = _Window(torch.zeros(C, dtype=_F64))
            self.steps_done += 1
            self._progress("burn-in", progress[0] + t + 1, progress[1])
        if adapt:
            self.eps = torch.full_like(self.eps, float(self.eps.min()))

    def draws(self, steps: int, *, progress: tuple[int, int] = (0, 0)
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``steps`` kept steps: ``(traces (C, steps), losses (C, steps), below)`` with the trace
        ``nβ·(L̂_B(w) − L̂_B(w*))`` on each step's minibatch and ``below`` the count of draws with
        ``L̂_B(w) < L̂_B(w*)``. Raises :class:`Diverged` on a non-finite chain."""
        C = self.num_chains
        values = torch.zeros(2, C, steps, dtype=_F64)  # L̂_B(w), L̂_B(w*) of each step's minibatch
        for t in range(steps):
            batch = self.draw()
            gU, lv = self.grad_u(self.w, batch)
            l0 = self.mb.value_fixed(self.w_star, batch)
            w_new = self._step(gU)
            ok = torch.isfinite(lv).cpu() & self._inside(w_new)  # a non-finite ∇Û makes w_new so
            if not bool(ok.all()):
                raise Diverged(int((~ok).nonzero()[0, 0]), t)
            values[0, :, t] = lv
            values[1, :, t] = l0
            if t % MALA_EVERY == 0:
                self.acc_sum += self._mala(self._euler(gU), gU, lv, batch)
                self.acc_n += 1
            self.w = w_new
            self._xi = self._xi_next
            self.steps_done += 1
            self._progress("draws", progress[0] + t + 1, progress[1])
        d = values[0] - values[1]
        return self.nbeta * d, values[0].clone(), int((d < 0).sum())

    def after_divergence(self, err: Diverged) -> None:
        """A divergence in the draws (auto ε): halve every chain's ε, restart the chain (recorded)."""
        self.eps = self.eps / 2
        self.eps[err.chain] = self.eps[err.chain] * 2  # _restart halves it once more
        self._restart(err.chain, "draws", err.step, DIVERGED)
        self.acc_sum.zero_()
        self.acc_n = 0

    @property
    def acceptance(self) -> float:
        return float(self.acc_sum.mean() / self.acc_n) if self.acc_n else math.nan

