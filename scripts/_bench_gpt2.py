"""GPT-2-style models of four sizes for ``bench_scale.py --models``: basins vs hessian-eigenthings
and PyHessian, each task in its own process (whole-process wall time and peak RSS by ``wait4``).

Sizes (``transformers.GPT2Config``, eager attention, random initialisation, float32, seed 0):

=====  =======  =========  =====  ======  ==========
size   vocab    positions  width  layers  P
=====  =======  =========  =====  ======  ==========
1M     2048     128        128    4       ~1.06M
10M    8192     128        320    6       ~10.1M
40M    16384    128        512    10      ~40.0M
124M   50257    1024       768    12      124,439,808 (``GPT2Config()``)
=====  =======  =========  =====  ======  ==========

Data: ``--seqs`` sequences of ``--seq-len`` tokens drawn from ``torch.Generator().manual_seed(0)``,
labels = inputs (next-token loss over every position), saved as ``tok.pt`` next to the model's
``save_pretrained`` directory (``$BASINS_BENCH_DIR`` or ``/tmp/basins-bench-scale``).

Tasks: ``top1`` and ``top10`` (largest algebraic eigenvalues, tol 1e-3), ``trace`` (Hutch++ with 30
products; PyHessian has only Hutchinson: ``trace(maxIter=30)``). basins runs its CLI
(``basins hessian DIR --data tok.pt --loss causal-lm -k K --tol 1e-3 --json``; the trace task is
``-k 1 --trace --trace-hvps 30``, so its wall time includes a top-1 run, whose HVPs are listed apart).
Peers at their defaults except ``k``, ``tol`` and ``which="LA"`` (eigenthings' default is the largest
magnitude); their HVPs are counted by wrapping their product function.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

SIZES: dict[str, dict[str, int] | None] = {
    "1M": {"vocab_size": 2048, "n_positions": 128, "n_embd": 128, "n_layer": 4, "n_head": 4},
    "10M": {"vocab_size": 8192, "n_positions": 128, "n_embd": 320, "n_layer": 6, "n_head": 5},
    "40M": {"vocab_size": 16384, "n_positions": 128, "n_embd": 512, "n_layer": 10, "n_head": 8},
    "124M": None,  # GPT2Config() defaults
}
TASKS = ("top1", "top10", "trace")
TOOLS = ("basins", "eigenthings", "pyhessian")
MARK = "BENCH_GPT2 "


def bench_dir() -> str:
    return os.environ.get("BASINS_BENCH_DIR", "/tmp/basins-bench-scale")


def prepare(size: str, seqs: int, seq_len: int) -> str:
    """The model directory and ``tok.pt`` of ``size`` (built once, reused)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = os.path.join(bench_dir(), f"gpt2-{size}-{seqs}x{seq_len}")
    if os.path.exists(os.path.join(path, "tok.pt")):
        return path
    spec = SIZES[size]
    cfg = GPT2Config(use_cache=False, attn_implementation="eager", **(spec or {}))
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).float().eval().save_pretrained(path)
    ids = torch.randint(0, cfg.vocab_size, (seqs, seq_len), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids, "labels": ids.clone()}, os.path.join(path, "tok.pt"))
    return path


def _load(path: str) -> tuple[Any, Any]:
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").float().eval()
    ids = torch.load(os.path.join(path, "tok.pt"))["input_ids"]
    return model, ids


def peer(tool: str, task: str, path: str) -> dict[str, Any]:
    """One peer task in this process; returns its numbers."""
    import torch

    model, ids = _load(path)
    k = 10 if task == "top10" else 1
    if tool == "eigenthings":
        import hessian_eigenthings as he

        op = he.HessianOperator(model, [{"input_ids": ids, "labels": ids}], he.hf_lm_loss())
        count = {"n": 0}
        matvec = op.matvec

        def counted(v: torch.Tensor) -> torch.Tensor:
            count["n"] += 1
            return matvec(v)

        op.matvec = counted  # type: ignore[method-assign]
        if task == "trace":
            r = he.hutch_plus_plus(op, num_matvecs=30, seed=0)
            return {"trace": float(r.estimate), "hvps": count["n"]}
        res = he.lanczos(op, k=k, tol=1e-3, which="LA", seed=0)
        return {"eigenvalues": sorted((float(x) for x in res.eigenvalues), reverse=True), "hvps": count["n"]}
    from pyhessian import hessian

    ph = sys.modules["pyhessian.hessian"]

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=x).logits

    def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))

    h = hessian(Logits().eval(), criterion, data=(ids, ids), cuda=False)
    count = {"n": 0}
    hvp = ph.hessian_vector_product

    def counted_ph(*a: Any, **kw: Any) -> Any:
        count["n"] += 1
        return hvp(*a, **kw)

    ph.hessian_vector_product = counted_ph
    if task == "trace":
        values = h.trace(maxIter=30, tol=1e-3)
        return {"trace": float(sum(values) / len(values)), "hvps": count["n"]}
    vals, _ = h.eigenvalues(tol=1e-3, top_n=k)
    return {"eigenvalues": sorted((float(x) for x in vals), reverse=True), "hvps": count["n"]}


def hvp_cost(path: str, route: str, repeats: int, memory: str | None = None) -> dict[str, Any]:
    """Seconds per full-data gradient and per HVP by ``route`` on the model at ``path`` (median of
    ``repeats`` after one warm-up each), opened as the CLI opens it; the set-up's seconds and route."""
    import statistics

    import torch

    from basins.problems import open_problem

    t0 = time.perf_counter()
    mem = None
    if memory:
        mem = int(float(memory.rstrip("GgBb")) * 2**30)
    opened = open_problem(path, data=os.path.join(path, "tok.pt"), loss="causal-lm", hvp_route=route, device="cpu",
                          memory_bytes=mem)
    p = opened.problem
    setup = time.perf_counter() - t0
    v = torch.randn(p.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def med(fn: Any) -> tuple[float, float]:
        """Median wall and CPU (this process' user + system) seconds of ``fn``."""
        fn()
        walls, cpus = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        return statistics.median(walls), statistics.median(cpus)

    hvp_s, hvp_cpu = med(lambda: p.hvp(v))
    grad_s, grad_cpu = med(lambda: p.grad())
    # on a shared machine the CPU seconds measure the work; the wall seconds include waiting for a core
    return {"P": p.num_params, "route": p.hvp_route, "setup_s": setup, "hvp_s": hvp_s, "grad_s": grad_s,
            "hvp_cpu_s": hvp_cpu, "grad_cpu_s": grad_cpu, "grads_per_hvp": hvp_s / grad_s,
            "grads_per_hvp_cpu": hvp_cpu / grad_cpu, "plan": p.routes.plan.describe()}


def command(tool: str, task: str, path: str, script: str, memory: str | None = None) -> list[str]:
    """The command line of one run (basins: its CLI, with ``--memory`` when given)."""
    if tool == "basins":
        k = "10" if task == "top10" else "1"
        cmd = [sys.executable, "-m", "basins.cli", "hessian", path, "--data", os.path.join(path, "tok.pt"),
               "--loss", "causal-lm", "-k", k, "--tol", "1e-3", "--json"]
        cmd += ["--memory", memory] if memory else []
        return cmd + (["--trace", "--trace-hvps", "30"] if task == "trace" else [])
    return [sys.executable, script, "--peer", tool, "--task", task, "--dir", path]


def timed(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd``; whole-process wall seconds, peak RSS (GiB, ``wait4``), stdout, how it ended."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        status = f"timed out ({timeout:.0f} s)"
    wall = time.perf_counter() - t0
    # communicate() reaped the child: its peak RSS is RUSAGE_CHILDREN's maximum, this run's alone
    # because every run has its own parent (the --measure wrapper of run_all)
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss * 1024 / 2**30
    cpu = usage.ru_utime + usage.ru_stime  # CPU seconds: on a shared machine, less noisy than the wall time
    if proc.returncode == -signal.SIGKILL and not status.startswith("timed out"):
        status = "killed (memory?)"
    return {"wall_s": wall, "cpu_s": cpu, "peak_gib": peak, "stdout": out, "stderr": err[-2000:], "status": status}


def run_costs(sizes: list[str], routes: list[str], seqs: int, seq_len: int, timeout: float, script: str,
              repeats: int, memory: str | None = None) -> list[dict[str, Any]]:
    """:func:`hvp_cost` of every size × route, each in its own process (peak RSS, timeout as :func:`timed`)."""
    rows = []
    for size in sizes:
        path = prepare(size, seqs, seq_len)
        for route in routes:
            cmd = [sys.executable, script, "--cost", route, "--dir", path, "--repeats", str(repeats)]
            cmd += ["--memory", memory] if memory else []
            wrapper = [sys.executable, script, "--measure", json.dumps(cmd), "--timeout", str(timeout)]
            proc = subprocess.run(wrapper, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
            r = json.loads(line[len(MARK):]) if line else {"status": "bench error", "stderr": proc.stderr[-500:]}
            row = {"size": size, "requested": route, "command": " ".join(cmd), **r}
            if r.get("status") == "ok":
                row.update(json.loads(r["stdout"].strip().splitlines()[-1]))
            rows.append(row)
            print(f"{size} {route}: {row.get('status')} {json.dumps({k: row.get(k) for k in COST_KEYS})}",
                  file=sys.stderr, flush=True)
    return rows


COST_KEYS = ("P", "route", "setup_s", "hvp_s", "grad_s", "grads_per_hvp", "peak_gib", "wall_s")


def cost_table(rows: list[dict[str, Any]]) -> str:
    """Cost vs P: seconds per HVP, gradients per HVP, peak RSS, set-up."""
    lines = ["| size | P | route asked | route | s / gradient (CPU) | s / HVP (CPU) | gradients / HVP (CPU) | "
             "set-up s | peak RSS GiB | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['size']} | - | {r['requested']} | - | - | - | - | - | {r.get('peak_gib', nan):.2f} | "
                         f"{r.get('status')} |")
            continue
        lines.append(f"| {r['size']} | {r['P']:,} | {r['requested']} | {r['route']} | {r['grad_s']:.3f} "
                     f"({r.get('grad_cpu_s', nan):.3f}) | {r['hvp_s']:.3f} ({r.get('hvp_cpu_s', nan):.3f}) | "
                     f"{r['grads_per_hvp']:.2f} ({r.get('grads_per_hvp_cpu', nan):.2f}) | {r['setup_s']:.1f} | "
                     f"{r['peak_gib']:.2f} | ok |")
    return "\n".join(lines)


def run_all(sizes: list[str], tools: list[str], tasks: list[str], seqs: int, seq_len: int, timeout: float,
            script: str, memory: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        path = prepare(size, seqs, seq_len)
        for task in tasks:
            for tool in tools:
                cmd = command(tool, task, path, script, memory)
                # a fresh parent per run, so that RUSAGE_CHILDREN's maximum is this run's alone
                wrapper = [sys.executable, script, "--measure", json.dumps(cmd), "--timeout", str(timeout)]
                proc = subprocess.run(wrapper, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
                r = json.loads(line[len(MARK):]) if line else {"status": "bench error", "stderr": proc.stderr[-500:]}
                row = {"size": size, "tool": tool, "task": task, "command": " ".join(cmd), **r}
                row.update(parse(tool, r))
                rows.append(row)
                # the memory plan line basins prints on stderr before the work
                row["plan_line"] = next((ln for ln in r.get("stderr", "").splitlines() if "memory plan" in ln), None)
                print(f"{size} {tool} {task}: {row.get('status')} {row.get('wall_s', 0):.1f} s "
                      f"{row.get('peak_gib', 0):.2f} GiB {row.get('hvps')} HVPs {row.get('value', '')}",
                      file=sys.stderr, flush=True)
    return rows


def parse(tool: str, r: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one run's stdout."""
    if r.get("status") != "ok":
        return {}
    try:
        data = json.loads(r["stdout"].strip().splitlines()[-1])
    except (ValueError, IndexError, KeyError):
        return {"status": "unreadable output"}
    if tool == "basins":
        out = {"P": data.get("num_params"), "hvps": data.get("num_hvps"), "setup_hvps": data.get("num_setup_hvps"),
               "trace_hvps": data.get("num_trace_hvps"), "route": data.get("hvp_route"),
               "plan": data.get("memory_plan"), "converged": data.get("num_converged")}
        if data.get("trace") is not None:
            out["value"] = f"{data['trace']:.6g} ± {data['trace_stderr']:.2g}"
        else:
            ev, eb = data["eigenvalues"], data.get("error_bounds") or data["residuals"]
            out["value"] = f"λ1 {ev[0]:.6g} ± {eb[0]:.1g}" + (f", λ10 {ev[-1]:.6g} ± {eb[-1]:.1g}" if len(ev) > 1 else "")
        return out
    if "trace" in data:
        return {"hvps": data["hvps"], "value": f"{data['trace']:.6g}"}
    ev = data["eigenvalues"]
    return {"hvps": data["hvps"], "value": f"λ1 {ev[0]:.6g}" + (f", λ10 {ev[-1]:.6g}" if len(ev) > 1 else "")}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| size | P | task | tool | result | HVPs | wall s | CPU s | peak RSS GiB | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    P = {r["size"]: r["P"] for r in rows if r.get("P")}
    for r in rows:
        hv = r.get("hvps")
        if r["tool"] == "basins" and hv is not None:
            hv = f"{hv} (set-up {r.get('setup_hvps')}" + (f", trace {r.get('trace_hvps')})" if r["task"] == "trace" else ")")
        lines.append(f"| {r['size']} | {format(P[r['size']], ',') if r['size'] in P else '-'} | {r['task']} | {r['tool']} | {r.get('value', '-')} | "
                     f"{hv if hv is not None else '-'} | {r.get('wall_s', float('nan')):.1f} | {r.get('cpu_s', float('nan')):.1f} | "
                     f"{r.get('peak_gib', float('nan')):.2f} | {r.get('status')} |")
    ratios = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for task in TASKS:
            b = [r for r in rows if (r["size"], r["task"], r["tool"]) == (size, task, "basins") and r["status"] == "ok"]
            peers = [r for r in rows if (r["size"], r["task"]) == (size, task) and r["tool"] != "basins" and r["status"] == "ok"]
            if b and peers:
                fastest = min(peers, key=lambda r: r["wall_s"])
                ratios.append(f"{size} {task}: basins {b[0]['wall_s']:.1f} s = {b[0]['wall_s'] / fastest['wall_s']:.2f}× "
                              f"the fastest peer that completed ({fastest['tool']}, {fastest['wall_s']:.1f} s)")
    return "\n".join(lines + [""] + ratios)
