"""Generate ``basins/data/example.npz``, the dataset of ``basins example``.

Three interleaved noisy spirals in the plane, one class each: ``n = 1500`` points
(500 per class), inputs ``float32`` of shape ``(1500, 2)``, targets ``int64`` class labels
in ``{0, 1, 2}`` of shape ``(1500,)``. The noise makes the classes overlap a little, so a
classifier cannot reach zero cross-entropy and the trained network sits at a finite minimum
rather than drifting to infinity.

Point ``j`` of class ``k`` sits at radius ``r = t`` and angle
``2πk/3 + 2π·TURNS·t`` for ``t`` uniform on ``[0.05, 1]``, plus isotropic Gaussian noise of
standard deviation ``NOISE``. Random numbers come from ``numpy.random.Generator(PCG64(SEED))``.

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

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "basins" / "data" / "example.npz"


def make_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(inputs, targets)``: ``float32 (1500, 2)`` and ``int64 (1500,)``."""
    rng = np.random.Generator(np.random.PCG64(SEED))
    xs, ys = [], []
    for k in range(N_CLASSES):
        t = 0.05 + 0.95 * rng.random(N_PER_CLASS)
        angle = 2.0 * np.pi * k / N_CLASSES + 2.0 * np.pi * TURNS * t
        points = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1)
        points += NOISE * rng.standard_normal(points.shape)
        xs.append(points)
        ys.append(np.full(N_PER_CLASS, k, dtype=np.int64))
    inputs = np.concatenate(xs).astype(np.float32)
    targets = np.concatenate(ys)
    order = rng.permutation(len(targets))  # interleave the classes
    return np.ascontiguousarray(inputs[order]), np.ascontiguousarray(targets[order])


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
