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


def _exact_softmax_nll(z: torch.Tensor, y: torch.Tensor) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Per-row loss, gradient and Hessian in the logits of ``−log softmax(z)[y]``, in 50-digit
    arithmetic (mpmath), rounded to float64 at the end."""
    import mpmath

    mpmath.mp.dps = 50
    losses, G, H = [], torch.zeros_like(z), torch.zeros(z.shape[0], z.shape[1], z.shape[1], dtype=torch.float64)
    for n in range(z.shape[0]):
        row = [mpmath.mpf(float(v)) for v in z[n]]
        top = max(row)
        e = [mpmath.exp(v - top) for v in row]
        s = mpmath.fsum(e)
        p = [v / s for v in e]
        yn = int(y[n])
        losses.append(float(mpmath.log(s) + top - row[yn]))
        for i in range(len(row)):
            G[n, i] = float(p[i] - (1 if i == yn else 0))
            for j in range(len(row)):
                H[n, i, j] = float((p[i] if i == j else 0) - p[i] * p[j])
    return losses, G, H


@pytest.mark.parametrize("margin", [25.0, 8.0, -3.0])
def test_cross_entropy_derivatives_are_accurate_at_a_small_loss(margin: float) -> None:
    """The built-in softmax cross-entropy is accurate in its gradient and Hessian (in the logits)
    when the label's probability is near 1 (``margin``: its logit's lead; 25 gives p_y ≈ 1 − 1e-11),
    against 50-digit arithmetic; ``F.cross_entropy``'s Hessian is off there by far more (its
    ``p_y(1 − p_y)`` is formed from ``p_y ≈ 1``), which is what made float64 bounds fail on a
    trained ViT. Also the label not the top class (``margin < 0``) and logits of ±1000 (no overflow)."""
    from basins.engine.losses import causal_lm, cross_entropy

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 4])
    z[torch.arange(4), y] += margin
    _, G, Hx = _exact_softmax_nll(z, y)
    H_lib = torch.autograd.functional.hessian(lambda t: cross_entropy(t, y) * 4, z)
    grad = torch.func.grad(lambda t: cross_entropy(t, y) * 4)(z)
    for n in range(4):
        scale = float(Hx[n].abs().max())
        assert float((H_lib[n, :, n, :] - Hx[n]).abs().max()) <= 1e-13 * scale, n
        assert float((grad[n] - G[n]).abs().max()) <= 1e-14 * float(G[n].abs().max())
    if margin == 25.0:  # the setting is ill-conditioned for the plain formula
        H_plain = torch.autograd.functional.hessian(lambda t: nn.functional.cross_entropy(t, y) * 4, z)
        assert float((H_plain[0, :, 0, :] - Hx[0]).abs().max()) > 1e-8 * float(Hx[0].abs().max())
    # the token loss (causal-lm) uses the same form: positions labelled −100 are left out
    ids = torch.tensor([[7, 0, 3, 1, 4]])
    lm = causal_lm(torch.cat([z, z[:1]])[None], ids)
    assert float(lm) == pytest.approx(sum(_exact_softmax_nll(z, y)[0]) / 4, rel=1e-14)
    big = torch.tensor([[1000.0, 0.0, -1000.0]], dtype=torch.float64)
    for label, value in ((0, 0.0), (1, 1000.0), (2, 2000.0)):
        assert float(cross_entropy(big, torch.tensor([label]))) == pytest.approx(value, abs=1e-12)


def test_float64_bounds_hold_against_a_textbook_cross_entropy_reference_at_a_small_loss() -> None:
    """A float64 classifier at a small loss (its own predictions as labels, 1 − p_y in (1e-10, 1e-6)):
    the textbook ``F.cross_entropy`` Hessian is off by ~eps/(1 − p_y) relative, far beyond
    ``256·eps·max|λ|``. basins' eigenvalues agree with the accurate reference (the loss as
    ``softplus(logsumexp_{j≠y}(z_j − z_y))``, written here) to float64 rounding, and its bounds, which
    add the measured spread of the textbook loss head (6 HVPs), contain both references."""
    from tests.models import classification_data
    from tests.models import mlp as build

    x, _ = classification_data(200)
    model = build().double().eval()
    with torch.no_grad():
        model[2].weight.mul_(20.0)
        z = model(x.double())
    y = z.argmax(1)
    q = 1 - torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    keep = (q > 1e-10) & (q < 1e-6)  # saturated examples only (33 of them): L ≈ 1e-7
    x, y = x.double()[keep], y[keep]

    def accurate(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        others = (z - z.gather(1, t[:, None])).masked_fill(nn.functional.one_hot(t, z.shape[1]).bool(), -torch.inf)
        return nn.functional.softplus(torch.logsumexp(others, 1)).mean()

    exact = torch.linalg.eigvalsh(loss_hessian(model, x, y, accurate)).flip(0)[:3]
    plain = torch.linalg.eigvalsh(loss_hessian(model, x, y, nn.functional.cross_entropy)).flip(0)[:3]
    eps_bound = 256 * torch.finfo(torch.float64).eps * float(exact[0])
    assert float((plain - exact).abs().max()) > eps_bound  # the textbook reference is off by more than that
    p = Problem(model, x, y, "cross-entropy", dtype="float64")
    res = hessian_eigenvalues(p, k=3, tol=1e-12)
    top = res.top
    assert top is not None and top.error_bounds is not None and res.num_check_hvps == 6
    assert float((top.eigenvalues - exact).abs().max()) <= eps_bound
    for ref in (exact, plain):
        assert bool(((top.eigenvalues - ref).abs() <= top.error_bounds).all()), (top.eigenvalues, ref, top.error_bounds)
    assert bool((top.error_bounds <= 1e-6 * exact[0]).all())  # honest, not vacuous
