"""The model zoo of ``tests/test_zoo.py``: tiny models from local configs, trained a few steps here,
saved as a user saves them (``.pt2`` exports, ``save_pretrained`` directories, a peft adapter),
with token/image data files and independent float64 references.

Each :class:`ZooModel` holds the paths the CLI is pointed at and a reference built without basins:
the loss written out by hand in float64 (:func:`cross_entropy`, accurate in its derivatives, or
``F.mse_loss`` on the model's own outputs), its dense Hessian by double backward (one ``autograd.grad`` per column, no ``vmap``),
and a dtype audit of one forward pass (:func:`float32_ops`): which aten ops produce float32
results inside the float64 model as written (Llama's RMSNorm and rotary embedding do). The
reference itself runs under :class:`Float64`, which serves every such request in float64, and is
audited to have no op below float64: it is the float64 function the model means.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

F64 = torch.float64
VOCAB = 23  # tests.hf_models.VOCAB


@dataclass
class ZooModel:
    """One row of the zoo: what the CLI reads, and the float64 reference."""

    name: str
    model: str  # path given to the CLI
    data: str  # path of the data file
    loss: str  # the loss basins should infer (or was given)
    num_params: int
    loss_value: float  # the loss by hand, float64
    hessian: torch.Tensor  # dense (P, P) float64 Hessian of that loss
    float32_ops: list[str] = field(default_factory=list)  # the dtype audit of one forward pass
    asymmetry: float = 0.0  # ‖(H − Hᵀ)/2‖₂ of the computed reference: its own rounding, measured
    extra_args: list[str] = field(default_factory=list)  # besides MODEL and --data (none by default)
    ggn: torch.Tensor | None = None  # dense (P, P) float64 Gauss–Newton matrix Jᵀ H_out J (:func:`dense_ggn`)
    loss_at: Callable[[torch.Tensor], float] | None = None  # L(θ* + δ) by hand, δ flat (:func:`loss_function`)

    def __post_init__(self) -> None:
        self.hessian, self.asymmetry = symmetric(self.hessian)

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The reference Hessian's eigenvalues, ascending."""
        return torch.linalg.eigvalsh(self.hessian)


class _Audit(TorchDispatchMode):
    """Records aten ops that return a float32 (or lower) floating tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.low: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != F64:
                self.low.add(str(func.__name__))
        return out


_LOW = (torch.float32, torch.float16, torch.bfloat16)


class Float64(TorchFunctionMode):
    """Runs a model as the float64 function it is meant to be: every request for a lower floating
    dtype (``x.to(torch.float32)``, ``x.float()``, ``softmax(..., dtype=torch.float32)``, as in
    Llama's RMSNorm and rotary embedding or ViT's attention) is served in float64. A torch
    function mode, above autograd, so the reference's double backward sees only float64 ops."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float or func is torch.Tensor.half or func is torch.Tensor.bfloat16:
            return args[0].to(F64)
        args = tuple(F64 if a in _LOW else a for a in args)
        if kwargs.get("dtype") in _LOW:
            kwargs["dtype"] = F64
        return func(*args, **kwargs)


def float32_ops(fn: Callable[[], Any]) -> list[str]:
    """The aten ops of ``fn()`` whose results are floating but not float64 (sorted)."""
    audit = _Audit()
    with torch.no_grad(), audit:
        fn()
    return sorted(audit.low)


def reference_ops(fn: Callable[[], Any]) -> list[str]:
    """:func:`float32_ops` of ``fn()`` as the reference runs it (under :class:`Float64`): must be empty."""
    with Float64():
        return float32_ops(fn)


def dense_hessian(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor],
                  names: list[str] | None = None) -> tuple[float, torch.Tensor]:
    """``(L, H)``: the loss and its dense float64 Hessian in the parameters ``names`` (default all
    trainable, in ``named_parameters`` order) by double backward, one column at a time; ``H`` is
    returned as computed (symmetrise it with :func:`symmetric`)."""
    leaves = _leaves(model, names)
    low = reference_ops(lambda: loss_of(model))
    assert not low, f"the float64 reference computes {low} below float64"
    with Float64():
        loss = loss_of(model)
    assert loss.dtype == F64, loss.dtype
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    g = torch.cat([x.reshape(-1) for x in grads])
    P = g.numel()
    H = torch.empty(P, P, dtype=F64)
    for i in range(P):
        row = torch.autograd.grad(g[i], leaves, retain_graph=True, allow_unused=True)
        H[i] = torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(row, leaves)])
    return float(loss.detach()), H


def _leaves(model: nn.Module, names: list[str] | None) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if (names is None and p.requires_grad) or
            (names is not None and n in names)]


def dense_ggn(model: nn.Module, outputs_of: Callable[[nn.Module], torch.Tensor],
              head: Callable[[torch.Tensor], torch.Tensor], names: list[str] | None = None) -> torch.Tensor:
    """The dense float64 Gauss–Newton matrix ``G = Jᵀ H_out J`` in the parameters of
    :func:`dense_hessian`: ``J`` the Jacobian of the flattened outputs (one backward pass per
    output entry the loss has curvature in), ``H_out`` the Hessian of ``head`` (the loss as a
    function of the flattened outputs) by double backward, both under :class:`Float64`. Its
    nonzero spectrum is that of the feature Gram matrix, and ``P − rank G`` counts the flat
    directions of the Gauss–Newton part (for mse, ``P − rank J``)."""
    leaves = _leaves(model, names)
    with Float64():
        z = outputs_of(model)
    flat = z.reshape(-1)
    assert flat.dtype == F64, flat.dtype
    H_out = torch.autograd.functional.hessian(lambda t: head(t.reshape(z.shape)), flat.detach())
    keep = (H_out.abs().sum(1) > 0).nonzero().flatten()  # outputs the loss has no curvature in (padding) drop out
    J = torch.empty(len(keep), sum(p.numel() for p in leaves), dtype=F64)
    for row, i in enumerate(keep.tolist()):
        gs = torch.autograd.grad(flat[i], leaves, retain_graph=True, allow_unused=True)
        J[row] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, leaves)])
    G = J.T @ H_out[keep][:, keep] @ J
    return (G + G.T) / 2


def loss_function(model: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor],
                  names: list[str] | None = None) -> Callable[[torch.Tensor], float]:
    """``δ ↦ L(θ* + δ)`` by hand (under :class:`Float64`), ``δ`` flat in the parameter order of
    :func:`dense_hessian`; the parameters are put back after each call."""
    leaves = _leaves(model, names)

    def loss_at(delta: torch.Tensor) -> float:
        saved = [p.detach().clone() for p in leaves]
        try:
            with torch.no_grad():
                at = 0
                for p in leaves:
                    p.add_(delta[at : at + p.numel()].reshape(p.shape).to(p.dtype))
                    at += p.numel()
                with Float64():
                    return float(loss_of(model))
        finally:
            with torch.no_grad():
                for p, v in zip(leaves, saved):
                    p.copy_(v)

    return loss_at


def symmetric(H: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``((H + Hᵀ)/2, ‖(H − Hᵀ)/2‖₂)``: the symmetrised reference and its measured rounding."""
    return (H + H.T) / 2, float(torch.linalg.matrix_norm((H - H.T) / 2, ord=2))


def _train(model: nn.Module, step_loss: Callable[[], torch.Tensor], steps: int, lr: float) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        step_loss().backward()
        opt.step()
    model.eval()


def tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids (6, 10)``, right padding in two rows, labels −100 on the padding (the tokens of
    ``tests/test_transformers.py``)."""
    from tests.test_transformers import _tokens

    return _tokens(seed)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of ``logits (M, C)`` at ``labels (M,)`` (−100 left out), in float64,
    written so that its derivatives are accurate at a small loss: per row
    ``softplus(logsumexp_{j≠y}(z_j − z_y))``. ``F.cross_entropy``'s derivatives form ``p_y − 1``
    and ``p_y(1 − p_y)`` from ``p_y ≈ 1``: on the trained ViT (L = 1.7e-4) its Hessian's λ1 was
    off by 1.4e-14, more than basins' float64 bound, while this one agrees with the Gauss–Newton
    form ``Jᵀ(diag p − ppᵀ)J/N + Σ r·∇²z`` (``1 − p_y`` summed from the other classes) to 3e-17."""
    valid = labels != -100
    z, y = logits[valid].to(F64), labels[valid]
    others = (z - z.gather(1, y[:, None])).masked_fill(F.one_hot(y, z.shape[1]).bool(), -torch.inf)
    return F.softplus(torch.logsumexp(others, dim=1)).mean()


def _causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


# ---------------------------------------------------------------------- rows
def mlp(root: Path) -> ZooModel:
    """A 3 → 8 → 2 tanh MLP regressor (mse), exported with a dynamic batch."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 3, generator=g, dtype=F64)
    Y = torch.sin(X[:, :2]) + 0.1 * torch.randn(24, 2, generator=g, dtype=F64)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = torch.optim.LBFGS(m.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(m(X), Y)
        loss.backward()
        return loss

    opt.step(closure)  # to a minimum: the evidence then has a positive definite Hessian
    path = root / "mlp.pt2"
    torch.export.save(torch.export.export(m, (X[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    torch.save({"inputs": X, "targets": Y}, root / "mlp_data.pt")
    L, H = dense_hessian(m, lambda mm: F.mse_loss(mm(X), Y))
    return ZooModel("mlp", str(path), str(root / "mlp_data.pt"), "mse", H.shape[0], L, H,
                    float32_ops(lambda: m(X)), ggn=dense_ggn(m, lambda mm: mm(X), lambda z: F.mse_loss(z, Y)),
                    loss_at=loss_function(m, lambda mm: F.mse_loss(mm(X), Y)))


def cnn_bn(root: Path) -> ZooModel:
    """Conv + BatchNorm + ReLU + Linear on 1×6×6 images (cross-entropy), exported in eval mode."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(16, 1, 6, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                      nn.Linear(2 * 36, 3)).double()
    _train(m, lambda: cross_entropy(m(X), y), 30, 0.02)  # BatchNorm's running statistics move
    path = root / "cnn.pt2"
    torch.export.save(torch.export.export(m, (X[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    torch.save({"inputs": X, "targets": y}, root / "cnn_data.pt")
    L, H = dense_hessian(m, lambda mm: cross_entropy(mm(X), y))
    return ZooModel("cnn_bn", str(path), str(root / "cnn_data.pt"), "cross-entropy", H.shape[0], L, H,
                    float32_ops(lambda: m(X)), ggn=dense_ggn(m, lambda mm: mm(X), lambda z: cross_entropy(z, y)),
                    loss_at=loss_function(m, lambda mm: cross_entropy(mm(X), y)))


def _hf_tokens_row(name: str, m: nn.Module, root: Path, steps: int = 40) -> tuple[ZooModel, nn.Module]:
    ids, mask, labels = tokens()

    def loss_of(mm: nn.Module) -> torch.Tensor:
        return _causal_loss(mm(input_ids=ids, attention_mask=mask).logits, labels)

    _train(m, lambda: loss_of(m), steps, 0.05)
    path = root / name
    m.save_pretrained(str(path))
    data = root / f"{name}_tokens.pt"
    torch.save({"input_ids": ids, "attention_mask": mask, "labels": labels}, data)
    L, H = dense_hessian(m, loss_of)
    audit = float32_ops(lambda: m(input_ids=ids, attention_mask=mask))
    ggn = dense_ggn(m, lambda mm: mm(input_ids=ids, attention_mask=mask).logits, lambda z: _causal_loss(z, labels))
    return ZooModel(name, str(path), str(data), "causal-lm", H.shape[0], L, H, audit, ggn=ggn,
                    loss_at=loss_function(m, loss_of)), m


def gpt2(root: Path) -> tuple[ZooModel, nn.Module]:
    """GPT-2 with tied embeddings (P = 2,040), padded tokens (causal-lm)."""
    from tests.hf_models import tiny_gpt2

    return _hf_tokens_row("gpt2", tiny_gpt2(), root)


def llama(root: Path) -> ZooModel:
    """A Llama-style causal LM (RMSNorm, rotary positions, grouped KV heads, SwiGLU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, use_cache=False,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                      attn_implementation="eager")
    return _hf_tokens_row("llama", LlamaForCausalLM(cfg).double().eval(), root)[0]


def bert(root: Path) -> ZooModel:
    """A BERT sequence classifier (3 classes) on padded tokens (cross-entropy)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(4)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=16, type_vocab_size=1, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    m = BertForSequenceClassification(cfg).double().eval()
    ids, mask, _ = tokens(2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def loss_of(mm: nn.Module) -> torch.Tensor:
        return cross_entropy(mm(input_ids=ids, attention_mask=mask).logits, y)

    _train(m, lambda: loss_of(m), 40, 0.05)
    path = root / "bert"
    m.save_pretrained(str(path))
    data = root / "bert_tokens.pt"
    torch.save({"input_ids": ids, "attention_mask": mask, "labels": y}, data)
    L, H = dense_hessian(m, loss_of)
    ggn = dense_ggn(m, lambda mm: mm(input_ids=ids, attention_mask=mask).logits, lambda z: cross_entropy(z, y))
    return ZooModel("bert", str(path), str(data), "cross-entropy", H.shape[0], L, H,
                    float32_ops(lambda: m(input_ids=ids, attention_mask=mask)), ggn=ggn,
                    loss_at=loss_function(m, loss_of))


def vit(root: Path) -> ZooModel:
    """A ViT image classifier (1×8×8 images, 4×4 patches, 3 classes)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(5)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=12, num_labels=3, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, attn_implementation="eager")
    m = ViTForImageClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(8, 1, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 3, (8,), generator=g)

    def loss_of(mm: nn.Module) -> torch.Tensor:
        return cross_entropy(mm(pixel_values=X).logits, y)

    _train(m, lambda: loss_of(m), 40, 0.05)
    path = root / "vit"
    m.save_pretrained(str(path))
    data = root / "vit_images.pt"
    torch.save({"pixel_values": X, "labels": y}, data)
    L, H = dense_hessian(m, loss_of)
    ggn = dense_ggn(m, lambda mm: mm(pixel_values=X).logits, lambda z: cross_entropy(z, y))
    return ZooModel("vit", str(path), str(data), "cross-entropy", H.shape[0], L, H,
                    float32_ops(lambda: m(pixel_values=X)), ggn=ggn, loss_at=loss_function(m, loss_of))


def gpt2_bf16(root: Path, trained: nn.Module) -> ZooModel:
    """The trained GPT-2 saved in bfloat16; the reference is its weights upcast to float64."""
    import copy

    m16 = copy.deepcopy(trained).to(torch.bfloat16)
    path = root / "gpt2_bf16"
    m16.save_pretrained(str(path))
    m = m16.double().eval()
    ids, mask, labels = tokens()
    data = root / "gpt2_bf16_tokens.pt"
    torch.save({"input_ids": ids, "attention_mask": mask, "labels": labels}, data)
    L, H = dense_hessian(m, lambda mm: _causal_loss(mm(input_ids=ids, attention_mask=mask).logits, labels))
    ggn = dense_ggn(m, lambda mm: mm(input_ids=ids, attention_mask=mask).logits, lambda z: _causal_loss(z, labels))
    return ZooModel("gpt2_bf16", str(path), str(data), "causal-lm", H.shape[0], L, H, ggn=ggn,
                    loss_at=loss_function(m, lambda mm: _causal_loss(mm(input_ids=ids, attention_mask=mask).logits,
                                                                     labels)))


def gpt2_lora(root: Path, base: ZooModel, trained: nn.Module) -> ZooModel:
    """A LoRA adapter (rank 2 on ``c_attn``, α = 4) on the saved GPT-2, written in peft's format
    (``adapter_config.json`` + ``adapter_model.safetensors``) without peft; θ = the adapter's
    parameters. The reference merges ``W + (α/r)·B A`` by hand (GPT-2's Conv1D: ``x W``)."""
    import copy

    from safetensors.torch import save_file

    r, alpha = 2, 4.0
    g = torch.Generator().manual_seed(6)
    layers = range(len(trained.transformer.h))
    width = trained.config.n_embd
    tensors = {}
    for i in layers:
        out = trained.transformer.h[i].attn.c_attn.weight.shape[1]
        tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight"] = 0.3 * torch.randn(
            r, width, generator=g, dtype=F64)
        tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight"] = 0.3 * torch.randn(
            out, r, generator=g, dtype=F64)
    path = root / "gpt2_lora"
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": base.model, "r": r, "lora_alpha": alpha,
        "target_modules": ["c_attn"], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": True,
        "task_type": "CAUSAL_LM", "inference_mode": True,
    }))
    # reference: the base frozen, A and B as parameters, W_eff = W + (α/r)·(B A)ᵀ (Conv1D stores W as (in, out))
    m = copy.deepcopy(trained).double().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    As, Bs = [], []
    for i in layers:
        A = nn.Parameter(tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight"].clone())
        B = nn.Parameter(tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight"].clone())
        As.append(A)
        Bs.append(B)
    holder = nn.Module()
    holder.A, holder.B = nn.ParameterList(As), nn.ParameterList(Bs)
    ids, mask, labels = tokens()
    base_w = [m.transformer.h[i].attn.c_attn.weight.detach().clone() for i in layers]

    def logits_of(_: nn.Module) -> torch.Tensor:
        for i in layers:
            w = base_w[i] + (alpha / r) * (holder.B[i] @ holder.A[i]).T
            del m.transformer.h[i].attn.c_attn.weight
            m.transformer.h[i].attn.c_attn.weight = w
        return m(input_ids=ids, attention_mask=mask).logits

    def loss_of(_: nn.Module) -> torch.Tensor:
        return _causal_loss(logits_of(_), labels)

    # peft's order of the adapter's parameters: per layer lora_A then lora_B
    order = [x for i in layers for x in (holder.A[i], holder.B[i])]
    reorder = nn.Module()
    reorder.ps = nn.ParameterList(order)
    L, H = dense_hessian(reorder, loss_of)
    ggn = dense_ggn(reorder, logits_of, lambda z: _causal_loss(z, labels))
    data = root / "gpt2_lora_tokens.pt"
    torch.save({"input_ids": ids, "attention_mask": mask, "labels": labels}, data)
    return ZooModel("gpt2_lora", str(path), str(data), "causal-lm", H.shape[0], L, H, ggn=ggn,
                    loss_at=loss_function(reorder, loss_of))
