"""Tiny language models for the transformer tests (built locally: nothing is downloaded).

``tiny_gpt2()`` is a GPT-2 from ``transformers.GPT2Config`` (vocabulary 23, 12 positions, width 8,
2 layers, 2 heads: P = 2,040 with the tied output layer), float64, eager attention, no cache.
``TinyLM`` is a one-layer causal self-attention LM written with ``F.scaled_dot_product_attention``
(so that on CPU it takes the fused kernel unless basins forces the math backend); its twin
``manual=True`` computes the same attention with explicit softmax, as an independent reference.
``Wrapped`` returns its inner model's logits as a tensor, a tuple, a dict, or a dict without
``logits``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, POSITIONS = 23, 12


def gpt2_config(attn: str = "eager") -> object:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=8, n_layer=2, n_head=2, use_cache=False,
                      bos_token_id=None, eos_token_id=None, attn_implementation=attn)


def train_tiny_gpt2(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, steps: int = 40) -> nn.Module:
    """``tiny_gpt2()`` after ``steps`` Adam steps (lr 0.05) on the given tokens, in eval mode."""
    model = tiny_gpt2()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    return model.eval()


def causal_lm_hessian(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                      names: list[str] | None = None) -> tuple[torch.Tensor, float]:
    """The dense Hessian of the mean next-token cross-entropy (−100 ignored, float64 ``F.cross_entropy``
    on the shifted logits) in the parameters ``names`` (default: all, in ``named_parameters`` order,
    flattened), the others held at their values; and that loss. By plain autograd, one double
    backward per column (no ``vmap``, none of basins' code); symmetrised after checking symmetry.
    The model must compute in float64."""
    every = dict(model.named_parameters())
    names = list(every) if names is None else names
    shapes = [every[n].shape for n in names]
    theta = torch.cat([every[n].detach().reshape(-1) for n in names])
    assert theta.dtype == torch.float64

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, a = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[a : a + s.numel()].reshape(s)
            a += s.numel()
        logits = torch.func.functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask}).logits
        assert logits.dtype == torch.float64
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)

    leaf = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(loss(leaf), leaf, create_graph=True)[0]
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    dense = torch.stack([torch.autograd.grad(g, leaf, eye[i], retain_graph=True)[0] for i in range(theta.numel())])
    assert float((dense - dense.T).abs().max()) <= 1e-12 * float(dense.abs().max())
    with torch.no_grad():
        value = float(loss(theta))
    return (dense + dense.T) / 2, value


def tiny_gpt2(attn: str = "eager", seed: int = 0) -> nn.Module:
    """A randomly initialised tiny GPT-2 in float64 (``--arch tests.hf_models:tiny_gpt2``)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(attn)).double().eval()


class TinyLM(nn.Module):
    """Embedding, one causal self-attention layer (1 head, width 6), output layer: ``(n, T) → (n, T, V)``."""

    def __init__(self, vocab: int = 11, width: int = 6, manual: bool = False) -> None:
        super().__init__()
        self.manual = manual
        self.emb = nn.Embedding(vocab, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        if self.manual:
            T = h.shape[1]
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            a = torch.softmax(scores, dim=-1) @ v
        else:
            # (n, heads = 1, T, width): the layout for which CPU takes the fused flash kernel
            a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True)[:, 0]
        return self.out(torch.tanh(h + a))


class Wrapped(nn.Module):
    """``inner``'s logits returned as ``kind``: ``tensor``, ``tuple`` (logits, hidden), ``dict``
    ({"hidden", "logits"}) or ``scores`` ({"scores": logits, "aux": None})."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, input_ids: torch.Tensor) -> object:
        logits = self.inner(input_ids)
        if self.kind == "tuple":
            return logits, logits.sum(-1)
        if self.kind == "dict":
            return {"hidden": logits.sum(-1), "logits": logits}
        if self.kind == "scores":
            return {"scores": logits, "aux": None}
        return logits


def sum_count_causal_lm(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A user loss in the ``(sum, count)`` form: next-token cross-entropy summed over valid tokens."""
    logits, labels = outputs[:, :-1], targets[:, 1:]
    valid = labels != -100
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                          ignore_index=-100)
    return per.sum(), valid.sum()


class TokenDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Map-style dataset of dict items ``{"input_ids": (T,), "attention_mask": (T,)}`` (no labels)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def token_dataset() -> TokenDataset:
    """The padded tokens of ``tests/test_transformers.py`` as a Dataset of dicts."""
    from tests.test_transformers import _tokens

    ids, mask, _ = _tokens()
    return TokenDataset(ids, mask)


def tiny_family(family: str, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny randomly initialised float32 model of a Hugging Face family (``gpt2``, ``llama``,
    ``bert`` classifier, ``vit`` classifier) with eager attention, and a batch of its inputs."""
    import transformers as tf

    torch.manual_seed(seed)
    small = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16}
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(seed))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(gpt2_config()).eval(), {"input_ids": ids}
    if family == "llama":
        config = tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_key_value_heads=1,
                                attn_implementation="eager", **small)
        return tf.LlamaForCausalLM(config).eval(), {"input_ids": ids}
    if family == "bert":
        config = tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_labels=3,
                               attn_implementation="eager", **small)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        return tf.BertForSequenceClassification(config).eval(), {"input_ids": ids, "attention_mask": mask}
    if family == "vit":
        config = tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, num_labels=3,
                              attn_implementation="eager", **small)
        pixels = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        return tf.ViTForImageClassification(config).eval(), {"pixel_values": pixels}
    raise ValueError(family)
