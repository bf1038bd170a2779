"""LLC throughput and agreement vs devinterp 2.x, and evidence exact vs SLQ (run: python scripts/bench_llc.py).

Same model (an MLP regression, float32), data, and hyperparameters (ε = lr, γ = localization,
nβ, 4 chains, draws, burn-in, batch size) for basins and devinterp's
``estimate_learning_coeff_with_summary``; prints SGLD steps/s (all chains) and λ̂ ± SE for each,
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


def llc_case() -> None:
    torch.manual_seed(0)
    n, d = 2048, 8
    X = torch.randn(n, d)
    teacher = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        Y = teacher(X) + 0.05 * torch.randn(n, 1)
    model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1))
    model.load_state_dict(teacher.state_dict())
    eps, gamma, nbeta, chains, draws, burnin, b = 1e-4, 100.0, n / math.log(n), 4, 400, 100, 64
    problem = Problem(model, X, Y, loss="mse")
    rows = []
    for batched in (True, False):
        t0 = time.perf_counter()
        r = llc(problem, num_chains=chains, num_draws=draws, num_burnin=burnin, nbeta=nbeta, gamma=gamma,
                step_size=eps, batch_size=b, seed=0, batched=batched, gamma_bias=False)
        wall = time.perf_counter() - t0
        rows.append((f"basins ({'vmap' if batched else 'loop'})", chains * (draws + burnin) / wall, r.llc, r.llc_stderr))
    try:
        from devinterp.optim.sgld import SGLD
        from devinterp.slt.sampler import estimate_learning_coeff_with_summary

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=b, shuffle=True)
        t0 = time.perf_counter()
        s = estimate_learning_coeff_with_summary(
            model, loader, criterion=nn.functional.mse_loss, sampling_method=SGLD,
            optimizer_kwargs=dict(lr=eps, localization=gamma, nbeta=nbeta), num_chains=chains, num_draws=draws,
            num_burnin_steps=burnin, num_steps_bw_draws=1, device="cpu", online=False, verbose=False)
        wall = time.perf_counter() - t0
        rows.append(("devinterp", chains * (draws + burnin) / wall, float(s["llc/mean"]),
                     float(s["llc/std"]) / math.sqrt(chains)))
    except Exception as exc:  # noqa: BLE001 - report, do not hide the basins numbers
        print(f"devinterp failed: {type(exc).__name__}: {exc}")
    print(f"LLC, MLP P={problem.num_params}, n={n}, ε={eps}, γ={gamma}, nβ={nbeta:.1f}, batch {b}, "
          f"{chains} chains × ({burnin}+{draws})")
    for name, sps, est, se in rows:
        print(f"  {name:18s} {sps:9.1f} steps/s   λ̂ = {est:.3f} ± {se:.3f}")
    base = next((r for r in rows if r[0] == "devinterp"), None)
    if base is not None:
        print(f"  throughput ratio basins(vmap)/devinterp: {rows[0][1] / base[1]:.2f}×")


def evidence_case() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
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
    llc_case()
    evidence_case()
