"""The two benchmark problems of ``bench_hessian.py --whole-process`` and the peers' runs, one per process.

Imports only torch (and, in the child, the peer being measured), so that a peer's process pays
for nothing of basins. Run by ``bench_hessian.py``; by hand::

    python scripts/_bench_problems.py write DIR                 # DIR/{mlp,cnn}.pt2, _data.pt, _state.pt
    #                                                             and {mlp,cnn}_dynamic.pt2 (batch a torch.export.Dim)
    python scripts/_bench_problems.py run TOOL NAME DIR K DTYPE  # one peer, JSON on stdout

Problems: a 26k-parameter MLP (32-256-64-10, tanh) on n = 2,048 and a 22k-parameter CNN with
BatchNorm (two conv-BN-ReLU-pool blocks, 16 × 16 × 3 inputs) on n = 1,024, both trained briefly
(deterministic), exported with ``torch.export`` for a fixed batch of n (the whole data).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from torch import nn


class CNN(nn.Module):
    """conv(3→16)-BN-ReLU-pool, conv(16→32)-BN-ReLU-pool, linear 512→32, tanh, linear 32→10: P = 21,930."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.f1, self.f2 = nn.Linear(512, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        return self.f2(torch.tanh(self.f1(x.flatten(1))))


def mlp_module() -> nn.Module:
    """32-256-64-10 with tanh: P = 25,546."""
    return nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 10))


def make(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The trained model (eval mode) and its data, deterministic."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        x = torch.randn(2048, 32, generator=g)
        y = (torch.tanh(x @ torch.randn(32, 10, generator=g)) + 0.3 * torch.randn(2048, 10, generator=g)).argmax(1)
        torch.manual_seed(0)
        model, steps = mlp_module(), 300
    else:
        x = torch.randn(1024, 3, 16, 16, generator=g)
        y = (x.flatten(1) @ torch.randn(768, 10, generator=g)).argmax(1)
        torch.manual_seed(1)
        model, steps = CNN(), 150
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def write(directory: str) -> None:
    for name in ("mlp", "cnn"):
        model, x, y = make(name)
        torch.export.save(torch.export.export(model, (x,)), f"{directory}/{name}.pt2")
        batch = torch.export.Dim("batch", min=2, max=1 << 20)
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)),
                          f"{directory}/{name}_dynamic.pt2")
        torch.save({"inputs": x, "targets": y}, f"{directory}/{name}_data.pt")
        torch.save(model.state_dict(), f"{directory}/{name}_state.pt")


def _load(name: str, directory: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = mlp_module() if name == "mlp" else CNN()
    model.load_state_dict(torch.load(f"{directory}/{name}_state.pt", weights_only=True))
    data = torch.load(f"{directory}/{name}_data.pt", weights_only=True)
    return model.to(dtype).eval(), data["inputs"].to(dtype), data["targets"]


def run(tool: str, name: str, directory: str, k: int, dtype_name: str) -> dict[str, Any]:
    """Top-k eigenvalues by one peer at its documented defaults (tol 1e-4 where it has one)."""
    dtype = torch.float64 if dtype_name == "float64" else torch.float32
    model, x, y = _load(name, directory, dtype)
    criterion = nn.CrossEntropyLoss()
    count = [0]
    t_setup = time.perf_counter()
    if tool == "eigenthings":
        import hessian_eigenthings as he

        op = he.HessianOperator(model, [(x, y)], he.supervised_loss(criterion))
        matvec = op.matvec

        def counted(v: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            return matvec(v)

        op.matvec = counted  # type: ignore[method-assign]
        first = time.perf_counter()
        res = he.lanczos(op, k=k, tol=1e-4, which="LA", seed=0)
        values = sorted(res.eigenvalues.tolist(), reverse=True)
    elif tool == "pyhessian":
        import importlib
        import warnings

        ph: Any = importlib.import_module("pyhessian.hessian")  # the module (the package exports the class by that name)

        original = ph.hessian_vector_product

        def counted_ph(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return original(*args, **kwargs)

        ph.hessian_vector_product = counted_ph
        torch.set_default_dtype(dtype)  # it draws its vectors with the default dtype
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h = ph.hessian(model, criterion, data=(x, y), cuda=False)
            first = time.perf_counter()
            vals, _ = h.eigenvalues(top_n=k)
        values = sorted(vals, reverse=True)
    elif tool == "eigsh":
        import numpy as np
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import LinearOperator, eigsh

        H = HessianLinearOperator(model, criterion, [p for p in model.parameters()], [(x, y)],
                                  check_deterministic=False).to_scipy()
        P = H.shape[0]

        def mv(v: np.ndarray) -> np.ndarray:
            count[0] += 1
            return H @ v

        first = time.perf_counter()
        vals = eigsh(LinearOperator((P, P), matvec=mv, dtype=H.dtype), k=k, which="LA", tol=1e-4,
                     v0=np.random.default_rng(0).standard_normal(P), return_eigenvectors=False)
        values = sorted(vals.tolist(), reverse=True)
    else:
        raise SystemExit(f"unknown tool {tool}")
    return {"values": values, "num_hvps": count[0], "setup_seconds": first - t_setup}


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        print(json.dumps(run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])))
