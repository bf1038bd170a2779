"""Top-k Hessian eigenvalues: basins (Lanczos) against PyHessian 0.1 and scipy ``eigsh``, in one process.

Usage::

    python scripts/bench_hessian.py            # example bundle + 26k-parameter MLP, median of 5 runs
    python scripts/bench_hessian.py --quick    # smaller MLP, 2 runs, for a smoke run
    python scripts/bench_hessian.py --whole-process [--repeats 3]   # whole processes, as a new user
    python scripts/bench_hessian.py --whole-process --repeats 5 --no-peers --basins OLD/.venv/bin/python \\
        .venv/bin/python                                            # before/after, fixed and dynamic exports

``--whole-process`` runs each tool as its own process (one thread), ``--repeats`` times after one
warm-up run, on the fixed-batch and the dynamic-batch ``.pt2`` export of the 26k-parameter MLP (n = 2,048) and the 22k-parameter CNN with BatchNorm (n = 1,024) of
``scripts/_bench_problems.py``, top-10, and reports per tool: whole-process wall time (median),
peak RSS (max), HVPs, worst error against float64 eigenvalues, and for basins its set-up share
(model and data loading and Problem construction, over the whole) and whether every error bound
contains the float64 eigenvalue. basins runs ``basins hessian MODEL.pt2 --data D --top-k 10
--json``; hessian-eigenthings 1.0 ``lanczos``, PyHessian 0.1 and scipy ``eigsh`` over a
curvlinops ``HessianLinearOperator`` run on the same weights as plain modules, at their
defaults (tol 1e-4 where they have one). The float64 reference is basins' Lanczos at tol 1e-10
in float64. It also times ``basins --version``.

Every method sees the same problem: the same model, the full data in one batch, the same dtype
and thread count. For top-1 and top-10 it prints HVPs spent, wall time (median of ``--repeats``
runs) and the worst relative error against a reference (dense ``eigvalsh`` when P ≤ 2000, else
``scipy.sparse.linalg.eigsh`` at tol 1e-10 on a float64 copy of the problem).

- basins: ``Problem(...)`` construction (loss, gradient, determinism check, HVP route choice)
  **plus** :func:`basins.analyses.hessian.hessian_eigenvalues` at its defaults (tol 1e-4, block 1).
- PyHessian 0.1 at its defaults (power iteration with deflation, ``maxIter=100, tol=1e-3``),
  constructor included. It accumulates into ``.grad``, so each run gets a fresh model copy.
  HVPs are counted by wrapping ``pyhessian.hessian.hessian_vector_product``. Its
  ``density()`` calls ``torch.eig``, removed from torch, and fails on current torch (not used).
- scipy ``eigsh(which="LA", tol=1e-4)`` on a ``LinearOperator`` over ``problem.hvp`` (the same
  Problem construction included in its time).

Also prints the time of one HVP over one full-data gradient for each HVP route. Timings are
noisy on a shared machine: compare within one run.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from _bench import median_seconds  # scripts/ is on sys.path when run as a script
from torch import nn

from basins import Problem
from basins.analyses.hessian import hessian_eigenvalues
from basins.engine.losses import get_loss


@dataclass
class Case:
    name: str
    module: nn.Module  # a plain nn.Module (PyHessian needs .eval() and .parameters())
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: str


@dataclass
class Run:
    values: list[float]
    num_hvps: int
    seconds: float
    setup_seconds: float  # Problem construction (basins, eigsh) or the PyHessian constructor


# ---------------------------------------------------------------------- problems
def example_case() -> Case:
    """The ``basins example`` bundle, as a plain module (a torch.export module refuses .eval())."""
    from basins.files.example import make_example
    from basins.files.loading import load_bundle

    directory = tempfile.mkdtemp(prefix="basins-bench-")
    bundle = load_bundle(make_example(directory))
    module = _plain_module(bundle.model.module)
    loss = bundle.loss if isinstance(bundle.loss, str) else getattr(bundle.loss, "__name__", "cross-entropy")
    x, y = bundle.data.inputs, bundle.data.targets
    P = sum(p.numel() for p in module.parameters())
    return Case(f"example bundle (P={P:,}, n={x.shape[0]:,})", module, x, y, loss)


class _Wrapped(nn.Module):
    """An exported module's graph with its parameters as ordinary, trainable ``nn.Parameter``s."""

    def __init__(self, exported: nn.Module) -> None:
        super().__init__()
        self.inner = exported
        self.inner.train = lambda mode=True: self.inner  # type: ignore[method-assign]  # mode fixed at export

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _plain_module(module: nn.Module) -> nn.Module:
    try:
        module.eval()
        return module
    except NotImplementedError:
        return _Wrapped(module)


def mlp_case(n: int, width: int, steps: int) -> Case:
    """An MLP classifier 32-width-width/4-10 on n synthetic examples labelled by a random teacher,
    trained briefly (full-batch Adam, deterministic)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    teacher = torch.randn(32, 10, generator=g)
    y = (torch.tanh(x @ teacher) + 0.3 * torch.randn(n, 10, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width // 4), nn.Tanh(),
                          nn.Linear(width // 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    P = sum(p.numel() for p in model.parameters())
    return Case(f"MLP 32-{width}-{width // 4}-10 (P={P:,}, n={n:,})", model, x, y, "cross-entropy")


def make_problem(case: Case, dtype: torch.dtype) -> Problem:
    return Problem(copy.deepcopy(case.module), case.inputs, case.targets, case.loss, dtype=dtype, device="cpu")


# ---------------------------------------------------------------------- methods
def run_basins(case: Case, k: int, dtype: torch.dtype) -> Run:
    t0 = time.perf_counter()
    problem = make_problem(case, dtype)
    setup = time.perf_counter() - t0
    result = hessian_eigenvalues(problem, k=k, which="top")
    seconds = time.perf_counter() - t0
    assert result.top is not None
    return Run(result.top.eigenvalues.tolist(), result.num_hvps, seconds, setup)


def _operator(problem: Problem, counter: list[int]) -> Any:
    from scipy.sparse.linalg import LinearOperator

    P = problem.num_params
    np_dtype = np.float64 if problem.dtype == torch.float64 else np.float32

    def matvec(v: np.ndarray) -> np.ndarray:
        counter[0] += 1
        return problem.hvp(torch.from_numpy(np.asarray(v, dtype=np_dtype).reshape(P))).numpy()

    return LinearOperator((P, P), matvec=matvec, dtype=np_dtype)


def run_eigsh(case: Case, k: int, dtype: torch.dtype, tol: float = 1e-4) -> Run:
    from scipy.sparse.linalg import eigsh

    t0 = time.perf_counter()
    problem = make_problem(case, dtype)
    setup = time.perf_counter() - t0
    counter = [0]
    v0 = np.random.default_rng(0).standard_normal(problem.num_params)
    vals = eigsh(_operator(problem, counter), k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    seconds = time.perf_counter() - t0
    return Run(sorted(vals.tolist(), reverse=True), counter[0], seconds, setup)


@contextmanager
def _default_dtype(dtype: torch.dtype):  # PyHessian draws its vectors with the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def run_pyhessian(case: Case, k: int, dtype: torch.dtype, seed: int) -> Run:
    import importlib

    ph: Any = importlib.import_module("pyhessian.hessian")  # the module (the package exports the class by that name)
    counter = [0]
    original = ph.hessian_vector_product

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    try:
        torch.manual_seed(seed)
        model = copy.deepcopy(case.module).to(dtype)  # fresh .grad: PyHessian accumulates into it
        x = case.inputs.to(dtype) if case.inputs.is_floating_point() else case.inputs
        y = case.targets.to(dtype) if case.targets.is_floating_point() else case.targets
        t0 = time.perf_counter()
        with _default_dtype(dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # its backward(create_graph=True) warns
            h = ph.hessian(model, get_loss(case.loss), data=(x, y), cuda=False)
            setup = time.perf_counter() - t0
            vals, _ = h.eigenvalues(top_n=k)
        seconds = time.perf_counter() - t0
    finally:
        ph.hessian_vector_product = original
    return Run(sorted(vals, reverse=True), counter[0], seconds, setup)


def reference(case: Case, k: int) -> list[float]:
    """Top-k in float64: dense eigvalsh for P ≤ 2000, else eigsh at tol 1e-10."""
    from scipy.sparse.linalg import eigsh

    problem = make_problem(case, torch.float64)
    if problem.num_params <= 2000:
        return torch.linalg.eigvalsh(problem.dense_hessian()).flip(0)[:k].tolist()
    v0 = np.random.default_rng(1).standard_normal(problem.num_params)
    vals = eigsh(_operator(problem, [0]), k=k, which="LA", tol=1e-10, v0=v0, return_eigenvectors=False)
    return sorted(vals.tolist(), reverse=True)


def worst_rel_error(values: list[float], ref: list[float]) -> float:
    k = len(values)
    return max(abs(a - b) / abs(b) for a, b in zip(values, ref[:k]))


def _seedless(fn: Callable[[Case, int, torch.dtype], Run], case: Case, k: int, dtype: torch.dtype, i: int) -> Run:
    return fn(case, k, dtype)


def _seeded(fn: Callable[..., Run], case: Case, k: int, dtype: torch.dtype, i: int) -> Run:
    return fn(case, k, dtype, seed=i)


def median_runs(fn: Callable[[int], Run], repeats: int) -> tuple[Run, float, float]:
    """The first run, the median wall time and the median setup time of ``repeats`` runs."""
    fn(repeats)  # warm-up (first-call costs of torch.func, allocator), not timed
    runs = [fn(i) for i in range(repeats)]
    return runs[0], statistics.median(r.seconds for r in runs), statistics.median(r.setup_seconds for r in runs)


def hvp_ratios(case: Case, dtype: torch.dtype, repeats: int) -> list[tuple[str, float, float]]:
    """(route, seconds per gradient, seconds per HVP) for each route; the auto choice is marked."""
    problem = make_problem(case, dtype)

    t_grad = median_seconds(problem.grad, repeats)
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    out = []
    for route in ("graph", "fwd-rev", "rev-rev"):
        try:
            t_hvp = median_seconds(functools.partial(problem.hvp_with_route, v, route), repeats)
        except Exception as exc:  # noqa: BLE001 - a route that does not work for this model
            out.append((f"{route}: failed ({type(exc).__name__})", t_grad, float("nan")))
            continue
        out.append((route + (" (auto)" if route == problem.hvp_route else ""), t_grad, t_hvp))
    return out


# ---------------------------------------------------------------------- whole processes
def _child_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Like :func:`_child`, with the peak RSS of this child alone (GNU time when present)."""
    import json
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    probe = ("import json,resource,subprocess,sys,time;t=time.perf_counter();"
             "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);w=time.perf_counter()-t;"
             "sys.stderr.write(p.stderr);sys.stdout.write(p.stdout);"
             "print(json.dumps({'rc':p.returncode,'wall':w,"
             "'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}),file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env)
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    if stats["rc"] != 0:
        tail = proc.stderr.strip().splitlines()
        raise RuntimeError(f"{' '.join(cmd)} failed: {tail[-2] if len(tail) > 1 else stats['rc']}")
    return float(stats["wall"]), float(stats["rss"]), proc.stdout


def whole_process(repeats: int, installs: list[str] | None = None, peers: bool = True) -> None:
    """Whole processes on the fixed- and dynamic-batch exports of the MLP and the CNN (module docstring).

    ``installs``: Python interpreters whose ``-m basins.cli`` is timed, in turn on the same files (a
    before/after comparison; default this interpreter); each cell gets one warm-up run (file cache)
    first. ``peers``: also time the peer tools (fixed exports' weights, this interpreter)."""
    import json
    import os

    from basins.analyses.eigen import hessian_operator
    from basins.files.loading import resolve_inputs
    from basins.linalg.lanczos import lanczos

    here = os.path.dirname(os.path.abspath(__file__))
    problems_py = os.path.join(here, "_bench_problems.py")
    directory = tempfile.mkdtemp(prefix="basins-bench-whole-")
    _child_rss([sys.executable, problems_py, "write", directory])
    installs = installs or [sys.executable]
    rows, verdicts = [], []
    for python in installs:
        version = sorted(_child_rss([python, "-m", "basins.cli", "--version"])[0] for _ in range(max(3, repeats)))
        verdicts.append((f"basins --version < 0.5 s ({python})", version[len(version) // 2] < 0.5,
                         f"{version[len(version) // 2]:.2f} s"))
    for name, label in (("mlp", "MLP 32-256-64-10, P=25,546, n=2,048"), ("cnn", "CNN+BatchNorm, P=21,930, n=1,024")):
        model, data, loss = resolve_inputs(f"{directory}/{name}.pt2", data=f"{directory}/{name}_data.pt")
        p64 = Problem(model.module, data, None, loss, fixed_batch_size=model.fixed_batch_size, dtype="float64")
        ref = lanczos(hessian_operator(p64), k=10, tol=1e-10, dtype=torch.float64).eigenvalues.tolist()
        del p64
        tools: dict[str, list[str]] = {}
        for python in installs:
            tag = f" [{python}]" if len(installs) > 1 else ""
            for export, suffix in (("fixed", ""), ("dynamic", "_dynamic")):
                tools[f"basins, {export} batch{tag}"] = [
                    python, "-m", "basins.cli", "hessian", f"{directory}/{name}{suffix}.pt2", "--data",
                    f"{directory}/{name}_data.pt", "--top-k", "10", "--json", "--quiet"]
        if peers:
            tools.update({peer: [sys.executable, problems_py, "run", peer, name, directory, "10", "float32"]
                          for peer in ("eigenthings", "pyhessian", "eigsh")})
        walls: dict[str, float] = {}
        errors: dict[str, float] = {}
        for tool, cmd in tools.items():
            runs = []
            for i in range(repeats + 1):  # the first: warm-up (file cache), not counted
                try:
                    run = _child_rss(cmd)
                except RuntimeError as exc:
                    rows.append(f"| {label} | {tool} | failed: {exc} | | | | |")
                    break
                if i:
                    runs.append(run)
            if not runs:
                continue
            wall = statistics.median(r[0] for r in runs)
            rss = max(r[1] for r in runs)
            out = json.loads(runs[0][2])
            values = out.get("eigenvalues") or out["values"]
            err = max(abs(a - b) for a, b in zip(values, ref))
            extra = ""
            if tool.startswith("basins"):
                bounds = out["error_bounds"]
                held = all(abs(a - b) <= e for a, b, e in zip(values, ref, bounds))
                setup = out["setup_seconds"] / wall
                extra = f"set-up {setup:.0%} of the whole; bounds contain float64: {'yes' if held else '**no**'}"
                verdicts.append((f"{label}, {tool}: every error bound contains the float64 eigenvalue", held,
                                 f"worst error / bound {max(abs(a - b) / e for a, b, e in zip(values, ref, bounds)):.2f}"))
                verdicts.append((f"{label}, {tool}: set-up ≤ 20% of the whole", setup <= 0.2, f"{setup:.0%}"))
            walls[tool] = wall
            errors[tool] = err
            rows.append(f"| {label} | {tool} | {wall:.2f} | {rss:.0f} | {out['num_hvps']} | {err:.1e} | {extra} |")
        mine = f"basins, fixed batch [{installs[-1]}]" if len(installs) > 1 else "basins, fixed batch"
        peer_walls = {t: w for t, w in walls.items() if not t.startswith("basins")}
        if mine in walls and peer_walls:
            fastest = min(peer_walls, key=peer_walls.__getitem__)
            ratio = walls[mine] / peer_walls[fastest]
            verdicts.append((f"{label}: basins whole process ≤ 0.7× the fastest peer's ({fastest}, any accuracy)",
                             ratio <= 0.7, f"{ratio:.2f}×"))
            # peers at least as accurate as basins (their worst error ≤ 10× basins', or ≤ 1e-6·λ_max)
            as_good = {t: w for t, w in peer_walls.items()
                       if errors[t] <= max(10 * errors[mine], 1e-6 * abs(ref[0]))}
            if as_good:
                best = min(as_good, key=as_good.__getitem__)
                r = walls[mine] / as_good[best]
                verdicts.append((f"{label}: basins ≤ 0.7× the fastest peer as accurate ({best})", r <= 0.7, f"{r:.2f}×"))
            else:
                verdicts.append((f"{label}: basins more accurate than every peer", True,
                                 ", ".join(f"{t} {errors[t]:.1e}" for t in peer_walls)))
    print(f"torch {torch.__version__}, 1 thread per process, top-10 float32, median of {repeats} whole processes "
          "(after one warm-up run each)\n")
    print("| problem | tool | wall s | peak RSS MiB | HVPs | worst abs. error vs float64 | notes |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| target | met | measured |")
    print("|---|---|---|")
    for what, ok, measured in verdicts:
        print(f"| {what} | {'yes' if ok else '**no**'} | {measured} |")


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small MLP, 2 runs: a smoke run")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per timing (median; default 5, with --whole-process 3)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for every method (default 1: on a shared 2-core machine, "
                             "2 threads under load ran 10-100x slower and made timings meaningless)")
    parser.add_argument("--no-example", action="store_true", help="skip the example bundle")
    parser.add_argument("--whole-process", action="store_true",
                        help="whole processes of basins and its peers on the MLP and CNN problems (see above)")
    parser.add_argument("--basins", nargs="+", metavar="PYTHON",
                        help="with --whole-process: the Python interpreters whose basins is timed, in turn on the "
                             "same files (e.g. an older installation's .venv/bin/python, then this one's)")
    parser.add_argument("--no-peers", action="store_true", help="with --whole-process: basins only")
    args = parser.parse_args()
    if args.whole_process:
        whole_process(args.repeats or 3, args.basins, peers=not args.no_peers)
        return
    args.repeats = args.repeats or 5
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    dtype = torch.float64 if args.dtype == "float64" else torch.float32

    cases = []
    if not args.no_example:
        cases.append(example_case())
    cases.append(mlp_case(512, 64, 100) if args.quick else mlp_case(2048, 256, 300))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; "
          f"wall time = median of {repeats} runs\n")

    rows, ratio_rows, verdicts = [], [], []
    for case in cases:
        print(f"{case.name}: reference ...", file=sys.stderr, flush=True)
        ref = reference(case, 10)
        for route, t_grad, t_hvp in hvp_ratios(case, dtype, repeats):
            ratio_rows.append(f"| {case.name} | {route} | {t_grad * 1e3:.2f} | {t_hvp * 1e3:.2f} | {t_hvp / t_grad:.2f} |")
            if "(auto)" in route:
                verdicts.append((f"{case.name}: one HVP ≤ 2× one gradient (auto route)", t_hvp / t_grad <= 2.0,
                                 f"{t_hvp / t_grad:.2f}×"))
        for k in (1, 10):
            print(f"{case.name}: top-{k} ...", file=sys.stderr, flush=True)
            results = {
                "basins": median_runs(functools.partial(_seedless, run_basins, case, k, dtype), repeats),
                "PyHessian 0.1": median_runs(functools.partial(_seeded, run_pyhessian, case, k, dtype), repeats),
                "scipy eigsh tol 1e-4": median_runs(functools.partial(_seedless, run_eigsh, case, k, dtype), repeats),
            }
            for method, (run, seconds, setup) in results.items():
                err = worst_rel_error(run.values, ref)
                rows.append(f"| {case.name} | {k} | {method} | {run.num_hvps} | {seconds:.3f} | {setup:.3f} | {err:.1e} |")
            if k == 10:
                b = results["basins"][0]
                tb = results["basins"][1]
                tp = results["PyHessian 0.1"][1]
                e = results["scipy eigsh tol 1e-4"][0]
                berr = worst_rel_error(b.values, ref)
                verdicts += [
                    (f"{case.name}: basins top-10 worst relative error ≤ 1e-4", berr <= 1e-4, f"{berr:.1e}"),
                    (f"{case.name}: basins time ≤ 1/3 PyHessian's", tb <= tp / 3, f"{tb:.3f} s vs {tp:.3f} s "
                     f"({tp / tb:.1f}× faster)"),
                    (f"{case.name}: basins HVPs ≤ eigsh(1e-4) HVPs", b.num_hvps <= e.num_hvps,
                     f"{b.num_hvps} vs {e.num_hvps}"),
                ]

    print("| problem | k | method | HVPs | wall s (setup included) | of which setup s | worst rel. error |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| problem | HVP route | gradient ms | HVP ms | HVP / gradient |")
    print("|---|---|---|---|---|")
    print("\n".join(ratio_rows))
    print("\n| target | met | measured |")
    print("|---|---|---|")
    for what, ok, measured in verdicts:
        print(f"| {what} | {'yes' if ok else '**no**'} | {measured} |")
    print("\nPyHessian's density() calls torch.eig (removed from torch) and fails on current torch; not benchmarked.")


if __name__ == "__main__":
    main()
