"""basins.linalg.lanczos against dense float64 eigendecompositions of matrices with known spectra."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dense import CountingMatvec, bottom, symmetric_with_spectrum, top
from hypothesis import given, settings
from hypothesis import strategies as st

from basins.errors import ComputeError, InputError
from basins.linalg.lanczos import LanczosBothEnds, LanczosResult, lanczos
from basins.linalg.operator import Operator
from basins.progress import Progress

F64 = torch.float64
REL = 1e-6  # eigenvalue accuracy asked of a run with tol=1e-8
ROUNDING = 1e-11  # below this relative residual, rounding in H y - θ y dominates the comparison




def spectrum(kind: str, P: int, seed: int) -> torch.Tensor:
    """Named test spectra (float64, eigenvalues distinct unless the kind says otherwise)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "nn":  # a few outliers over a near-zero bulk of both signs, as in a trained net
        out = 100 * 0.7 ** torch.arange(12, dtype=F64)
        bulk = 0.05 * torch.randn(P - 12, generator=g, dtype=F64) * torch.randn(P - 12, generator=g, dtype=F64).abs()
        return torch.cat([out, bulk])
    if kind == "indefinite":
        return torch.randn(P, generator=g, dtype=F64) * 3
    if kind == "uniform":  # no gap at the top: slow convergence, residuals over many decades
        return torch.linspace(-1, 1, P, dtype=F64) + 1e-4 * torch.rand(P, generator=g, dtype=F64)
    if kind == "clustered":  # 5 clusters of relative width 1e-2
        centres = torch.tensor([10.0, 5.0, 1.0, -2.0, 0.1], dtype=F64)
        idx = torch.arange(P) % 5
        return centres[idx] * (1 + 1e-2 * torch.rand(P, generator=g, dtype=F64))
    if kind == "lowrank":  # rank 10, a block of P - 10 exact zeros
        out = torch.zeros(P, dtype=F64)
        out[:10] = 1 + 9 * torch.rand(10, generator=g, dtype=F64)
        return out
    if kind == "lowrank-indefinite":
        out = torch.zeros(P, dtype=F64)
        out[:10] = torch.randn(10, generator=g, dtype=F64) * 5
        return out
    raise AssertionError(kind)


def problem(kind: str, P: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    lam = spectrum(kind, P, seed)
    return symmetric_with_spectrum(lam, seed), lam


def explicit_residuals(h: torch.Tensor, r: LanczosResult) -> torch.Tensor:
    assert r.eigenvectors is not None
    y = r.eigenvectors.to(F64)
    return torch.linalg.vector_norm(h @ y - y * r.eigenvalues, dim=0)


def assert_within_residual(r: LanczosResult, lam: torch.Tensor) -> None:
    """Each Ritz value has a true eigenvalue within its residual (+ rounding)."""
    dist = (r.eigenvalues[:, None] - lam[None, :]).abs().min(dim=1).values
    assert bool((dist <= r.residuals + 1e-12 * r.scale).all()), (dist, r.residuals)


@pytest.mark.parametrize("kind", ["nn", "indefinite", "clustered"])
def test_top_k_matches_eigvalsh(kind: str) -> None:
    h, lam = problem(kind, P=300)
    r = lanczos(Operator(CountingMatvec(h), 300), k=10, tol=1e-8)
    assert isinstance(r, LanczosResult) and r.which == "top" and r.all_converged
    assert r.eigenvalues.dtype == F64 and r.eigenvalues.shape == (10,)
    assert bool((r.eigenvalues[:-1] >= r.eigenvalues[1:]).all())
    ref = top(torch.linalg.eigvalsh(h), 10)
    assert float(((r.eigenvalues - ref).abs() / ref.abs()).max()) <= REL
    assert_within_residual(r, lam)


@pytest.mark.parametrize("kind", ["nn", "indefinite", "lowrank"])
def test_bottom_k_matches_eigvalsh(kind: str) -> None:
    h, lam = problem(kind, P=300)
    r = lanczos(Operator(CountingMatvec(h), 300), k=5, which="bottom", tol=1e-8)
    ref = bottom(torch.linalg.eigvalsh(h), 5)
    lam_max = float(lam.abs().max())
    assert r.all_converged and bool((r.eigenvalues[:-1] <= r.eigenvalues[1:]).all())
    assert float((r.eigenvalues - ref).abs().max()) <= REL * lam_max


def test_indefinite_bottom_is_negative() -> None:
    h, lam = problem("indefinite", P=300, seed=3)
    r = lanczos(Operator(CountingMatvec(h), 300), k=3, which="bottom", tol=1e-8)
    assert float(r.eigenvalues[0]) < 0
    assert float(r.eigenvalues[0]) == pytest.approx(float(lam.min()), rel=REL)


@pytest.mark.parametrize("block_size", [1, 2])
def test_both_ends_from_one_run(block_size: int) -> None:
    h, lam = problem("indefinite", P=300, seed=1)
    mv = CountingMatvec(h)
    r = lanczos(Operator(mv, 300), k=4, which="both", tol=1e-8, block_size=block_size, return_eigenvectors=True)
    assert isinstance(r, LanczosBothEnds) and r.all_converged
    assert (r.top.which, r.bottom.which) == ("top", "bottom")
    assert r.num_matvecs == r.top.num_matvecs == r.bottom.num_matvecs == mv.vectors
    torch.testing.assert_close(r.top.eigenvalues, top(lam, 4), rtol=REL, atol=0)
    torch.testing.assert_close(r.bottom.eigenvalues, bottom(lam, 4), rtol=REL, atol=0)
    for end in (r.top, r.bottom):  # each end's vectors belong to its values
        assert end.eigenvectors is not None and end.eigenvectors.shape == (300, 4)
        assert bool((explicit_residuals(h, end) <= 1.01e-8 * end.scale + 1e-12 * end.scale).all())


@pytest.mark.parametrize(("block_size", "max_basis"), [(1, None), (1, 24), (3, 30)])
def test_reported_residuals_are_true_residuals(block_size: int, max_basis: int | None) -> None:
    """Stopped early by the budget, residuals span many decades; each matches ||Hy - θy||."""
    h, lam = problem("uniform", P=400, seed=2)
    r = lanczos(Operator(CountingMatvec(h), 400), k=10, tol=1e-12, max_matvecs=60, block_size=block_size,
                max_basis=max_basis, return_eigenvectors=True)
    assert r.num_matvecs <= 60 and not r.all_converged
    if max_basis is not None:
        assert r.num_restarts >= 1
    explicit = explicit_residuals(h, r)
    checked = r.residuals > ROUNDING * r.scale
    assert int(checked.sum()) >= 8  # not vacuous: most pairs are far above rounding
    torch.testing.assert_close(r.residuals[checked], explicit[checked], rtol=0.01, atol=0)
    assert_within_residual(r, lam)


def test_converged_residuals_are_true_residuals() -> None:
    h, lam = problem("nn", P=300, seed=4)
    r = lanczos(Operator(CountingMatvec(h), 300), k=10, tol=1e-6, return_eigenvectors=True)
    assert r.all_converged
    explicit = explicit_residuals(h, r)
    checked = r.residuals > ROUNDING * r.scale
    assert int(checked.sum()) >= 2
    torch.testing.assert_close(r.residuals[checked], explicit[checked], rtol=0.01, atol=0)
    assert bool((explicit <= 1e-6 * r.scale * 1.01).all())
    assert_within_residual(r, lam)


def test_eigenvectors_are_orthonormal_ritz_vectors() -> None:
    h, _ = problem("nn", P=200, seed=5)
    r = lanczos(Operator(CountingMatvec(h), 200), k=6, tol=1e-10, return_eigenvectors=True)
    y = r.eigenvectors
    assert y is not None and y.shape == (200, 6) and y.dtype == F64
    torch.testing.assert_close(y.T @ y, torch.eye(6, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close((y * (h @ y)).sum(0), r.eigenvalues, rtol=1e-12, atol=1e-12)


KINDS = ["indefinite", "clustered", "lowrank", "lowrank-indefinite", "nn"]
DISTINCT = ["indefinite", "clustered", "nn"]  # no exact multiple eigenvalue at the bottom


@settings(max_examples=25, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**20), k=st.integers(1, 14),
       which=st.sampled_from(["top", "bottom"]), block_size=st.sampled_from([1, 1, 2]))
def test_no_ghosts_returned_multiset_is_true_multiset(data: st.DataObject, seed: int, k: int,
                                                      which: str, block_size: int) -> None:
    """Top-k of any kind (past rank 10 the zeros must come back k - 10 times), bottom-k of
    spectra without an exact multiple eigenvalue there."""
    kind = data.draw(st.sampled_from(KINDS if which == "top" else DISTINCT), label="kind")
    h, lam = problem(kind, P=200, seed=seed)
    r = lanczos(Operator(CountingMatvec(h), 200), k=k, which=which, tol=1e-10, block_size=block_size,
                seed=seed, max_matvecs=1000)
    ref = top(lam, k) if which == "top" else bottom(lam, k)
    assert r.all_converged
    assert float((r.eigenvalues - ref).abs().max()) <= 1e-8 * float(lam.abs().max())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**20), position=st.integers(0, 5), which=st.sampled_from(["top", "bottom"]))
def test_multiplicity_three_found_three_times_with_block_three(seed: int, position: int, which: str) -> None:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(148, generator=g, dtype=F64)
    value = torch.sort(base, descending=which == "top").values[position]
    lam = torch.cat([base, value.repeat(2)])  # ``value`` now has multiplicity exactly 3
    ref = top(lam, 8) if which == "top" else bottom(lam, 8)
    h = symmetric_with_spectrum(lam, seed)
    r = lanczos(Operator(CountingMatvec(h), 150), k=8, which=which, tol=1e-10, block_size=3, seed=seed,
                max_matvecs=900)
    assert r.all_converged
    torch.testing.assert_close(r.eigenvalues, ref, atol=1e-8 * float(lam.abs().max()), rtol=0)
    assert int(((r.eigenvalues - value).abs() < 1e-8).sum()) == 3


def test_single_vector_multiple_eigenvalue_no_ghosts() -> None:
    """block_size=1 sees one vector of a double eigenvalue (a second copy only through
    rounding, in long runs): whatever it returns is a sub-multiset of the true spectrum."""
    lam = torch.cat([torch.full((2,), 10.0, dtype=F64), torch.linspace(0, 5, 98, dtype=F64)])
    h = symmetric_with_spectrum(lam, 0)
    for tol in (1e-4, 1e-10):
        r = lanczos(Operator(CountingMatvec(h), 100), k=3, tol=tol)
        assert float(r.eigenvalues[0]) == pytest.approx(10.0, rel=1e-12)
        unused = lam.clone()
        for value, res in zip(r.eigenvalues.tolist(), r.residuals.tolist(), strict=True):
            j = int((unused - value).abs().argmin())
            assert abs(float(unused[j]) - value) <= res + 1e-12
            unused[j] = math.inf


@pytest.mark.parametrize("which", ["top", "bottom"])
@pytest.mark.parametrize(("block_size", "seed"), [(1, 7), (1, 8), (3, 7)])
def test_rank_deficient_breakdown_restarts(which: str, block_size: int, seed: int) -> None:
    """Rank 10 in P = 200: the Krylov space becomes invariant after ~11 vectors; the run must
    go on from probes (k = 14 > 11) and return the zero eigenvalue as often as it is wanted."""
    h, lam = problem("lowrank", P=200, seed=seed)
    r = lanczos(Operator(CountingMatvec(h), 200), k=14, which=which, tol=1e-10, block_size=block_size)
    ref = top(lam, 14) if which == "top" else bottom(lam, 14)
    assert r.all_converged and not r.exhausted
    assert r.num_matvecs < 60  # stops once probes add nothing new, far from P
    torch.testing.assert_close(r.eigenvalues, ref, atol=1e-10 * float(lam.max()), rtol=0)


def test_zero_operator() -> None:
    r = lanczos(Operator(lambda v: torch.zeros_like(v), 50), k=3, which="both")
    assert r.all_converged
    assert r.top.eigenvalues.tolist() == [0.0] * 3 and r.bottom.eigenvalues.tolist() == [0.0] * 3


@pytest.mark.parametrize(("P", "k", "block_size", "which"),
                         [(1, 1, 1, "top"), (8, 8, 1, "top"), (9, 4, 4, "bottom"), (6, 6, 6, "top"),
                          (7, 5, 2, "both"), (30, 10, 3, "top")])
def test_tiny_problems_are_exact(P: int, k: int, block_size: int, which: str) -> None:
    h, lam = symmetric_with_spectrum(torch.linspace(-1, 2, P, dtype=F64), 1), torch.linspace(-1, 2, P, dtype=F64)
    mv = CountingMatvec(h)
    r = lanczos(Operator(mv, P), k=k, which=which, tol=1e-12, block_size=block_size)
    ends = [r.top, r.bottom] if isinstance(r, LanczosBothEnds) else [r]
    for end in ends:
        ref = top(lam, k) if end.which == "top" else bottom(lam, k)
        torch.testing.assert_close(end.eigenvalues, ref, atol=1e-12, rtol=0)
        assert end.all_converged
    assert mv.vectors <= P + block_size and max(mv.widths) <= block_size


def test_k50_converges_with_thick_restart() -> None:
    lam = 0.99 ** torch.arange(2000, dtype=F64)
    h = symmetric_with_spectrum(lam, 0)
    r = lanczos(Operator(CountingMatvec(h), 2000), k=50, tol=1e-8, max_basis=120)
    assert r.num_restarts >= 1 and r.all_converged
    assert float(((r.eigenvalues - lam[:50]).abs() / lam[:50]).max()) <= REL
    assert r.num_matvecs <= 400


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_num_matvecs_accounting_is_exact(block_size: int) -> None:
    h, _ = problem("nn", P=200, seed=8)
    mv = CountingMatvec(h)
    r = lanczos(Operator(mv, 200), k=5, tol=1e-8, block_size=block_size, max_basis=30)
    assert r.num_matvecs == mv.vectors == mv.calls * block_size
    assert set(mv.widths) == {block_size}
    mv = CountingMatvec(symmetric_with_spectrum(spectrum("uniform", 200, 0), 0))
    r = lanczos(Operator(mv, 200), k=5, tol=1e-14, block_size=block_size, max_matvecs=50)
    assert r.num_matvecs == mv.vectors <= 50 and r.num_matvecs > 50 - block_size


def test_budget_exhausted_is_not_converged() -> None:
    h, _ = problem("clustered", P=300)
    r = lanczos(Operator(CountingMatvec(h), 300), k=10, tol=1e-12, max_matvecs=20)
    assert r.num_matvecs == 20 and not r.all_converged
    assert bool((r.converged == (r.residuals <= 1e-12 * r.scale)).all())


def test_fewer_matvecs_than_arpack_on_nn_spectrum() -> None:
    sla = pytest.importorskip("scipy.sparse.linalg")
    h, _ = problem("nn", P=1000, seed=0)
    hn = h.numpy()
    count = [0]

    def mv(x: np.ndarray) -> np.ndarray:
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return hn @ x

    op = sla.LinearOperator((1000, 1000), matvec=mv, matmat=mv, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(1000)
    sla.eigsh(op, k=10, which="LA", tol=1e-4, v0=v0)
    r = lanczos(Operator(CountingMatvec(h), 1000), k=10, tol=1e-4)
    ref = top(torch.linalg.eigvalsh(h), 10)
    assert r.num_matvecs <= count[0]
    assert float(((r.eigenvalues - ref).abs() / ref.abs()).max()) <= 1e-4


def test_float32_operator() -> None:
    h, lam = problem("nn", P=300, seed=9)
    r = lanczos(Operator(CountingMatvec(h.float()), 300), k=5, tol=1e-4, dtype=torch.float32, return_eigenvectors=True)
    assert r.eigenvalues.dtype == F64 and r.eigenvectors is not None and r.eigenvectors.dtype == torch.float32
    assert r.all_converged
    assert float(((r.eigenvalues - top(lam, 5)).abs() / top(lam, 5)).max()) <= 1e-4


def test_seeded_and_callback() -> None:
    h, _ = problem("nn", P=200, seed=10)
    seen: list[Progress] = []
    a = lanczos(Operator(CountingMatvec(h), 200), k=4, tol=1e-8, seed=3, callback=seen.append)
    b = lanczos(Operator(CountingMatvec(h), 200), k=4, tol=1e-8, seed=3)
    c = lanczos(Operator(CountingMatvec(h), 200), k=4, tol=1e-8, seed=4)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs
    torch.testing.assert_close(a.eigenvalues, c.eigenvalues, rtol=1e-8, atol=0)
    assert [p.done for p in seen] == list(range(1, a.num_matvecs + 1))
    assert all(p.total == seen[0].total and p.phase == "lanczos" and p.unit == "matvecs" for p in seen)
    assert all(p.max_residual is not None and math.isnan(p.max_residual) for p in seen[:3])
    assert seen[-1].num_converged == 4
    assert seen[-1].max_residual is not None and seen[-1].max_residual <= 1e-8


def test_defaults_documented() -> None:
    h, _ = problem("nn", P=200, seed=11)
    r = lanczos(Operator(CountingMatvec(h), 200))  # k=10, tol=1e-4, top
    assert r.eigenvalues.shape == (10,) and r.tol == 1e-4 and r.all_converged


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 0}, "k=0"), ({"k": 51}, "k=51"), ({"which": "middle"}, "which='middle'"),
    ({"tol": 0.0}, "tol=0.0"), ({"tol": math.nan}, "tol=nan"), ({"block_size": 60}, "block_size=60"),
    ({"dtype": torch.float16}, "dtype=torch.float16"), ({"max_basis": 11, "k": 10}, "max_basis=11"),
    ({"max_matvecs": 5}, "max_matvecs=5"), ({"seed": 1.5}, "seed=1.5"), ({"k": 2.0}, "k=2.0"),
])
def test_bad_arguments_raise_input_error(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        lanczos(Operator(lambda v: v, 50), **kwargs)


def test_bad_operators() -> None:
    with pytest.raises(InputError, match=r"num_params=0"):
        lanczos(Operator(lambda v: v, 0))
    with pytest.raises(InputError, match=r"matvec returned \(50,\)"):
        lanczos(Operator(lambda v: v[:, 0], 50), k=2)
    with pytest.raises(ComputeError, match="non-finite"):
        lanczos(Operator(lambda v: v * math.nan, 50), k=2)


def test_identity_matvec_returning_its_input() -> None:
    r = lanczos(Operator(lambda v: v, 50), k=3, which="both")
    assert r.top.eigenvalues.tolist() == pytest.approx([1.0] * 3)
    assert r.bottom.eigenvalues.tolist() == pytest.approx([1.0] * 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("which", "block_size", "max_basis"), [("top", 1, 12), ("both", 2, None), ("bottom", 3, 30)])
def test_on_disk_basis_equals_the_in_memory_basis(which: str, block_size: int, max_basis: int | None,
                                                   dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: object) -> None:
    """The out-of-core path (basis in a memory-mapped scratch file, projections streamed in
    column blocks, here of 37 columns so that every product is cut) against the in-memory path:
    the same eigenvalues to rounding, the same matvec count, restarts included; vectors too."""
    import basins.linalg.lanczos as lz

    monkeypatch.setattr(lz, "STREAM_BYTES", 37 * (max_basis or 60) * (4 if dtype == torch.float32 else 8))
    h, lam = problem("nn" if which != "bottom" else "indefinite", P=300, seed=2)
    opts = dict(k=5, which=which, tol=1e-9 if dtype == F64 else 1e-5, block_size=block_size, max_basis=max_basis, dtype=dtype, seed=1,
                return_eigenvectors=True)
    ram = lanczos(h, **opts)
    disk = lanczos(h, storage="disk", scratch=str(tmp_path), **opts)
    assert list(tmp_path.iterdir()) == []  # type: ignore[attr-defined]  # the scratch file is unlinked at once
    eps = torch.finfo(dtype).eps
    for a, b in ([(ram.top, disk.top), (ram.bottom, disk.bottom)] if which == "both" else [(ram, disk)]):
        assert a.num_matvecs == b.num_matvecs and a.num_restarts == b.num_restarts
        assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=0, atol=100 * eps * a.scale)
        assert a.eigenvectors is not None and b.eigenvectors is not None
        assert torch.allclose((a.eigenvectors.T.to(F64) @ b.eigenvectors.to(F64)).abs().diagonal(),
                              torch.ones(a.eigenvectors.shape[1], dtype=F64), atol=1e-3 if dtype == torch.float32 else 1e-8)
        assert_within_residual(b, lam) if dtype == F64 else None
    if which == "top":
        assert ram.num_restarts > 0  # the thick restart ran through the scratch file


def test_on_disk_basis_refuses_a_full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10, 10, 0))
    with pytest.raises(InputError, match="scratch space"):
        lanczos(torch.eye(50, dtype=F64), k=2, storage="disk")


def test_scratch_rows_released_by_column_block_keep_their_data(tmp_path) -> None:  # noqa: ANN001
    """Releasing a column block of some rows (the pages a streamed pass has finished with) or the whole
    file drops pages from the process only: the numbers read back are the ones written."""
    from basins.linalg.scratch import ScratchRows

    rows = ScratchRows(3, 5000, torch.float32, str(tmp_path))
    ref = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0))
    rows.tensor.copy_(ref)
    rows.release(2, 100, 4000)
    assert torch.equal(rows.tensor, ref)
    rows.tensor[1, 3000:] += 1.0
    rows.release(3, 0, None)
    rows.release()
    ref[1, 3000:] += 1.0
    assert torch.equal(rows.tensor, ref)
