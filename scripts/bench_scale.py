"""Scaling of the Hessian-vector product: 1 vs 2 processes (torchrun, gloo) on CPU, and GPU vs CPU.

Usage::

    python scripts/bench_scale.py                 # MLP 784-1024-256-10 (P = 1,068,810), n = 4096
    python scripts/bench_scale.py --quick         # smaller, for a smoke run
    python scripts/bench_scale.py --hvp graph     # force one HVP route everywhere

    python scripts/bench_scale.py --models 1M,10M  # GPT-2-style models vs hessian-eigenthings, PyHessian
                                                   # (scripts/_bench_gpt2.py: sizes, tasks, commands)
    python scripts/bench_scale.py --models 124M --tools basins --memory 18G   # basins' --memory budget
    python scripts/bench_scale.py --models 1M,10M,40M,124M --hvp-cost auto,rev-rev   # cost vs P: seconds
                                                   # (wall and CPU) per gradient and per HVP, set-up, peak RSS

Every configuration runs in a fresh process (``--worker``), so threads and memory do not
leak between them:

* ``1 proc × T threads``: one process, torch's default thread count (all cores);
* ``1 proc × 1 thread``: the same with one thread (the per-rank setting under torchrun);
* ``torchrun K × 1 thread``: K ranks, each holding n/K examples, HVPs all-reduced (gloo);
* ``cuda``: one process on the GPU (only when ``torch.cuda.is_available()``);
* ``streamed`` vs ``held``: one process, route ``rev-rev`` in both, the data read from a
  ``DataLoader`` over a map-style ``Dataset`` on every pass (``data_memory_bytes=0``, the
  ``--stream`` setting) vs held in memory: the cost of not holding the data.

It prints, per configuration, seconds per HVP and per full-data gradient (median of
``--repeats``, the HVP route the engine chose), then the ratios: HVP throughput of K
processes vs one, GPU vs CPU, and HVP / gradient. Timings are noisy on a shared machine;
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

MARK = "BENCH_SCALE "


# ---------------------------------------------------------------------- worker (one configuration)
def _median(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from basins import Problem
    from basins.engine import distributed as dist

    device = args.device
    if device == "cuda" and dist.launched():
        device = f"cuda:{dist.env_local_rank()}"
    ctx = dist.init_from_env(device)
    torch.manual_seed(0)
    widths = [int(w) for w in args.widths.split(",")]
    layers: list[nn.Module] = []
    for a, b in zip([784, *widths], widths):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 10))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, 784, generator=g)
    y = torch.randint(0, 10, (args.n,), generator=g)
    data: tuple[Any, Any]
    if args.source == "stream":  # a DataLoader (chunks of 512) read on every pass, this rank's shard only
        from torch.utils.data import DataLoader, TensorDataset

        from basins.engine.streams import stream_from_object

        spec = stream_from_object(DataLoader(TensorDataset(x, y), batch_size=512), "bench")
        assert spec is not None
        data = (spec.shard(dist.world_size(), dist.rank()), None)
    else:
        if ctx is not None:
            s, e = dist.shard_range(args.n, ctx.world_size, ctx.rank)
            x, y = x[s:e], y[s:e]
        data = (x, y)
    t0 = time.perf_counter()
    p = Problem(model, *data, "cross-entropy", device=device, dtype=args.dtype, hvp_route=args.hvp,
                batch_size=512 if args.source != "default" else None, data_memory_bytes=0,
                total_examples=args.n, reduce=dist.reducer(), gather=dist.all_gather_object if ctx else None)
    setup = time.perf_counter() - t0
    v = torch.randn(p.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def sync() -> None:
        if p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        dist.barrier()

    hvp_s = _median(lambda: p.hvp(v), args.repeats, sync)
    grad_s = _median(lambda: p.grad(), args.repeats, sync)
    w = torch.zeros(p.num_params, dtype=p.dtype, device=p.device)
    reduce_s = _median(lambda: dist.all_reduce_sum(w), args.repeats, sync) if ctx is not None else 0.0
    if dist.is_main_process():
        print(MARK + json.dumps({
            "num_params": p.num_params, "n": p.num_examples, "world_size": dist.world_size(),
            "threads": torch.get_num_threads(), "device": str(p.device), "dtype": str(p.dtype),
            "route": p.hvp_route, "hvp_s": hvp_s, "grad_s": grad_s, "allreduce_s": reduce_s, "setup_s": setup,
        }), flush=True)
    dist.teardown()


# ---------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], env: dict[str, str], label: str) -> dict[str, Any] | None:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(MARK)]
    if r.returncode != 0 or not lines:
        print(f"{label}: failed ({r.returncode})\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    out: dict[str, Any] = json.loads(lines[-1][len(MARK):])
    out["label"], out["wall_s"] = label, time.perf_counter() - t0
    print(f"  {label}: {out['hvp_s']:.4f} s/HVP, {out['grad_s']:.4f} s/grad ({out['route']})", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-examples", dest="n", type=int, default=4096, help="examples (synthetic, seeded)")
    ap.add_argument("--widths", default="1024,256", help="hidden widths of the 784-…-10 MLP")
    ap.add_argument("--nproc", type=int, default=2, help="processes for the torchrun configuration")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--hvp", default="auto", choices=["auto", "graph", "fwd-rev", "rev-rev"])
    ap.add_argument("--quick", action="store_true", help="n = 1024, widths 256,64, 3 repeats")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--source", default="default", choices=["default", "memory", "stream"], help=argparse.SUPPRESS)
    ap.add_argument("--no-stream", action="store_true", help="skip the streamed-vs-held comparison")
    ap.add_argument("--models", help="GPT-2-style sizes to run, e.g. 1M,10M,40M,124M (instead of the MLP scaling)")
    ap.add_argument("--tools", default="basins,eigenthings,pyhessian", help="with --models: tools to run")
    ap.add_argument("--tasks", default="top1,top10,trace", help="with --models: tasks to run")
    ap.add_argument("--seqs", type=int, default=8, help="with --models: sequences of token data")
    ap.add_argument("--seq-len", type=int, default=128, help="with --models: tokens per sequence")
    ap.add_argument("--timeout", type=float, default=1800, help="with --models: seconds before a run is killed")
    ap.add_argument("--memory", help="with --models: basins' --memory budget (e.g. 18G)")
    ap.add_argument("--json-out", help="with --models: also write the rows as JSON here")
    ap.add_argument("--hvp-cost", metavar="ROUTES",
                    help="with --models: instead of the tasks, seconds per gradient and per HVP by each route "
                         "(e.g. auto,graph,rev-rev), median of --repeats, one process per size × route")
    ap.add_argument("--cost", help=argparse.SUPPRESS)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.n, args.widths, args.repeats = 1024, "256,64", 3
    if args.worker:
        worker(args)
        return
    if args.peer or args.measure or args.models or args.cost:
        models_main(args)
        return

    import torch

    base = [sys.executable, os.path.abspath(__file__), "--worker", "--num-examples", str(args.n), "--widths", args.widths,
            "--repeats", str(args.repeats), "--dtype", args.dtype, "--hvp", args.hvp]
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}
    cores = os.cpu_count() or 1
    print(f"bench_scale: MLP 784-{args.widths.replace(',', '-')}-10, n = {args.n}, {args.dtype}, "
          f"{cores} cores, torch {torch.__version__}", file=sys.stderr)
    runs: dict[str, dict[str, Any] | None] = {}
    runs["1proc"] = _run(base + ["--device", "cpu"], clean, f"1 proc × {cores} threads")
    runs["1proc1t"] = _run(base + ["--device", "cpu"], {**clean, "OMP_NUM_THREADS": "1"}, "1 proc × 1 thread")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(args.nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    runs["dist"] = _run(launcher + base[1:] + ["--device", "cpu"], {**clean, "OMP_NUM_THREADS": "1"},
                        f"torchrun {args.nproc} × 1 thread (gloo)")
    if torch.cuda.is_available():
        runs["cuda"] = _run(base + ["--device", "cuda"], clean, "1 proc, cuda")
    if not args.no_stream:
        fixed = [a if a != args.hvp else "rev-rev" for a in base]
        runs["held"] = _run(fixed + ["--device", "cpu", "--source", "memory"], clean,
                            f"1 proc × {cores} threads, chunks of 512 held in memory")
        runs["streamed"] = _run(fixed + ["--device", "cpu", "--source", "stream"], clean,
                                f"1 proc × {cores} threads, DataLoader streamed every pass")

    ok = {k: v for k, v in runs.items() if v is not None}
    if not ok:
        raise SystemExit("every configuration failed")
    any_run = next(iter(ok.values()))
    print(f"\nP = {any_run['num_params']:,}, n = {any_run['n']:,}, {args.dtype}\n")
    print("| configuration | route | s / HVP | s / gradient | HVP / gradient | s / all-reduce of P |")
    print("|---|---|---|---|---|---|")
    for r in ok.values():
        print(f"| {r['label']} | {r['route']} | {r['hvp_s']:.4f} | {r['grad_s']:.4f} | "
              f"{r['hvp_s'] / r['grad_s']:.2f}× | {r['allreduce_s']:.4f} |")
    print()
    if "1proc" in ok and "dist" in ok:
        print(f"HVP throughput, torchrun {args.nproc} procs vs 1 proc × {cores} threads: "
              f"{ok['1proc']['hvp_s'] / ok['dist']['hvp_s']:.2f}×")
    if "1proc1t" in ok and "dist" in ok:
        print(f"HVP throughput, torchrun {args.nproc} procs vs 1 proc × 1 thread: "
              f"{ok['1proc1t']['hvp_s'] / ok['dist']['hvp_s']:.2f}× (ideal {args.nproc}×)")
    if "cuda" in ok and "1proc" in ok:
        print(f"HVP time, GPU vs CPU (1 proc × {cores} threads): {ok['1proc']['hvp_s'] / ok['cuda']['hvp_s']:.1f}× faster "
              f"on GPU; HVP / gradient on GPU: {ok['cuda']['hvp_s'] / ok['cuda']['grad_s']:.2f}×")
    elif "cuda" not in ok:
        print("GPU: not available here (torch.cuda.is_available() is False); rerun on a machine with CUDA")
    if "held" in ok and "streamed" in ok:
        print(f"Streaming the data from a DataLoader on every pass (rev-rev, chunks of 512): HVP "
              f"{ok['streamed']['hvp_s'] / ok['held']['hvp_s']:.2f}×, gradient "
              f"{ok['streamed']['grad_s'] / ok['held']['grad_s']:.2f}× the time with the chunks held in memory")


def models_main(args: argparse.Namespace) -> None:
    """``--models``: the GPT-2 size ladder (:mod:`_bench_gpt2`); ``--peer``/``--measure``: its child processes."""
    import _bench_gpt2 as g2  # scripts/ is on sys.path when run as a script

    if args.peer:
        print(json.dumps(g2.peer(args.peer, args.task, args.dir)))
        return
    if args.cost:
        print(json.dumps(g2.hvp_cost(args.dir, args.cost, args.repeats, args.memory)))
        return
    if args.measure:
        r = g2.timed(json.loads(args.measure), args.timeout)
        print(g2.MARK + json.dumps(r))
        return
    sizes = args.models.split(",")
    unknown = [s for s in sizes if s not in g2.SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}: use {', '.join(g2.SIZES)}")
    if args.hvp_cost:
        costs = g2.run_costs(sizes, args.hvp_cost.split(","), args.seqs, args.seq_len, args.timeout,
                             os.path.abspath(__file__), args.repeats, args.memory)
        _write_rows(costs, args.json_out, g2.cost_table, "requested", "plan")
        return
    rows = g2.run_all(sizes, args.tools.split(","), args.tasks.split(","), args.seqs, args.seq_len, args.timeout,
                      os.path.abspath(__file__), args.memory)
    _write_rows(rows, args.json_out, g2.table, "task", "plan_line")


def _write_rows(rows: list, json_out: str | None, table, label: str, plan_key: str) -> None:  # noqa: ANN001
    """The rows to ``json_out`` first (kept whatever happens to the table), then the table, then each
    row's memory plan line."""
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))
    for r in rows:
        if r.get(plan_key):
            print(f"{r['size']} {r[label]}: {r[plan_key]}")


if __name__ == "__main__":
    main()
