"""A GPT-2-style language model on CPU: HVP / gradient per route, top-10 eigenvalues, peak memory, vs peers.

Usage::

    python scripts/bench_transformer.py            # ~1M parameters, 16 sequences of 64 tokens
    python scripts/bench_transformer.py --quick    # smaller, for a smoke run

Model: ``transformers.GPT2LMHeadModel`` built from a local ``GPT2Config`` (vocabulary 2048, 64
positions, width 128, 4 layers, 4 heads: P ≈ 1.06M with the tied output layer), random weights,
float32, eager attention; data: 16 random sequences of 64 tokens, the last 16 tokens of half of
them padded (``attention_mask = 0``, labels −100). Nothing is downloaded.

Every tool runs in its own process (this script started again with ``--only``), so that each
peak RSS (``ru_maxrss``) and whole-process time is its own:

* ``basins``: ``Problem`` set-up (loss, gradient, determinism check, route choice), seconds per
  gradient and per HVP for each route (median of ``--repeats``), and ``hessian_eigenvalues(k=10)``;
* ``eigenthings``: hessian-eigenthings 1.0 (``HessianOperator`` with its HF helper
  ``hf_lm_loss``, i.e. ``model(**batch).loss``, over the same batches, and its ``lanczos(k=10,
  reorthogonalize=True)``: without full reorthogonalisation, its default past 50 steps, the list
  holds ghost copies of λ_1);
* ``pyhessian``: PyHessian 0.1 (``hessian(model, criterion, data=...)`` with a wrapper returning
  ``logits`` and the shifted cross-entropy as criterion; ``eigenvalues(top_n=10)``, power
  iteration with deflation).

Notes on what each computes: basins and the next-token mean are over the *valid tokens* of the
whole data; hessian-eigenthings averages the per-batch losses with equal weights (with padding
and batches of unequal valid-token counts, another function: its λ differ by that), PyHessian
takes one batch and finds the eigenvalues of largest magnitude (negative ones at a point that is
not a minimum, as this random initialisation is). Its tolerances differ too (each tool's own convergence rule at tol 1e-3); the
table lists HVPs actually spent. Then, for basins alone, the peak RSS of one ``fwd-rev`` HVP
against the sequence length T and the vocabulary V (one chunk of 16 sequences): the
logits-sized buffers grow as 16·T·V.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from _bench import median_seconds  # scripts/ is on sys.path when run as a script

N_SEQ = 16


def build(vocab: int, positions: int, width: int, layers: int, seq: int, seed: int = 0) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=4, use_cache=False,
                     bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (N_SEQ, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, seq - seq // 4:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_basins(args: argparse.Namespace) -> dict[str, Any]:
    from basins.analyses.hessian import hessian_eigenvalues
    from basins.engine.problem import Problem

    model, named, labels = build(*args.shape)
    t0 = time.perf_counter()
    problem = Problem(model, named, labels, "causal-lm", batch_size=args.batch)
    setup = time.perf_counter() - t0
    out: dict[str, Any] = {"P": problem.num_params, "setup_s": setup, "auto_route": problem.hvp_route,
                           "setup_hvps": problem.counters.num_hvps}
    t_grad = median_seconds(problem.grad, args.repeats)
    out["grad_s"] = t_grad
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(1))
    for route in ("graph", "fwd-rev", "rev-rev"):
        try:
            out[f"hvp_{route}_s"] = median_seconds(lambda r=route: problem.hvp_with_route(v, r), args.repeats)
        except Exception as exc:  # noqa: BLE001 - a route that does not work here
            out[f"hvp_{route}_s"] = f"failed: {type(exc).__name__}"
    before = problem.counters.num_hvps
    t0 = time.perf_counter()
    res = hessian_eigenvalues(problem, k=10, tol=1e-3)
    out["top10_s"] = time.perf_counter() - t0
    out["top10_hvps"] = problem.counters.num_hvps - before
    assert res.top is not None
    out["top10"] = [float(x) for x in res.top.eigenvalues]
    out["converged"] = int(res.top.converged.sum())
    return out


def run_eigenthings(args: argparse.Namespace) -> dict[str, Any]:
    import hessian_eigenthings as he

    model, named, labels = build(*args.shape)
    batches = [{k: v[a : a + args.batch] for k, v in {**named, "labels": labels}.items()}
               for a in range(0, N_SEQ, args.batch)]
    op = he.HessianOperator(model, batches, he.hf_lm_loss())
    counter = {"n": 0}
    matvec = op.matvec

    def counted(v: torch.Tensor) -> torch.Tensor:
        counter["n"] += 1
        return matvec(v)

    op.matvec = counted  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(op.size, generator=g)
    out: dict[str, Any] = {"P": op.size, "hvp_s": median_seconds(lambda: matvec(v), args.repeats)}
    t0 = time.perf_counter()
    # full reorthogonalisation: without it (its default above 50 steps) the top-10 list holds ghost copies of λ_1
    res = he.lanczos(op, k=10, tol=1e-3, max_iter=min(200, op.size - 1), which="LA", seed=0, reorthogonalize=True)
    out["top10_s"] = time.perf_counter() - t0
    out["top10_hvps"] = counter["n"]
    out["top10"] = sorted((float(x) for x in res.eigenvalues), reverse=True)
    return out


def run_pyhessian(args: argparse.Namespace) -> dict[str, Any]:
    from pyhessian import hessian

    model, named, labels = build(*args.shape)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=ids, attention_mask=named["attention_mask"]).logits

    def criterion(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                                                 ignore_index=-100)

    ph = sys.modules["pyhessian.hessian"]  # the module (the package's attribute is the class)

    h = hessian(Logits().eval(), criterion, data=(named["input_ids"], labels), cuda=False)
    counter = {"n": 0}

    hvp = ph.hessian_vector_product

    def counted(*a: Any, **k: Any) -> Any:
        counter["n"] += 1
        return hvp(*a, **k)

    ph.hessian_vector_product = counted
    v = [torch.randn_like(p) for p in h.params]
    out: dict[str, Any] = {"P": sum(p.numel() for p in h.params),
                           "hvp_s": median_seconds(lambda: hvp(h.gradsH, h.params, v), args.repeats)}
    counter["n"] = 0
    t0 = time.perf_counter()
    values, _ = h.eigenvalues(maxIter=args.pyhessian_iters, tol=1e-3, top_n=10)
    out["top10_s"] = time.perf_counter() - t0
    out["top10_hvps"] = counter["n"]
    out["top10"] = sorted((float(x) for x in values), reverse=True)
    return out


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    from basins.engine.problem import Problem

    model, named, labels = build(*args.shape)
    problem = Problem(model, named, labels, "causal-lm", hvp_route="fwd-rev", check_determinism=False)
    base = peak_mib()
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    problem.hvp(v)
    return {"P": problem.num_params, "hvp_s": time.perf_counter() - t0, "peak_mib": peak_mib(), "before_mib": base}


RUNNERS = {"basins": run_basins, "eigenthings": run_eigenthings, "pyhessian": run_pyhessian, "memory": run_memory}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = RUNNERS[args.only](args)
    out["compute_s"] = time.perf_counter() - t0
    out["peak_mib"] = out.get("peak_mib", peak_mib())
    print(json.dumps(out))


def spawn(args: argparse.Namespace, only: str, shape: list[int], extra: list[str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--only", only, "--shape", *map(str, shape), "--repeats", str(args.repeats),
           "--batch", str(args.batch), "--threads", str(args.threads), "--pyhessian-iters", str(args.pyhessian_iters),
           *(extra or [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200], "process_s": wall}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller model and grid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="sequences per chunk / batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pyhessian-iters", type=int, default=100, help="PyHessian maxIter per eigenvalue")
    parser.add_argument("--only", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=5, help=argparse.SUPPRESS)  # vocab positions width layers seq
    args = parser.parse_args()
    if args.only:
        child(args)
        return
    shape = [512, 32, 64, 2, 32] if args.quick else [2048, 64, 128, 4, 64]
    print(f"# GPT-2-style LM on CPU ({args.threads} threads): vocabulary {shape[0]}, width {shape[2]}, "
          f"{shape[3]} layers, {N_SEQ} sequences of {shape[4]} tokens, chunks of {args.batch}, float32\n")
    b = spawn(args, "basins", shape)
    if "error" in b:
        print(f"basins failed: {b['error']}")
        return
    print(f"P = {b['P']:,}; basins set-up {b['setup_s']:.2f} s (auto route {b['auto_route']}, "
          f"{b['setup_hvps']} HVPs); gradient {b['grad_s'] * 1e3:.1f} ms\n")
    print("| route | s / HVP | HVP / gradient |\n|---|---|---|")
    for route in ("graph", "fwd-rev", "rev-rev"):
        t = b[f"hvp_{route}_s"]
        mark = " (auto)" if route == b["auto_route"] else ""
        secs = t if isinstance(t, str) else f"{t:.3f}"
        ratio = "-" if isinstance(t, str) else f"{t / b['grad_s']:.2f}"
        print(f"| {route}{mark} | {secs} | {ratio} |")
    peers = {"eigenthings": spawn(args, "eigenthings", shape), "pyhessian": spawn(args, "pyhessian", shape)}
    print("\n| tool | s / HVP | top-10 wall s | HVPs | whole process s | peak RSS MiB | λ_1 | λ_10 |\n"
          "|---|---|---|---|---|---|---|---|")
    best = min(v for k, v in b.items() if k.startswith("hvp_") and not isinstance(v, str))
    rows = [("basins", best, b), ("hessian-eigenthings 1.0", None, peers["eigenthings"]),
            ("PyHessian 0.1", None, peers["pyhessian"])]
    for name, hvp, r in rows:
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | {r['process_s']:.1f} | | | |")
            continue
        top = r["top10"]
        print(f"| {name} | {(hvp if hvp is not None else r['hvp_s']):.3f} | {r['top10_s']:.1f} | {r['top10_hvps']} | "
              f"{r['process_s']:.1f} | {r['peak_mib']:.0f} | {top[0]:.5g} | {top[-1]:.5g} |")
    print("\nPeak RSS of one fwd-rev HVP (basins, one process each; chunk = all 16 sequences):\n")
    print("| T | V | P | peak RSS MiB | s / HVP |\n|---|---|---|---|---|")
    grid = ([(32, 512), (64, 512), (32, 2048)] if args.quick else
            [(32, 2048), (64, 2048), (128, 2048), (64, 512), (64, 8192)])
    for seq, vocab in grid:
        r = spawn(args, "memory", [vocab, max(seq, shape[1]), shape[2], shape[3], seq], ["--batch", str(N_SEQ)])
        if "error" in r:
            print(f"| {seq} | {vocab} | failed: {r['error']} | | |")
            continue
        print(f"| {seq} | {vocab} | {r['P']:,} | {r['peak_mib']:.0f} | {r['hvp_s']:.3f} |")


if __name__ == "__main__":
    main()
