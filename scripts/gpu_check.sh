#!/usr/bin/env bash
# The GPU path, checked: the suite's GPU tests, then top-10 / trace / LLC on a GPT-2-style model on
# the GPU, in one table.
#
#   scripts/gpu_check.sh          # on cuda (needs torch.cuda.is_available())
#   scripts/gpu_check.sh --cpu    # the same runs on the CPU (what a machine without a GPU can check)
#
# Model: transformers.GPT2LMHeadModel from a local GPT2Config (vocabulary 2048, 128 positions,
# width 128, 4 layers: P ≈ 1.07M), random weights, float32, saved with save_pretrained; data: 8
# seeded sequences of 128 tokens (labels = inputs). Nothing is downloaded. Runs, each in its own
# process (whole-process wall time and peak host RSS by wait4):
#   top10      basins hessian DIR --data tok.pt --loss causal-lm -k 10 --tol 1e-3 --device D --json
#   top10-f64  the same with --dtype float64: the reference the float32 bounds are checked against
#              (|λ32 − λ64| ≤ bound32 + bound64 for each of the 10)
#   trace      basins hessian ... -k 1 --trace --trace-hvps 30 (Hutch++)
#   llc        basins llc ... --chains 2 --draws 200 --burnin 200
# GPU_CHECK_SEQS / GPU_CHECK_LEN (default 8 / 128) set the token data, e.g. smaller for a quick CPU run.
# Exit status: 0 when the tests passed and every run succeeded with valid bounds, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEVICE=cuda
[ "${1:-}" = "--cpu" ] && DEVICE=cpu
WORK=$(mktemp -d "${TMPDIR:-/tmp}/basins-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch.cuda.is_available() is False here; run with --cpu for the CPU-side parts" >&2
    exit 2
fi

echo "== GPU-marked tests (tests/test_gpu.py) ==" >&2
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py > "$WORK/pytest.txt" 2>&1
TEST_RC=$?
tail -n 15 "$WORK/pytest.txt" >&2

"$PY" - "$WORK" "${GPU_CHECK_SEQS:-8}" "${GPU_CHECK_LEN:-128}" <<'PYEOF'
import os, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging
logging.set_verbosity_error()
work = sys.argv[1]
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=2048, n_positions=128, n_embd=128, n_layer=4, n_head=4, use_cache=False,
                 bos_token_id=None, eos_token_id=None, attn_implementation="eager")
GPT2LMHeadModel(cfg).float().eval().save_pretrained(os.path.join(work, "gpt2"))
ids = torch.randint(0, 2048, (int(sys.argv[2]), int(sys.argv[3])), generator=torch.Generator().manual_seed(0))
torch.save({"input_ids": ids, "labels": ids.clone()}, os.path.join(work, "tok.pt"))
PYEOF

COMMON=("$WORK/gpt2" --data "$WORK/tok.pt" --loss causal-lm --device "$DEVICE" --json)
"$PY" - "$WORK" "$DEVICE" "$TEST_RC" "$PY" "${COMMON[@]}" <<'PYEOF'
import json, os, resource, subprocess, sys, time
work, device, test_rc, py, common = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:]
runs = {
    "top10": ["hessian", *common, "-k", "10", "--tol", "1e-3"],
    "top10-f64": ["hessian", *common, "-k", "10", "--tol", "1e-3", "--dtype", "float64"],
    "trace": ["hessian", *common, "-k", "1", "--tol", "1e-3", "--trace", "--trace-hvps", "30"],
    "llc": ["llc", *common, "--chains", "2", "--draws", "200", "--burnin", "200"],
}
out = {}
for name, args in runs.items():
    cmd = [py, "-m", "basins.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    try:
        data = json.loads(stdout) if proc.returncode == 0 else None
    except ValueError:
        data = None
    last = (stderr.strip().splitlines() or ["?"])[-1]
    out[name] = {"cmd": " ".join(cmd), "rc": proc.returncode, "wall": wall, "data": data,
                 "error": None if data is not None else last[:160]}
    print(f"{name}: exit {proc.returncode} in {wall:.1f} s", file=sys.stderr)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20

def value(name, d):
    if d is None:
        return "-"
    if name == "llc":
        return f"{d.get('llc', d.get('llc_mean'))} ± {d.get('llc_stderr', d.get('stderr'))}"
    if name == "trace":
        return f"tr {d['trace']:.6g} ± {d['trace_stderr']:.2g}; λ1 {d['eigenvalues'][0]:.6g} ± {d['error_bounds'][0]:.1g}"
    return f"λ1 {d['eigenvalues'][0]:.6g} ± {d['error_bounds'][0]:.1g}, λ10 {d['eigenvalues'][-1]:.6g} ± {d['error_bounds'][-1]:.1g}"

valid = "-"
a, b = out["top10"]["data"], out["top10-f64"]["data"]
if a is not None and b is not None:
    ok = [abs(x - y) <= ex + ey for x, y, ex, ey in zip(a["eigenvalues"], b["eigenvalues"], a["error_bounds"], b["error_bounds"])]
    valid = f"{sum(ok)}/{len(ok)} within bound32 + bound64"
print(f"\nbasins GPU check on {device}: tests/test_gpu.py exit {test_rc}; peak host RSS of the largest run {peak:.2f} GiB\n")
print("| run | device | exit | result | HVPs | route | wall s | bounds | plan / error |")
print("|---|---|---|---|---|---|---|---|---|")
for name, r in out.items():
    d = r["data"] or {}
    print(f"| {name} | {device} | {r['rc']} | {value(name, r['data'])} | {d.get('num_hvps', '-')} | {d.get('hvp_route', '-')} | "
          f"{r['wall']:.1f} | {valid if name == 'top10' else '-'} | {d.get('memory_plan') or r['error'] or ''} |")
print("\ncommands:")
for name, r in out.items():
    print(f"  {name}: {r['cmd']}")
good = test_rc == 0 and all(r["rc"] == 0 for r in out.values()) and valid.startswith("10/10")
sys.exit(0 if good else 1)
PYEOF
