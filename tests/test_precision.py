"""Precision measured, not assumed (issue 22 item 4): a float64 Llama computes its RMSNorm (and its
eager softmax, its rotary tables) in float32. The dtype audit names those layers, and every printed
bound contains the eigenvalues of an independent float64 reference: the dense Hessian of the loss
computed by hand in float64, of the same model patched to stay float64 everywhere (RMSNorm,
softmax), checked to stay float64 by the same kind of dispatch-mode audit written here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from basins import Problem
from basins.analyses.hessian import hessian_eigenvalues
from basins.engine.precision import audit_precision
from tests.dense import loss_hessian

transformers = pytest.importorskip("transformers")
VOCAB, T, N = 19, 8, 6


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   use_cache=False, attn_implementation="eager", tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # norms away from 1, so their rounding matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, dtype=torch.float64))
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(1))


class _Float64Everywhere(TorchDispatchMode):
    """Counts floating ops below float64 (the reference must have none)."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        self.narrow += sum(1 for t in tree_flatten(out)[0]
                           if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64)
        return out


def _rms64(self: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rope64(self: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = position_ids[..., None].double() * self.inv_freq.double()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


class _Logits64(nn.Module):
    """The patched model's logits, with RMSNorm, the rotary tables and the eager softmax in float64
    (no cast anywhere)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        from transformers.models.llama import modeling_llama as ml

        for m in model.modules():
            if isinstance(m, ml.LlamaRMSNorm):
                m.forward = _rms64.__get__(m)  # type: ignore[method-assign]
            if isinstance(m, ml.LlamaRotaryEmbedding):
                m.forward = _rope64.__get__(m)  # type: ignore[method-assign]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama import modeling_llama as ml

        real = torch.nn.functional.softmax

        def softmax64(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
            return real(x, dim=dim)  # the eager path asks for float32: stay in float64

        ml.nn.functional.softmax = softmax64  # type: ignore[assignment]
        try:
            return self.model(input_ids=ids).logits
        finally:
            ml.nn.functional.softmax = real  # type: ignore[assignment]


def _causal_lm64(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, by hand in float64."""
    logp = torch.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).mean()


def test_float64_llama_bounds_hold_against_a_float64_everywhere_reference() -> None:
    model, ids = tiny_llama(), tokens()
    ref_model = _Logits64(copy.deepcopy(model))
    with torch.no_grad(), _Float64Everywhere() as mode:
        ref_model(ids)
    assert mode.narrow == 0  # the reference stays in float64
    H = loss_hessian(ref_model, ids, ids, _causal_lm64)
    ref = torch.linalg.eigvalsh(H)

    p = Problem(model, {"input_ids": ids}, ids, "causal-lm", dtype="float64")
    assert p.num_params == H.shape[0]
    # the model asks for float32 in its norms: those requests are served in float64 (promoted) ...
    assert "model.layers.0.input_layernorm" in p.promoted_layers and "model.norm" in p.promoted_layers
    audit = audit_precision(p)
    assert not audit.mixed and audit.warning() is None  # ... so the forward now stays in float64

    res = hessian_eigenvalues(p, k=4, which="both", tol=1e-10)
    assert res.compute_dtype == "float64" and res.num_check_hvps == 12  # the loss head spread, 6 per end
    for end, truth in ((res.top, ref.flip(0)[:4]), (res.bottom, ref[:4])):
        assert end is not None and end.error_bounds is not None
        err = (end.eigenvalues - truth).abs()
        # float64 bounds hold against the float64-everywhere reference (the model as written, with
        # its float32 norms, was off by up to 8e-7 against bounds of 5e-9)
        assert bool((err <= end.error_bounds).all()), (err.tolist(), end.error_bounds.tolist())
        assert float(err.max()) < 1e-11


def test_pure_float64_model_is_not_mixed() -> None:
    from tests.models import classification_data, mlp

    x, y = classification_data(20)
    p = Problem(mlp(), x, y, "cross-entropy", dtype="float64")
    a = audit_precision(p)
    assert not a.mixed and a.warning() is None and a.layers == []
    assert audit_precision(p) is a  # cached: one forward per problem


def test_cli_notes_the_promoted_layers_and_records_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from click.testing import CliRunner

    from basins.cli.main import main

    tiny_llama().save_pretrained(tmp_path / "llama")
    torch.save({"input_ids": tokens(), "labels": tokens()}, tmp_path / "tok.pt")
    r = CliRunner().invoke(main, ["hessian", str(tmp_path / "llama"), "--data", str(tmp_path / "tok.pt"),
                                  "--loss", "causal-lm", "--dtype", "float64", "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["compute_dtype"] == "float64" and out["num_check_hvps"] == 6
    assert "input_layernorm" in out["promoted_to_float64"]
    assert "input_layernorm" in r.stderr and "served in float64" in r.stderr


class _Autocast(nn.Module):
    """A float32 model whose forward runs under ``torch.autocast`` in bfloat16 (as a user's wrapper might)."""

    def __init__(self, inner: nn.Module, device_type: str = "cpu") -> None:
        super().__init__()
        self.inner, self.device_type = inner, device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.inner(x).float()


def autocast_case(device: str = "cpu") -> tuple[Problem, torch.Tensor]:
    """A bf16-autocast MLP problem on ``device`` and the top-4 eigenvalues of its float64 Hessian."""
    from tests.models import classification_data

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = classification_data(64)
    ref = torch.linalg.eigvalsh(loss_hessian(copy.deepcopy(inner).double(), x.double(), y,
                                             nn.functional.cross_entropy)).flip(0)[:4]
    return Problem(_Autocast(inner, device), x, y, "cross-entropy", device=device), ref


def test_bf16_autocast_is_audited_and_bounded() -> None:
    """Under bf16 autocast the HVPs carry bf16 rounding; the audit says so and the bounds (measured)
    still contain the float64 eigenvalues."""
    p, ref = autocast_case()
    audit = audit_precision(p)
    assert p.dtype == torch.float32 and audit.lowest == torch.bfloat16 and "inner.0" in audit.layers
    top = hessian_eigenvalues(p, k=4, tol=1e-4).top
    assert top is not None and top.error_bounds is not None
    assert bool(((top.eigenvalues - ref).abs() <= top.error_bounds).all())
    assert bool((top.error_bounds <= 0.05 * ref[0]).all())  # informative
