"""The public Python API as the README shows it, without the command line."""

from __future__ import annotations

import copy

import pytest
import torch

import basins
from basins.files.loading import load_bundle
from basins.linalg.lanczos import lanczos
from basins.linalg.operator import Operator


def test_readme_api_on_a_bundle(model_files) -> None:  # type: ignore[no-untyped-def]
    bundle = load_bundle(model_files.bundle)
    problem = basins.Problem(bundle.model.module, bundle.data.inputs, bundle.data.targets, bundle.loss,
                             fixed_batch_size=bundle.model.fixed_batch_size, dtype="float64")
    assert problem.num_params == 67 and problem.num_examples == 20
    reference = torch.nn.functional.cross_entropy(copy.deepcopy(model_files.module).double()(model_files.inputs.double()),
                                                  model_files.targets).item()
    assert problem.loss_at_optimum == pytest.approx(reference, rel=1e-10)

    H = problem.dense_hessian()
    v = torch.randn(problem.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(problem.hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    V = torch.randn(problem.num_params, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(problem.hvp(V), H @ V, rtol=1e-10, atol=1e-12)

    thetas = problem.theta0 + 1e-2 * V.T[:4]
    torch.testing.assert_close(problem.loss_many(thetas), torch.stack([problem.loss(t) for t in thetas]))

    top = lanczos(Operator(problem.hvp, problem.num_params), k=3, tol=1e-10, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    torch.testing.assert_close(top.eigenvalues, exact, rtol=1e-8, atol=1e-10)


def test_errors_are_typed() -> None:
    assert issubclass(basins.InputError, basins.BasinsError) and issubclass(basins.InputError, ValueError)
    assert issubclass(basins.ComputeError, basins.BasinsError)
    with pytest.raises(basins.InputError, match="unknown dtype"):
        basins.Problem(torch.nn.Linear(2, 1), torch.zeros(3, 2), torch.zeros(3, 1), dtype="float16")
