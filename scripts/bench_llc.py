"""LLC throughput and agreement vs devinterp 2.x, and evidence exact vs SLQ (run: python scripts/bench_llc.py [--large]).

Same model (an MLP regression, float32), data, and hyperparameters (ε = lr, γ = localization,
nβ, 4 chains, draws, burn-in, batch size) for basins and devinterp 2.x's ``llc``
(:func:`devinterp_row`); prints SGLD steps/s (all chains) and λ̂ ± SE for each,
and basins batched (vmap over chains) vs a loop over chains. Then the evidence of the example
MLP of ``bench_hessian`` (scripts/_bench.py) by the dense log det and by SLQ: wall time and error.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from basins.analyses.evidence import evidence
from basins.analyses.llc import llc
from basins.engine.problem import Problem


def llc_case(chains: int = 4, draws: int = 400) -> None:
    torch.manual_seed(0)
    n, d = 2048, 8
    X = torch.randn(n, d)
    teacher = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        Y = teacher(X) + 0.05 * torch.randn(n, 1)
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))
    model.load_state_dict(teacher.state_dict())
    eps, gamma, nbeta, burnin, b = 1e-4, 100.0, n / math.log(n), 100, 64
    problem = Problem(model, X, Y, loss="mse")
    rows = []
    for batched in (True, False):
        t0 = time.perf_counter()
        r = llc(problem, num_chains=chains, num_draws=draws, num_burnin=burnin, nbeta=nbeta, gamma=gamma,
                step_size=eps, batch_size=b, seed=0, batched=batched, gamma_bias=False)
        wall = time.perf_counter() - t0
        rows.append((f"basins ({'vmap' if batched else 'loop'})", chains * (draws + burnin) / wall, r.llc, r.llc_stderr))
    try:
        rows.append(devinterp_row(model, X, Y, eps=eps, gamma=gamma, nbeta=nbeta, chains=chains, draws=draws,
                                  burnin=burnin, batch_size=b))
    except Exception as exc:  # noqa: BLE001 - report, do not hide the basins numbers
        print(f"devinterp failed: {type(exc).__name__}: {exc}")
    print(f"LLC, MLP P={problem.num_params}, n={n}, ε={eps}, γ={gamma}, nβ={nbeta:.1f}, batch {b}, "
          f"{chains} chains × ({burnin}+{draws})")
    for name, sps, est, se in rows:
        print(f"  {name:18s} {sps:9.1f} steps/s   λ̂ = {est:.3f} ± {se:.3f}")
    base = next((r for r in rows if r[0].startswith("devinterp")), None)
    if base is not None:
        print(f"  throughput ratio basins(vmap)/devinterp: {rows[0][1] / base[1]:.2f}×")


def devinterp_row(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, eps: float, gamma: float, nbeta: float,
                  chains: int, draws: int, burnin: int, batch_size: int) -> tuple[str, float, float, float]:
    """devinterp 2.x (``devinterp.slt.llc.llc``) on the same problem and hyperparameters.

    devinterp 2.x samples a Hugging Face ``Dataset`` of ``input_ids`` with a per-token loss
    ``(model, input_ids) -> (batch, seq - 1)``: each row here holds an example's index twice, and
    the loss looks the example up, so its SGLD sees the same minibatches of (x, y) as basins'.
    Its own estimate averages every step, burn-in included (``compute_llc``); the row reports
    ``nβ·(mean over the draws after burn-in − init_loss)``, as basins does, from its loss trace.
    Its chains get independent minibatch orders (``match_sampling_input_ids_across_chains=False``),
    as basins' do, so that the spread across chains is an honest standard error.
    Wall time is devinterp's whole call (its zarr writing included).
    """
    import tempfile

    from datasets import Dataset
    from devinterp.slt.llc import llc as devinterp_llc

    n = X.shape[0]
    rows = Dataset.from_dict({"input_ids": [[i, i] for i in range(n)]}).with_format("torch")

    def per_example_loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        idx = ids[:, 0].long()
        return ((m(X[idx]) - Y[idx]) ** 2).mean(1, keepdim=True)

    t0 = time.perf_counter()
    out = devinterp_llc(model, rows, {}, lr=eps, n_beta=nbeta, localization=gamma, num_chains=chains,
                        num_draws=draws, num_burnin_steps=burnin, batch_size=batch_size, loss_fn=per_example_loss,
                        device="cpu", init_seed=0, match_sampling_input_ids_across_chains=False, output_path=tempfile.mkdtemp(prefix="devinterp-") + "/s.zarr")
    wall = time.perf_counter() - t0
    trace = torch.as_tensor(out.loss_trace.values, dtype=torch.float64)[:, burnin:]
    per_chain = nbeta * (trace.mean(1) - float(out.init_loss.values))
    return ("devinterp 2.x", chains * (draws + burnin) / wall, float(per_chain.mean()),
            float(per_chain.std()) / math.sqrt(chains))


def evidence_case(large: bool) -> None:
    """Exact (dense float64 log det: P HVPs and a Cholesky) vs SLQ evidence: on the example MLP, or
    with ``large`` on the 26k-parameter MLP of ``bench_hessian`` (n = 2,048; minutes, 5 GB)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    if large:
        from _bench_problems import make

        model, x, y = make("mlp")
        problem = Problem(model, x, y, loss="cross-entropy")
        label = f"26k MLP of bench_hessian (P={problem.num_params:,}, n={problem.num_examples:,})"
    else:
        from _bench import example_problem

        label, problem = example_problem()
    out = {}
    for method in ("exact", "slq"):
        t0 = time.perf_counter()
        r = evidence(problem, prior_precision=1.0, method=method, curvature="ggn")
        out[method] = (time.perf_counter() - t0, r)
    (te, e), (ts, s) = out["exact"], out["slq"]
    print(f"evidence, {label}, δ = 1, ggn")
    print(f"  exact: {te:.1f} s, log det {e.logdet:.2f}")
    print(f"  slq:   {ts:.1f} s, log det {s.logdet:.2f} [{s.logdet_ci[0]:.2f}, {s.logdet_ci[1]:.2f}], "
          f"error {s.logdet - e.logdet:+.2f} ({(s.logdet - e.logdet) / abs(e.logdet):+.2%})")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="LLC vs devinterp 2.x; evidence exact vs SLQ")
    ap.add_argument("--large", action="store_true", help="the evidence on the 26k MLP of bench_hessian (minutes)")
    ap.add_argument("--skip-llc", action="store_true")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=400)
    args = ap.parse_args()
    if not args.skip_llc:
        llc_case(args.chains, args.draws)
    evidence_case(args.large)
