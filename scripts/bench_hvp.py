"""Cost of one Hessian-vector product relative to one full-data gradient, per HVP route.

Usage::

    python scripts/bench_hvp.py            # the example bundle and a ~1M-parameter MLP
    python scripts/bench_hvp.py --quick    # smaller, for a smoke run

Prints a markdown table: for each problem and route, seconds per HVP (median of
``--repeats`` runs), the ratio HVP / gradient, and the same for a block of 16 vectors
(per vector). The route ``auto`` picks is marked. Timings are noisy on a shared machine:
compare ratios within one run.
"""

from __future__ import annotations

import argparse

import torch
from _bench import example_problem, median_seconds  # scripts/ is on sys.path when run as a script
from torch import nn

from basins import Problem


def mlp_problem(width: int, n: int) -> tuple[str, Problem]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width // 4), nn.Tanh(), nn.Linear(width // 4, 10))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 784, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    problem = Problem(model, x, y, "cross-entropy")
    return f"MLP 784-{width}-{width // 4}-10 (P={problem.num_params:,}, n={n})", problem


def bench(name: str, problem: Problem, repeats: int) -> list[str]:
    rows = []
    t_grad = median_seconds(problem.grad, repeats)
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(problem.dtype)
    V = torch.randn(problem.num_params, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(problem.dtype)
    for route in ("graph", "fwd-rev", "rev-rev"):
        try:
            t_hvp = median_seconds(lambda r=route: problem.hvp_with_route(v, r), repeats)
            t_block = median_seconds(lambda r=route: problem.hvp_with_route(V, r), max(1, repeats // 2)) / 16
        except Exception as exc:  # noqa: BLE001 - a route that does not work for this model
            rows.append(f"| {name} | {route} | failed: {type(exc).__name__} | | | |")
            continue
        mark = " (auto)" if route == problem.hvp_route else ""
        rows.append(
            f"| {name} | {route}{mark} | {t_grad * 1e3:.2f} | {t_hvp * 1e3:.2f} | {t_hvp / t_grad:.2f} | {t_block / t_grad:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small problems, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    problems = [example_problem(), mlp_problem(256 if args.quick else 1024, 512 if args.quick else 2048)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {repeats} runs\n")
    print("| problem | route | gradient ms | HVP ms | HVP / gradient | block-16 HVP / gradient (per vector) |")
    print("|---|---|---|---|---|---|")
    for name, problem in problems:
        for row in bench(name, problem, repeats):
            print(row)


if __name__ == "__main__":
    main()
