"""Generate ``basins/data/example.npz``, the dataset of ``basins example``.

Three interleaved spirals in the plane: ``n = 1500`` points, inputs ``float32`` of shape
``(1500, 2)``, targets ``float32`` class probabilities of shape ``(1500, 3)`` (rows sum to 1).

Inputs: 500 points are drawn near each of three spiral arms. A point of arm ``k`` sits at
radius ``t`` and angle ``2πk/3 + 2π·TURNS·t`` for ``t`` uniform on ``[0.05, 1]``, plus isotropic
Gaussian noise of standard deviation ``NOISE``, so the arms touch in places.

Targets are *soft labels* from a smooth, known class posterior rather than the arm a point was
drawn from: with ``φ(x) = angle(x) − 2π·TURNS·|x|`` (the phase along the spiral),
``p(k | x) = softmax_k(BETA·cos(φ(x) − 2πk/3))``. The most likely class is the nearest arm (it
agrees with the arm the point was drawn from for about 97% of points) and the probabilities are
never 0 or 1. This is on purpose: with hard labels a network with more parameters than points
lowers the cross-entropy forever by sharpening its decision boundary around the overlapping
points (weights grow without bound, there is no minimum to analyse); with these targets the
cross-entropy has a minimum at finite weights, whose loss is close to the mean entropy of the
targets (about 0.227 nats). Use ``--loss cross-entropy`` (PyTorch's
``F.cross_entropy`` accepts class-probability targets). Random numbers come from
``numpy.random.Generator(PCG64(SEED))``.

The output is byte-for-byte deterministic: the ``.npz`` zip is written with fixed member
timestamps and no compression, so rerunning this script reproduces the shipped file exactly
(``tests/test_example.py`` checks that)::

    python data/make_example_data.py            # rewrites basins/data/example.npz
    python data/make_example_data.py OUT.npz    # writes elsewhere
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np

SEED = 20240601
N_PER_CLASS = 500
N_CLASSES = 3
TURNS = 1.0
NOISE = 0.06
BETA = 3.0

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "basins" / "data" / "example.npz"


def make_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(inputs, targets)``: ``float32 (1500, 2)`` and ``float32 (1500, 3)``."""
    rng = np.random.Generator(np.random.PCG64(SEED))
    xs = []
    for k in range(N_CLASSES):
        t = 0.05 + 0.95 * rng.random(N_PER_CLASS)
        angle = 2.0 * np.pi * k / N_CLASSES + 2.0 * np.pi * TURNS * t
        points = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
        points += NOISE * rng.standard_normal(points.shape)
        xs.append(points)
    inputs = np.concatenate(xs)[rng.permutation(N_CLASSES * N_PER_CLASS)]  # interleave the arms
    inputs = inputs.astype(np.float32)
    return np.ascontiguousarray(inputs), soft_labels(inputs)


def soft_labels(inputs: np.ndarray) -> np.ndarray:
    """Class probabilities ``p(k | x)`` (see the module docstring), ``float32 (n, 3)``."""
    x = inputs.astype(np.float64)
    phase = np.arctan2(x[:, 1], x[:, 0]) - 2.0 * np.pi * TURNS * np.hypot(x[:, 0], x[:, 1])
    shifts = 2.0 * np.pi * np.arange(N_CLASSES) / N_CLASSES
    logits = BETA * np.cos(phase[:, None] - shifts[None, :])
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(probs.astype(np.float32))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` archive of ``arrays`` with fixed timestamps (``np.savez`` stamps the clock)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    inputs, targets = make_arrays()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(npz_bytes({"inputs": inputs, "targets": targets}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
