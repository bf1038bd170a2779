"""Ten checkpoints of one training run: ``basins hessian ckpts/`` against a shell loop of single runs.

The 26k-parameter MLP of ``bench_hessian.py`` (32-256-64-10, tanh, n = 2,048, cross-entropy) is
trained with Adam for ``10 × --every`` steps from the same start; every ``--every`` steps the model
is exported (``torch.export``, a fixed batch of n) to ``DIR/ckpt_<step>.pt2``. Then, each a whole
process (``python -m basins.cli``), in one run of this script:

* **loop**: one ``basins hessian CKPT --data D --json -q`` per checkpoint, as a shell loop runs it;
* **one run, warm**: ``basins hessian DIR --data D --json -q`` (data loaded once, the HVP route
  chosen once, each Lanczos run warm-started from the previous checkpoint's Ritz vectors);
* **one run, cold**: the same with ``--cold``, to separate the warm start's share.

It prints total wall time and total HVPs (``num_hvps``, every product computed, route choice and
error-bound checks included) for each, the ratios against the loop, and the largest difference
between the loop's and the one run's eigenvalues relative to their error bounds (≤ 1 means
they agree within the bounds). Goal (issue "Over training"): one run ≥ 2× faster than the loop in
wall time and ≥ 30% fewer HVPs.

    python scripts/bench_trajectory.py [--every 30] [--top-k 10] [--repeats 1] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def write_checkpoints(directory: str, every: int) -> list[str]:
    """Train the MLP and export ten checkpoints; returns their paths (in a child process: this
    script's own process imports nothing heavy, so its timings are of the children only)."""
    code = f"""
import sys, torch
sys.path.insert(0, {HERE!r})
from _bench_problems import mlp_module
from torch import nn
g = torch.Generator().manual_seed(0)
x = torch.randn(2048, 32, generator=g)
y = (torch.tanh(x @ torch.randn(32, 10, generator=g)) + 0.3 * torch.randn(2048, 10, generator=g)).argmax(1)
torch.save({{"inputs": x, "targets": y}}, {directory!r} + "/data.pt")
torch.manual_seed(0)
model = mlp_module()
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for step in range(1, 10 * {every} + 1):
    model.train(); opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    if step % {every} == 0:
        torch.export.save(torch.export.export(model.eval(), (x,)), f"{directory}/ckpts/ckpt_{{step:05d}}.pt2")
"""
    os.makedirs(os.path.join(directory, "ckpts"), exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True)
    return sorted(os.path.join(directory, "ckpts", n) for n in os.listdir(os.path.join(directory, "ckpts")))


def basins(args: list[str]) -> tuple[float, Any]:
    """Wall time of one whole ``basins`` process and its JSON output."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "basins.cli", *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=30, help="training steps between checkpoints")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant (the median is reported)")
    ap.add_argument("--dir", help="working directory (default: a temporary one)")
    args = ap.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="basins-traj-")
    ckpts = write_checkpoints(directory, args.every)
    data = os.path.join(directory, "data.pt")
    common = ["--data", data, "-k", str(args.top_k), "--json", "-q"]

    def loop() -> tuple[float, list[dict[str, Any]]]:
        total, objs = 0.0, []
        for c in ckpts:
            seconds, obj = basins(["hessian", c, *common])
            total += seconds
            objs.append(obj)
        return total, objs

    variants = {"loop": loop,
                "one run, warm": lambda: basins(["hessian", os.path.join(directory, "ckpts"), *common]),
                "one run, cold": lambda: basins(["hessian", os.path.join(directory, "ckpts"), *common, "--cold"])}
    results: dict[str, tuple[float, list[dict[str, Any]]]] = {}
    for name, fn in variants.items():
        runs = [fn() for _ in range(args.repeats)]
        runs.sort(key=lambda r: r[0])
        results[name] = runs[len(runs) // 2]

    base_s, base = results["loop"]
    base_hvps = sum(o["num_hvps"] for o in base)
    print(f"{len(ckpts)} checkpoints of the 26k MLP (P = {base[0]['num_params']:,}, n = {base[0]['num_examples']:,}), "
          f"top {args.top_k}, every {args.every} Adam steps; whole processes, median of {args.repeats}")
    print(f"{'variant':<16} {'wall s':>8} {'× loop':>7} {'HVPs':>6} {'× loop':>7} {'Lanczos HVPs':>13} "
          f"{'max |Δλ|/bound':>15}")
    for name, (seconds, objs) in results.items():
        hvps = sum(o["num_hvps"] for o in objs)
        lanczos = sum(o["num_lanczos_hvps"] for o in objs)
        worst = max(abs(a - b) / max(ea, eb)
                    for o, r in zip(objs, base)
                    for a, b, ea, eb in zip(o["eigenvalues"], r["eigenvalues"], o["error_bounds"], r["error_bounds"]))
        print(f"{name:<16} {seconds:8.2f} {seconds / base_s:7.2f} {hvps:6d} {hvps / base_hvps:7.2f} {lanczos:13d} "
              f"{worst:15.2f}")
    warm_s, warm = results["one run, warm"]
    print(f"one run (warm) vs loop: {base_s / warm_s:.2f}x faster in wall time (goal ≥ 2), "
          f"{1 - sum(o['num_hvps'] for o in warm) / base_hvps:.0%} fewer HVPs (goal ≥ 30%)")


if __name__ == "__main__":
    main()
