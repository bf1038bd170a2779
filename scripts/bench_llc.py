"""LLC vs devinterp 2.x on analytic truths, LLC throughput, and evidence exact vs SLQ
(run: python scripts/bench_llc.py [--seeds S] [--large]).

1. Accuracy and coverage (:func:`truth_cases`): the analytic cases of tests/test_llc_analytic.py
   (Aoyagi–Watanabe reduced-rank regression, a regular linear regression, y = w^k·x) for
   ``--seeds`` seeds each: basins at its defaults, devinterp 2.x at its defaults (4 chains, 200
   draws, no burn-in, batch 32, localization 100; lr 1e-4 and nβ = n/log n, which it requires),
   and devinterp at basins' settings (its frozen ε, γ, nβ, chains, draws, burn-in, minibatch).
   Per row: median and worst relative error, and how often the 95% interval covers λ (basins:
   its Student-t interval; devinterp: mean ± 1.96·sd/√C over chains, as its output gives).
2. Whole-process time of ``basins llc`` at its defaults on one case (a subprocess, imports included).
3. Throughput (:func:`llc_case`): same MLP, data and settings for basins (vmap and loop over
   chains) and devinterp 2.x (:func:`devinterp_row`): SGLD steps/s, λ̂ ± SE, the ratio.
4. The evidence of the example MLP by the dense log det and by SLQ: wall time and error.
"""

from __future__ import annotations

import math
import time
from typing import Any

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
                step_size=eps, minibatch=b, seed=0, batched=batched, quadratic=False)
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
                  chains: int, draws: int, burnin: int, batch_size: int, seed: int = 0
                  ) -> tuple[str, float, float, float]:
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
                        device="cpu", init_seed=seed, match_sampling_input_ids_across_chains=False, output_path=tempfile.mkdtemp(prefix="devinterp-") + "/s.zarr")
    wall = time.perf_counter() - t0
    trace = torch.as_tensor(out.loss_trace.values, dtype=torch.float64)[:, burnin:]
    per_chain = nbeta * (trace.mean(1) - float(out.init_loss.values))
    return ("devinterp 2.x", chains * (draws + burnin) / wall, float(per_chain.mean()),
            float(per_chain.std()) / math.sqrt(chains))


def truth_cases() -> list[tuple[str, float, Any, Any]]:
    """``(name, λ, make(seed) -> Problem, finite(Problem) -> float)`` for the analytic cases of
    tests/test_llc_analytic.py (``finite``: the exact finite-n value of that data set, by Gibbs,
    quadrature or closed form)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests.test_llc_analytic import CASES

    return [(c.name, c.truth, c.problem, c.finite) for c in CASES]


def _covers(lo: float, hi: float, x: float) -> int:
    return int(lo <= x <= hi)


def truth_table(seeds: int) -> None:
    """Rows: basins defaults, devinterp defaults, devinterp at basins' settings; per case and overall.
    Each error and coverage twice: against λ and against the exact finite-n value of the data set
    (what every estimator here estimates; λ is 2–8% above it at these n)."""
    import statistics

    rows: dict[str, list[tuple[float, int, float, int]]] = {
        "basins (defaults)": [], "devinterp (defaults)": [], "devinterp (basins' settings)": []}
    t_b = t_d = 0.0
    steps_b = steps_d = 0
    print(f"analytic cases, {seeds} seeds each (data and chains): relative error of λ̂ and 95% interval "
          "coverage, against λ | against the exact finite-n value")

    def entry(est: float, lo: float, hi: float, lam: float, fin: float) -> tuple[float, int, float, int]:
        return est / lam - 1, _covers(lo, hi, lam), est / fin - 1, _covers(lo, hi, fin)

    def summary(v: list[tuple[float, int, float, int]]) -> str:
        e, f = [abs(x[0]) for x in v], [abs(x[2]) for x in v]
        return (f"median |err| {statistics.median(e):6.1%} worst {max(e):6.1%} covers {sum(x[1] for x in v)}/{len(v)}"
                f" | {statistics.median(f):6.1%} {max(f):6.1%} {sum(x[3] for x in v)}/{len(v)}")

    for name, truth, make, finite in truth_cases():
        per: dict[str, list[tuple[float, int, float, int]]] = {k: [] for k in rows}
        fins = []
        for s in range(seeds):
            p = make(s)
            fin = finite(p)
            fins.append(fin)
            t0 = time.perf_counter()
            r = llc(p, seed=s, quadratic=False)
            t_b += time.perf_counter() - t0
            steps_b += r.num_chains * (r.num_draws + r.num_burnin)
            per["basins (defaults)"].append(entry(r.llc, *r.llc_ci, truth, fin))
            X, Y = p.inputs, p.targets
            n = p.num_examples
            try:
                _, _, est, se = devinterp_row(p.module, X, Y, eps=1e-4, gamma=100.0, nbeta=n / math.log(n), chains=4,
                                              draws=200, burnin=0, batch_size=min(32, n), seed=s)
                per["devinterp (defaults)"].append(entry(est, est - 1.96 * se, est + 1.96 * se, truth, fin))
                t0 = time.perf_counter()
                _, _, est, se = devinterp_row(p.module, X, Y, eps=r.step_size, gamma=r.gamma, nbeta=r.nbeta,
                                              chains=r.num_chains, draws=r.num_draws, burnin=r.num_burnin,
                                              batch_size=r.minibatch, seed=s)
                t_d += time.perf_counter() - t0
                steps_d += r.num_chains * (r.num_draws + r.num_burnin)
                per["devinterp (basins' settings)"].append(entry(est, est - 1.96 * se, est + 1.96 * se, truth, fin))
            except Exception as exc:  # noqa: BLE001 - report, keep the basins numbers
                print(f"  devinterp failed on {name}: {type(exc).__name__}: {exc}")
        print(f"  {name} λ = {truth:.4g}, finite-n value {statistics.mean(fins):.4g} "
              f"({statistics.mean(fins) / truth - 1:+.1%}; range over seeds {min(fins):.4g}–{max(fins):.4g})")
        for k, v in per.items():
            rows[k].extend(v)
            if v:
                print(f"    {k:30s} {summary(v)}   signed vs finite-n: "
                      + " ".join(f"{x[2]:+.1%}" for x in v))
    print("overall:")
    for k, v in rows.items():
        if v:
            print(f"  {k:30s} {summary(v)}")
    if steps_d:
        print(f"  steps/s at basins' settings: basins {steps_b / t_b:.0f}, devinterp {steps_d / t_d:.0f} "
              f"(ratio {steps_b / t_b / (steps_d / t_d):.2f}×; basins' time includes its Lanczos and checks)")


def whole_process() -> None:
    """``basins llc`` at its defaults on the first analytic case and on y = w³·x (the slowest to reach
    the 4% s.e. of the auto draws), as a subprocess (imports included): the CLI's defaults, and
    ``--draws auto`` (the library's default)."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    cases = truth_cases()
    for name, _, make, _ in (cases[0], cases[-1]):
        p = make(0)
        d = Path(tempfile.mkdtemp(prefix="bench-llc-"))
        torch.save(p.module, d / "model.pt")
        torch.save({"inputs": p.inputs, "targets": p.targets}, d / "data.pt")
        for extra in ([], ["--draws", "auto"]):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "basins.cli", "llc", str(d / "model.pt"), "--data",
                                  str(d / "data.pt"), "--loss", "mse", "--trust-pickle", "--json", "-q",
                                  "--no-quadratic", *extra], capture_output=True, text=True, check=False)
            wall = time.perf_counter() - t0
            try:
                draws = json.loads(out.stdout).get("num_draws")
            except ValueError:
                draws = "?"
            print(f"whole process, basins llc {' '.join(extra) or 'at its CLI defaults'} on {name}: {wall:.2f} s, "
                  f"{draws} draws per chain (exit {out.returncode})")


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
    ap.add_argument("--seeds", type=int, default=5, help="seeds per analytic case")
    ap.add_argument("--skip-truths", action="store_true")
    ap.add_argument("--skip-evidence", action="store_true")
    args = ap.parse_args()
    if not args.skip_truths:
        truth_table(args.seeds)
        whole_process()
    if not args.skip_llc:
        llc_case(args.chains, args.draws)
    if not args.skip_evidence:
        evidence_case(args.large)
