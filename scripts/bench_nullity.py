"""Flat-direction counts by each method: HVPs, Jacobian rows, wall time, and how well they agree.

Usage::

    python scripts/bench_nullity.py            # the example bundle and a ~26k-parameter MLP classifier
    python scripts/bench_nullity.py --quick    # the MLP only, smaller (a smoke run)

Prints a markdown table: for each problem and method (exact / features / slq), the cost and
the count of eigenvalues with ``|λ| ≤ rtol·λ_max`` at rtol 1e-6, 1e-4, 1e-2 (slq: estimate and
95% interval; exact/features: integer, with an interval only where rounding matters), then
``‖Hv − Gv‖/‖Hv‖`` (how far H is from its Gauss–Newton part, whose flat directions
``features`` counts). A method that does not fit is listed with the reason. Deterministic
(seeded data, initialisation and training); timings are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _bench import example_problem  # scripts/ is on sys.path when run as a script
from torch import nn

from basins import InputError, Problem
from basins.analyses.nullity import DEFAULT_RTOLS, nullity


def mlp_problem(n: int, width: int, steps: int, zero_residual: bool = False) -> tuple[str, Problem]:
    """A 64-width-32-10 tanh MLP classifier (width 256: P = 25,194) trained briefly on a teacher's labels.

    ``zero_residual``: the same trained network under mse with targets := its own outputs, an
    exact minimum where H = G = (2/N)JᵀJ, so the ``features`` count is H's own.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    teacher = torch.randn(64, 10, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, 10, generator=g)).argmax(dim=1)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):  # full batch: deterministic
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    name = f"MLP 64-{width}-32-10 (P={{:,}}, n={n})"
    if zero_residual:
        with torch.no_grad():
            problem = Problem(model, x, model(x), "mse")
        return name.format(problem.num_params) + ", mse at zero residual", problem
    problem = Problem(model, x, y, "cross-entropy")
    return name.format(problem.num_params) + ", cross-entropy", problem


def fmt_count(c: Any) -> str:
    if c.method == "slq":
        return f"{c.count:,.0f} [{c.count_lower:,.0f}, {c.count_upper:,.0f}]"
    if c.count_lower == c.count_upper == c.count:
        return f"{int(c.count):,}"
    return f"{int(c.count):,} [{int(c.count_lower):,}, {int(c.count_upper):,}]"


def bench(name: str, problem: Problem, methods: list[str]) -> tuple[list[str], dict[str, Any]]:
    rows, results = [], {}
    for method in methods:
        before = problem.counters.num_hvps
        t0 = time.perf_counter()
        try:
            r = nullity(problem, method=method, seed=0)
        except InputError as exc:
            rows.append(f"| {name} | {method} | - | - | - | refused: {exc} | | | |")
            continue
        wall = time.perf_counter() - t0
        hvps = problem.counters.num_hvps - before
        vjps = r.features.num_vjps if r.features is not None else 0
        gn = f"{r.gn_residual:.2g}" if r.gn_residual is not None else "-"
        counts = " | ".join(fmt_count(c) for c in r.counts)
        rows.append(f"| {name} | {method} | {hvps:,} | {vjps:,} | {wall:.1f} | {counts} | {gn} |")
        results[method] = r
        print(f"  {name}: {method} done in {wall:.1f} s (λ_max = {r.lambda_max:.6g})", flush=True)
    return rows, results


def agreement(name: str, results: dict[str, Any]) -> list[str]:
    out = []
    ref_name = "exact" if "exact" in results else "features"
    ref = results.get(ref_name)
    if ref is None:
        return out
    if ref_name == "features" and (ref.gn_residual or 0) > 1e-2:
        out.append(f"- {name}: features counts G, which differs from H here (‖Hv−Gv‖/‖Hv‖ = {ref.gn_residual:.2g}); "
                   "slq estimates H")
    for method, r in results.items():
        if method == ref_name:
            continue
        parts = []
        for c_ref, c in zip(ref.counts, r.counts):
            inside = c.count_lower <= c_ref.count <= c.count_upper
            parts.append(f"rtol {c.rtol:g}: {c.count:,.0f} vs {c_ref.count:,} ({'inside' if inside else 'outside'} its interval)")
        out.append(f"- {name}: {method} vs {ref_name}: " + "; ".join(parts))
    if "exact" in results and "features" in results:
        ev_h = results["exact"].eigenvalues.flip(0)
        ev_g = results["features"].eigenvalues
        r = min(results["features"].features.rank, ev_h.numel())
        rel = float((ev_h[:r] - ev_g[:r]).abs().max() / ev_h[0])
        out.append(f"- {name}: top {r} eigenvalues of H vs G (features): max |Δ| / λ_max = {rel:.2g}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MLP only, smaller")
    ap.add_argument("--no-example", action="store_true", help="skip the example bundle")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on this shared 2-core machine, oversubscribed OpenMP threads "
                         "made small HVPs 13x slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    problems: list[tuple[str, Problem, list[str]]] = []
    if not (args.quick or args.no_example):
        name, p = example_problem()
        problems.append((name, p, ["exact", "features", "slq"]))
    n, width, steps = (128, 64, 100) if args.quick else (256, 256, 300)
    for zero in (False, True):
        name, p = mlp_problem(n, width, steps, zero_residual=zero)
        problems.append((name, p, ["exact", "features", "slq"]))
    header = ["| problem | method | HVPs | Jacobian rows | wall s | "
              + " | ".join(f"count ≤ {r:g}·λ_max" for r in DEFAULT_RTOLS) + " | ‖Hv−Gv‖/‖Hv‖ |",
              "|---|---|---:|---:|---:|" + "---:|" * len(DEFAULT_RTOLS) + "---:|"]
    rows: list[str] = []
    notes: list[str] = []
    for name, p, methods in problems:
        print(f"{name}: L(θ*) = {p.loss_at_optimum:.4g}, ‖∇L‖ = {p.grad_norm:.2g}, HVP route {p.hvp_route}", flush=True)
        r, results = bench(name, p, methods)
        rows += r
        notes += agreement(name, results)
    print()
    print("\n".join(header + rows))
    print()
    print("\n".join(notes))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
