"""The one operator type, the one progress type, eigen's dense-or-Lanczos rule, records and volume slopes.

References are independent: dense products and ``torch.linalg.eigh`` in float64, and closed forms.
"""

from __future__ import annotations

import math

import pytest
import torch

from basins.analyses.eigen import dense_fits, dense_memory_bytes, hessian_eigenpairs
from basins.analyses.volume.estimators import volume_slopes
from basins.errors import ComputeError, InputError
from basins.linalg.operator import Operator, as_operator
from basins.progress import Progress, relay
from basins.record import Array, Record, plain

F64 = torch.float64


def _sym(P: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=F64)
    return (A + A.T) / 2


def test_dense_operator_applies_the_matrix_to_blocks_and_vectors() -> None:
    A = _sym(30, 0)
    op = as_operator(A)
    V = torch.randn(30, 4, dtype=F64)
    torch.testing.assert_close(op.apply(V), A @ V, rtol=0, atol=0)
    torch.testing.assert_close(op.apply(V[:, 0]), A @ V[:, 0], rtol=0, atol=0)
    assert op.num_params == 30 and op.dtype == F64 and op.device == torch.device("cpu")
    assert as_operator(op) is op
    # a float32 block gets the product back in float32 (the caller's dtype)
    assert op.apply(V.float()).dtype == torch.float32


@pytest.mark.parametrize("block", [1, 7, 64])
def test_materialise_equals_the_matrix_with_progress_in_blocks(block: int) -> None:
    A = _sym(23, 1)
    calls: list[int] = []
    seen: list[Progress] = []
    op = Operator(lambda V: calls.append(V.shape[1]) or A @ V, 23)
    H = op.materialise(block=block, callback=seen.append)
    torch.testing.assert_close(H, A, rtol=0, atol=1e-15)
    assert sum(calls) == 23 and max(calls) == min(block, 23)
    assert [p.done for p in seen] == [min(e, 23) for e in range(block, 23 + block, block)]
    assert all(p.total == 23 and p.unit == "matvecs" and p.phase == "materialise" for p in seen)
    skew = torch.triu(torch.ones(23, 23, dtype=F64), 1)  # a non-symmetric operator
    raw = Operator(lambda V: skew @ V, 23).materialise(block=block, symmetrise=False)
    torch.testing.assert_close(raw, skew, rtol=0, atol=0)
    torch.testing.assert_close(Operator(lambda V: skew @ V, 23).materialise(), (skew + skew.T) / 2, rtol=0, atol=0)


def test_checked_apply_and_bad_operators() -> None:
    with pytest.raises(InputError, match=r"matvec returned \(5,\) for an input of shape \(5, 2\)"):
        Operator(lambda V: V[:, 0], 5).apply(torch.ones(5, 2))
    with pytest.raises(InputError, match="matvec returned list"):
        Operator(lambda V: [1.0], 5).apply(torch.ones(5, 1))  # type: ignore[arg-type, return-value]
    with pytest.raises(ComputeError, match="non-finite"):
        Operator(lambda V: V * math.nan, 5).materialise()
    with pytest.raises(InputError, match="square"):
        as_operator(torch.ones(3, 4))
    with pytest.raises(InputError, match="floating"):
        as_operator(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(InputError, match="operator must be an Operator or a dense"):
        as_operator(lambda V: V)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="num_params=0"):
        Operator(lambda V: V, 0)
    with pytest.raises(InputError, match="block=0"):
        Operator(lambda V: V, 3).materialise(block=0)


def test_relay_shifts_and_renames() -> None:
    got: list[Progress] = []
    forward = relay(got.append, offset=10, unit="HVPs", phase="slq")
    assert forward is not None and relay(None) is None
    forward(Progress("inner", 3, 20, "matvecs", info="step 3/20"))
    forward(Progress("inner", 4, None, "matvecs"))
    assert got[0] == Progress("slq", 13, 30, "HVPs", info="step 3/20")
    assert got[1].total is None and got[1].done == 14
    whole = relay(got.append, total=99)
    assert whole is not None
    whole(Progress("x", 1, 5))
    assert got[-1].total == 99 and got[-1].fraction == pytest.approx(1 / 99)


def test_eigen_decides_dense_or_lanczos_and_both_agree_with_eigh() -> None:
    P, k = 60, 4
    ev = torch.cat([torch.linspace(-1.0, 1.0, P - 5, dtype=F64), torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0], dtype=F64)])
    Q = torch.linalg.qr(torch.randn(P, P, generator=torch.Generator().manual_seed(2), dtype=F64))[0]
    A = (Q * ev) @ Q.T
    ref_vals, ref_vecs = torch.linalg.eigh(A)
    ref_vals, ref_vecs = ref_vals.flip(0), ref_vecs.flip(1)
    dense = hessian_eigenpairs(Operator.dense(A), k, exact_max_params=P)
    assert dense.method == "exact" and dense.complete and dense.num_hvps == P
    torch.testing.assert_close(dense.eigenvalues, ref_vals, rtol=0, atol=1e-12)
    overlap = (dense.eigenvectors.T @ ref_vecs[:, :k]).abs().diagonal()
    torch.testing.assert_close(overlap, torch.ones(k, dtype=F64), rtol=0, atol=1e-10)
    lz = hessian_eigenpairs(Operator.dense(A), k, exact_max_params=P - 1, tol=1e-10)
    assert lz.method == "lanczos" and not lz.complete and lz.eigenvalues.shape == (k,)
    torch.testing.assert_close(lz.eigenvalues, ref_vals[:k], rtol=0, atol=1e-8)
    assert bool((lz.residuals <= 1e-8 * 7).all())
    with pytest.raises(InputError, match=r"k \(the number of top eigenvectors\) must be in \[1, P\)"):
        hessian_eigenpairs(Operator.dense(A), 0, exact_max_params=0)


def test_dense_fits_is_the_size_and_memory_rule() -> None:
    assert dense_memory_bytes(100) == 24 * 100**2
    assert dense_fits(100, max_params=100, memory_bytes=240_000)
    assert not dense_fits(100, max_params=100, memory_bytes=239_999)
    assert not dense_fits(101, max_params=100, memory_bytes=10**9)


def test_volume_slopes_recover_half_the_dimension_of_a_quadratic_basin() -> None:
    eps = [1e-3, 1e-2, 1e-1]
    d, c = 7, -3.0
    logv = [d / 2 * math.log(e) + c for e in eps]
    slopes = volume_slopes(logv, [True, True, True], eps)
    assert slopes == pytest.approx([d / 2, d / 2], rel=1e-12)
    assert volume_slopes(logv, [True, False, True], eps) == [None, None]
    assert volume_slopes([logv[0], None, logv[2]], [True, True, True], eps) == [None, None]


def test_record_json_keys_follow_the_arrays_and_overrides() -> None:
    rec = Record({"a": 1.0, "nan": math.nan, "which": "top"},
                 {"x": Array(torch.tensor([1.0, 2.0]), "x"), "big": Array([0.0] * 5, "big", in_json=False),
                  "ragged": Array([[1.0, math.nan]], "padded", json_values=[[1.0]])},
                 json_only={"which": "json view"})
    out = rec.as_json()
    assert set(out) == {"a", "nan", "which", "x", "ragged"} and out["which"] == "json view"
    assert plain(out) == {"a": 1.0, "nan": None, "which": "json view", "x": [1.0, 2.0], "ragged": [[1.0]]}
    view = rec.as_analysis()
    assert view["attrs"]["which"] == "top" and set(view["datasets"]) == {"x", "big", "ragged"}
