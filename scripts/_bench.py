"""Helpers shared by the benchmark scripts (run as ``python scripts/bench_*.py``)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

from basins import Problem


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def example_problem() -> tuple[str, Problem]:
    """The built-in example bundle (written to a temporary folder) as a Problem, with a label."""
    from basins.files.example import make_example
    from basins.files.loading import load_bundle

    bundle = load_bundle(make_example(tempfile.mkdtemp(prefix="basins-bench-")))
    problem = Problem(bundle.model.module, bundle.data.inputs, bundle.data.targets, bundle.loss,
                      fixed_batch_size=bundle.model.fixed_batch_size)
    return f"example (P={problem.num_params:,}, n={problem.num_examples:,})", problem
