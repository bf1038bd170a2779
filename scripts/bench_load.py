"""Whole-process time of ``basins hessian`` on fixed- and dynamic-batch ``.pt2`` exports, for one or
more basins installations (e.g. this checkout against an older one), paired in turn on the same files.

    python scripts/bench_load.py [--repeats 3] BASINS [BASINS ...]

BASINS is a ``basins`` executable (``.venv/bin/basins``). The problems are those of
``bench_hessian.py --whole-process`` (``scripts/_bench_problems.py``: a 26k-parameter MLP and a
22k-parameter CNN with BatchNorm), each exported for a fixed batch and with a dynamic batch
dimension; every run is ``basins hessian FILE --data DATA -k 10 --json -q`` in one thread. Prints
the median wall time (s) and peak RSS (MiB) of each cell, and the top eigenvalue (the same across
installations and exports). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def one(basins: str, model: str, data: str) -> tuple[float, float, float]:
    """(wall s, peak RSS MiB, λ1) of one whole process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([basins, "hessian", model, "--data", data, "-k", "10", "--json", "-q"],
                                stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{basins} on {model}: exit {proc.returncode}")
        out.seek(0)
        return wall, usage.ru_maxrss / 1024, float(json.loads(out.read())["eigenvalues"][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("basins", nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, os.path.join(here, "_bench_problems.py"), "write", d], check=True)
        print(f"{'problem':<14}{'export':<9}" + "".join(f"{b[-40:]:>44}" for b in args.basins))
        for name in ("mlp", "cnn"):
            for export in ("fixed", "dynamic"):
                model = f"{d}/{name}.pt2" if export == "fixed" else f"{d}/{name}_dynamic.pt2"
                cells = []
                for b in args.basins:
                    one(b, model, f"{d}/{name}_data.pt")  # warm-up (file cache)
                    runs = [one(b, model, f"{d}/{name}_data.pt") for _ in range(args.repeats)]
                    cells.append(f"{statistics.median(r[0] for r in runs):8.2f} s {runs[0][1]:7.0f} MiB "
                                 f"λ1 {runs[0][2]:.6g}")
                print(f"{name:<14}{export:<9}" + "".join(f"{c:>44}" for c in cells))


if __name__ == "__main__":
    main()
