"""Benchmark of random probing (``basins volume``): evaluations per ray, batched throughput, wall time.

Usage::

    python scripts/bench_volume.py                 # the example bundle and a ~26k-parameter MLP
    python scripts/bench_volume.py --quick         # fewer rays, for a smoke run
    python scripts/bench_volume.py --bundle basins-example/model.pt

Measures, on the example bundle (written to a temporary folder unless ``--bundle``) and on a
~26k-parameter MLP classifier built and briefly trained here (deterministic, seed 0):

(a) loss evaluations per ray per ε of the radius search at the default radius tolerance
    ``min(1e-3, 0.1/P)`` (target: ≤ 15 on average);
(b) loss evaluations per second: the route the search uses (``ProblemCriterion``: ``vmap`` at
    the measured chunk size, or ``loop``) against a plain Python loop that writes each
    parameter vector into the module (``vector_to_parameters``) and calls it;
(c) wall time of ``basins volume BUNDLE --samples N`` and ``... --walls -o r.h5`` (a subprocess,
    imports and loading included).

Timings are noisy on a shared machine; compare numbers within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from basins import Problem
from basins.analyses.volume.criterion import ProblemCriterion
from basins.analyses.volume.probe import probe_problem


def example_bundle(path: str | None) -> str:
    if path:
        return path
    from basins.files.example import make_example

    return make_example(tempfile.mkdtemp(prefix="basins-bench-volume-"))


def load(path: str) -> Problem:
    from basins.files.loading import load_bundle

    b = load_bundle(path)
    return Problem(b.model.module, b.data.inputs, b.data.targets, b.loss, fixed_batch_size=b.model.fixed_batch_size)


def mlp_problem(n: int = 2048, steps: int = 200) -> Problem:
    """64 → 128 → 128 → 10 tanh MLP (26,122 parameters) on a random teacher's labels, briefly trained."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    teacher = torch.randn(64, 10, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return Problem(model, x, y, "cross-entropy")


def evals_per_second(problem: Problem, num_points: int, seed: int = 0, repeats: int = 5) -> dict[str, object]:
    """Throughput of the search's batched route vs a loop writing parameters into the module."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(num_points, problem.num_params, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    pts = (problem.theta0.double() + 0.05 * u).to(problem.dtype)
    crit = ProblemCriterion(problem, seed=seed)
    module = copy.deepcopy(problem.module)
    params = list(module.parameters())
    chunks = list(problem.chunks())

    def run_batched() -> torch.Tensor:
        return crit(pts) + crit.reference

    def run_loop() -> torch.Tensor:
        out = torch.empty(num_points, dtype=torch.float64)
        with torch.no_grad():
            for i in range(num_points):
                torch.nn.utils.vector_to_parameters(pts[i], params)
                out[i] = sum(w * float(problem.loss_fn(module(x)[:m], y)) for x, y, m, w in chunks)
        return out

    crit(pts[:8])  # warm-up
    t_batched = t_loop = float("inf")
    for _ in range(repeats):  # interleaved, best of `repeats`
        t0 = time.perf_counter()
        batched = run_batched()
        t_batched = min(t_batched, time.perf_counter() - t0)
        t0 = time.perf_counter()
        looped = run_loop()
        t_loop = min(t_loop, time.perf_counter() - t0)
    agree = float((batched - looped).abs().max() / looped.abs().max())
    return {"route": crit.route, "chunk": crit.chunk, "timings_s_per_point": crit.timings,
            "batched_evals_per_s": num_points / t_batched, "loop_evals_per_s": num_points / t_loop,
            "speedup": t_loop / t_batched, "max_rel_diff": agree}


def search_cost(problem: Problem, num_pairs: int) -> dict[str, object]:
    t0 = time.perf_counter()
    res = probe_problem(problem, num_pairs, seed=0)
    fam = res.primary
    return {"num_rays": fam.num_rays, "radius_rtol": res.radius_rtol,
            "evals_per_ray_per_eps": [float(fam.num_evals[:, j].mean()) for j in range(len(res.epsilons))],
            "evals_per_ray_per_eps_max": [int(fam.num_evals[:, j].max()) for j in range(len(res.epsilons))],
            "mean": float(fam.num_evals.mean()), "seconds": time.perf_counter() - t0,
            "censored": [int((fam.status[:, j] == 1).sum()) for j in range(len(res.epsilons))]}


def cli_time(bundle: str, samples: int, walls: bool) -> dict[str, object]:
    out = os.path.join(tempfile.mkdtemp(prefix="basins-bench-volume-"), "r.h5")
    cmd = [sys.executable, "-m", "basins.cli", "volume", bundle, "--samples", str(samples), "--json", "-q"]
    if walls:
        cmd += ["--walls", "-o", out]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    res = json.loads(r.stdout)
    return {"command": " ".join(["basins", *cmd[3:]]), "seconds": seconds, "probe_seconds": res["wall_seconds"],
            "num_loss_evals": res["num_loss_evals"], "num_hvps": res["num_hvps"],
            "evals_per_ray_per_eps": res["evals_per_ray"], "route": res["loss_route"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="example bundle (default: write one to a temporary folder)")
    ap.add_argument("--samples", type=int, default=1000, help="rays for (c)")
    ap.add_argument("--mlp-pairs", type=int, default=100, help="antithetic pairs on the 26k MLP for (a)")
    ap.add_argument("--points", type=int, default=256, help="points for (b)")
    ap.add_argument("--quick", action="store_true", help="fewer rays and points")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.mlp_pairs, args.points = 200, 20, 64
    results: dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    bundle = example_bundle(args.bundle)
    ex, mlp = load(bundle), mlp_problem()
    names = {"example": f"example bundle (P={ex.num_params:,}, n={ex.num_examples})",
             "mlp": f"MLP 64-128-128-10 (P={mlp.num_params:,}, n={mlp.num_examples}, ‖∇L‖={mlp.grad_norm:.2g})"}
    results["problems"] = names
    results["c_volume"] = cli_time(bundle, args.samples, walls=False)
    results["c_volume_walls"] = cli_time(bundle, args.samples, walls=True)
    results["a_example"] = {"evals_per_ray_per_eps": results["c_volume"]["evals_per_ray_per_eps"]}  # type: ignore[index]
    results["a_mlp"] = search_cost(mlp, args.mlp_pairs)
    results["b_example"] = evals_per_second(ex, args.points)
    results["b_mlp"] = evals_per_second(mlp, args.points)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return
    print(f"torch {results['torch']}, {results['threads']} threads")
    print("(a) loss evaluations per ray per ε (ladder 1e-3, 1e-2, 1e-1; default radius rtol):")
    print(f"    {names['example']}: {results['a_example']['evals_per_ray_per_eps']}")  # type: ignore[index]
    a = results["a_mlp"]
    print(f"    {names['mlp']}: {a['evals_per_ray_per_eps']} (max {a['evals_per_ray_per_eps_max']}, "  # type: ignore[index]
          f"rtol {a['radius_rtol']:.2g}, {a['num_rays']} rays, {a['seconds']:.1f} s)")  # type: ignore[index]
    print("(b) loss evaluations per second, batched search route vs a loop writing parameters into the module:")
    for key in ("b_example", "b_mlp"):
        b = results[key]
        name = names[key[2:]]
        chunk = f" ×{b['chunk']}" if b["chunk"] else ""  # type: ignore[index]
        print(f"    {name}: {b['batched_evals_per_s']:.0f}/s ({b['route']}{chunk}) vs loop "  # type: ignore[index]
              f"{b['loop_evals_per_s']:.0f}/s = {b['speedup']:.2f}× (max rel. diff {b['max_rel_diff']:.1e})")  # type: ignore[index]
    for key in ("c_volume", "c_volume_walls"):
        c = results[key]
        print(f"(c) {c['command']}: {c['seconds']:.1f} s wall ({c['probe_seconds']:.1f} s probing, "  # type: ignore[index]
              f"{c['num_loss_evals']:,} loss evals, {c['num_hvps']} HVPs)")  # type: ignore[index]


if __name__ == "__main__":
    main()
