"""One engine: operator algebra, the curvature operators, features on token losses and named inputs,
nullity's choice of method, evidence on token losses and with both curvatures.

References are independent: dense float64 matrices, a GGN ``Jᵀ H_out J`` assembled by plain
``torch.autograd.functional`` from the model's own logits and ``F.cross_entropy``, and Hessians
by double backward (:func:`tests.dense.loss_hessian`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from basins.analyses.evidence import evidence
from basins.analyses.features import feature_gram
from basins.analyses.nullity import features_refusal, nullity
from basins.engine.curvature import GGNOperator, HessianOperator
from basins.engine.problem import Problem
from basins.errors import InputError
from basins.linalg.operator import Operator
from tests.dense import symmetric_with_spectrum

F64 = torch.float64


def test_operators_add_scale_and_restrict_like_their_matrices() -> None:
    A = symmetric_with_spectrum(torch.linspace(-1, 3, 12), seed=1)
    B = symmetric_with_spectrum(torch.linspace(0, 5, 12), seed=2)
    a, b = Operator.dense(A), Operator.dense(B)
    V = torch.randn(12, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((a + b).apply(V), (A + B) @ V)
    torch.testing.assert_close((2.5 * a - b).apply(V), (2.5 * A - B) @ V)
    torch.testing.assert_close((-a).apply(V[:, 0]), -A @ V[:, 0])
    idx = torch.tensor([7, 1, 4])
    r = (a + b).restrict(idx)
    assert r.num_params == 3
    torch.testing.assert_close(r.materialise(), (A + B)[idx][:, idx])
    with pytest.raises(InputError, match="sizes"):
        _ = a + Operator.dense(torch.eye(3, dtype=F64))
    with pytest.raises(InputError, match="repeat"):
        a.restrict([1, 1])
    with pytest.raises(InputError, match="index"):
        a.restrict([12])


def test_a_subclass_implements_only_matvec() -> None:
    class Diagonal(Operator):
        def __init__(self, d: torch.Tensor) -> None:
            super().__init__(None, int(d.numel()), d.dtype)
            self.d = d

        def _matvec(self, V: torch.Tensor) -> torch.Tensor:
            return self.d.reshape(-1, *([1] * (V.dim() - 1))) * V

    d = torch.arange(1.0, 6.0, dtype=F64)
    torch.testing.assert_close(Diagonal(d).materialise(), torch.diag(d))
    torch.testing.assert_close((Diagonal(d) * 2).restrict([0, 4]).materialise(), torch.diag(torch.tensor([2.0, 10.0],
                                                                                                         dtype=F64)))
    with pytest.raises(InputError, match="callable"):
        Operator(None, 3)


def _classifier(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return m, X, y


def _dense_ggn(m: nn.Module, X: torch.Tensor, loss_of_outputs) -> torch.Tensor:  # noqa: ANN001
    params = dict(m.named_parameters())
    names = list(params)
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        d, a = {}, 0
        for n in names:
            d[n] = flat[a : a + params[n].numel()].reshape(params[n].shape)
            a += params[n].numel()
        out = torch.func.functional_call(m, d, (X,) if isinstance(X, torch.Tensor) else (), X if isinstance(X, dict) else {})
        return getattr(out, "logits", out)

    out = outputs(theta).detach()
    J = torch.autograd.functional.jacobian(outputs, theta).reshape(out.numel(), -1)
    Hl = torch.autograd.functional.hessian(lambda o: loss_of_outputs(o.reshape(out.shape)), out.reshape(-1))
    return J.T @ Hl @ J


def test_ggn_operator_equals_dense_ggn_and_is_counted() -> None:
    m, X, y = _classifier()
    p = Problem(m, X, y, loss="cross-entropy", batch_size=7)
    ref = _dense_ggn(m, X, lambda o: F.cross_entropy(o, y))
    G = GGNOperator(p).materialise(dtype=F64)
    torch.testing.assert_close(G, ref, rtol=1e-10, atol=1e-12)
    assert p.counters.num_ggn_products == p.num_params
    before = p.counters.num_hvps
    HessianOperator(p).apply(torch.ones(p.num_params, 2, dtype=F64))
    assert p.counters.num_hvps == before + 2


@pytest.fixture(scope="module")
def gpt2_tokens() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_gpt2
    from tests.test_transformers import _tokens

    ids, mask, labels = _tokens()
    return tiny_gpt2(), {"input_ids": ids, "attention_mask": mask}, labels


def test_features_on_a_causal_lm_with_named_inputs_is_the_gram_over_valid_tokens(gpt2_tokens) -> None:  # noqa: ANN001
    from tests.hf_models import VOCAB

    m, x, labels = gpt2_tokens
    p = Problem(m, x, labels, "causal-lm", check_determinism=False)
    fg = feature_gram(p, gn_probes=0)
    ref = _dense_ggn(m, x, lambda o: F.cross_entropy(o[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                      ignore_index=-100))
    ev = torch.linalg.eigvalsh(ref).flip(0)[: fg.eigenvalues.numel()]
    assert float((ev - fg.eigenvalues).abs().max()) <= 1e-10 * float(ev[0])
    # rank ≤ valid tokens × (V − 1): padded positions contribute nothing
    assert fg.rank <= p.num_terms * (VOCAB - 1)


def test_nullity_auto_takes_slq_on_a_token_loss_and_says_why(gpt2_tokens) -> None:  # noqa: ANN001
    m, x, labels = gpt2_tokens
    p = Problem(m, x, labels, "causal-lm", check_determinism=False)
    assert "residual" in (features_refusal(p) or "")
    r = nullity(p, exact_max_params=100, num_probes=2, num_steps=5, deflate=2)
    assert r.method == "slq" and r.notes[0].startswith("auto: slq because P = 2,040 > 100")


def test_nullity_auto_keeps_features_only_where_g_is_h() -> None:
    # a linear model under mse with zero residual: H = G exactly
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 10, generator=g, dtype=F64)
    m = nn.Linear(10, 2, bias=False).double()
    with torch.no_grad():
        y = m(X)
    p = Problem(m, X, y, "mse")
    r = nullity(p, exact_max_params=5)
    assert r.method == "features"
    # P − rank: 20 parameters, rank of X ⊗ I₂ is 12
    assert r.counts[0].count == 8
    # a residual: G ≠ H, so auto falls back to slq
    m2, X2, y2 = _classifier()
    r2 = nullity(Problem(m2, X2, y2.to(F64).unsqueeze(1).expand(-1, 3).contiguous(), "mse"), exact_max_params=5,
                 num_probes=2, num_steps=5, deflate=2)
    assert r2.method == "slq" and "G's flat directions" in r2.notes[0]


def test_evidence_on_a_causal_lm_is_the_summed_token_nll(gpt2_tokens) -> None:  # noqa: ANN001
    from tests.hf_models import VOCAB

    m, x, labels = gpt2_tokens
    p = Problem(m, x, labels, "causal-lm", check_determinism=False)
    with torch.no_grad():
        logits = m(**x).logits
    nll = float(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), labels[:, 1:].reshape(-1),
                                ignore_index=-100, reduction="sum"))
    r = evidence(p, curvature="ggn", method="slq", num_probes=3, num_steps=8, deflate=2, prior_precision=1.0)
    assert r.log_likelihood == pytest.approx(-nll, rel=1e-12)
    assert r.num_terms == int((labels[:, 1:] != -100).sum())
    lo, hi = r.log_evidence_ci
    assert lo < r.log_evidence < hi  # stochastic: never a zero-width interval
    assert r.num_ggn_products > 0 and r.num_hvps == 0


def test_evidence_both_reports_the_difference_against_dense_references() -> None:
    m, X, y = _classifier(1)
    opt = torch.optim.LBFGS(m.parameters(), max_iter=50)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(m(X), y) + 0.05 * sum((q**2).sum() for q in m.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    p = Problem(m, X, y, "cross-entropy")
    delta = 10.0
    r = evidence(p, curvature="both", method="exact", prior_precision=delta)
    N = 30
    G = _dense_ggn(m, X, lambda o: F.cross_entropy(o, y)) * N
    from tests.dense import loss_hessian

    H = loss_hessian(m, X, y, F.cross_entropy) * N
    eye = torch.eye(p.num_params, dtype=F64)
    gap_ref = -0.5 * (torch.logdet(H + delta * eye) - torch.logdet(G + delta * eye))
    assert r.other is not None and r.model_error is not None
    assert r.model_error[0] == pytest.approx(float(gap_ref), rel=1e-8, abs=1e-9)
    assert r.log_evidence - r.other.log_evidence == pytest.approx(r.model_error[0], rel=1e-12)
    assert r.record().attrs["interval"].startswith("exact")
    rec = r.record().attrs
    assert math.isfinite(rec["ggn_log_evidence"]) and rec["num_hvps"] == p.num_params


def test_open_problem_builds_what_the_cli_builds(model_files, data_files) -> None:  # noqa: ANN001
    import json

    from click.testing import CliRunner

    import basins
    from basins.cli.main import main

    opened = basins.open_problem(model_files.pt2, data=data_files.npz, loss="cross-entropy", device="cpu")
    ref = Problem(model_files.module, model_files.inputs, model_files.targets, "cross-entropy")
    assert opened.problem.loss_at_optimum == pytest.approx(ref.loss_at_optimum, rel=1e-6)
    assert opened.record["num_params"] == ref.num_params and opened.record["model_kind"] == "export"
    assert any(n.startswith("P = 67 parameters") for n in opened.notes)
    out = CliRunner().invoke(main, ["nullity", model_files.pt2, "--data", data_files.npz, "--loss", "cross-entropy",
                                    "--device", "cpu", "--json", "-q"])
    assert out.exit_code == 0, out.output
    cli = json.loads(out.stdout)
    for key in ("num_params", "num_examples", "loss", "loss_at_optimum", "model_sha256", "data_sha256"):
        assert cli[key] == opened.record[key], key


def test_evidence_auto_prior_is_refused_away_from_a_minimum_and_both_keeps_the_ggn() -> None:
    from tests.dense import loss_hessian

    m, X, y = _classifier(2)  # untrained: an indefinite Hessian (checked by the dense reference)
    assert float(torch.linalg.eigvalsh(loss_hessian(m, X, y, F.cross_entropy))[0]) < 0
    p = Problem(m, X, y, "cross-entropy")
    with pytest.raises(InputError, match="use curvature 'ggn'"):
        evidence(p, method="exact")
    r = evidence(p, method="exact", curvature="both")
    assert r.log_evidence is None and r.other is not None and math.isfinite(r.other.log_evidence)
    assert r.num_hvps == p.num_params and r.num_ggn_products == p.num_params  # the work done, refused part included
    assert any("Hessian evidence is undefined" in n for n in r.notes)
