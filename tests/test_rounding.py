"""``bounds="sketch"``: one randomised rounding estimate (3 HVPs) for all k pairs of a float32 run;
every bound contains the float64 eigenvalue (dense float64 Hessian of the explicit loss), over
several seeds, and the checks cost 3 HVPs instead of k."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from basins import Problem
from basins.analyses.hessian import hessian_eigenvalues
from tests.dense import loss_hessian
from tests.models import classification_data, cnn_bn, image_data, mlp


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mlp", "cnn_bn"])
def test_sketched_bounds_contain_the_float64_eigenvalues(case: str) -> None:
    build, (x, y) = (mlp, classification_data(64)) if case == "mlp" else (cnn_bn, image_data(32))
    k = 6
    ref64 = build().double().eval()
    ref = torch.linalg.eigvalsh(loss_hessian(ref64, x.double(), y, nn.functional.cross_entropy)).flip(0)[:k]
    p = Problem(build(), x, y, "cross-entropy")
    assert p.dtype == torch.float32
    for seed in (0, 1, 2):
        before = p.counters.num_hvps
        res = hessian_eigenvalues(p, k=k, tol=1e-6, bounds="sketch", seed=seed)
        top = res.top
        assert top is not None and top.error_bounds is not None and bool(top.converged.all())
        assert res.num_check_hvps == 3 and p.counters.num_hvps - before == res.num_hvps
        err = (top.eigenvalues - ref).abs()
        assert bool((err <= top.error_bounds).all()), (seed, err.tolist(), top.error_bounds.tolist())
        assert bool((top.error_bounds >= top.residuals).all())
        assert bool((top.error_bounds <= 1e-3 * ref[0]).all())  # informative


def test_sketch_with_few_pairs_is_the_per_pair_check() -> None:
    x, y = classification_data(40)
    p = Problem(mlp(), x, y, "cross-entropy")
    a = hessian_eigenvalues(p, k=2, tol=1e-6, bounds="sketch")
    b = hessian_eigenvalues(p, k=2, tol=1e-6, bounds="rescaled")
    assert a.num_check_hvps == b.num_check_hvps == 2
    assert a.top is not None and b.top is not None and a.top.error_bounds is not None
    torch.testing.assert_close(a.top.error_bounds, b.top.error_bounds)
