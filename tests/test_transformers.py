"""Transformers and language models: HF directories, named inputs, token losses, --params, --per-block.

Every number is checked against an independent reference: the Hugging Face model's own
``model(input_ids, labels=labels).loss`` (which transformers computes in float32 even for a
float64 model: compared at float32 precision), the same convention in float64 with PyTorch's
``F.cross_entropy(ignore_index=-100)`` on the shifted logits, a dense float64 Hessian of that loss
by plain autograd (one double backward per column, no ``vmap``: neither basins' loss nor its HVP
routes; ``torch.func.jacrev(jacrev(...))`` through transformers' GPT-2 gave an asymmetric Hessian,
0.7 % off, with torch 2.13 and transformers 5.24, so it is not used), an explicit-softmax
twin of an SDPA attention model, or a separately built problem. Models are tiny (P ≈ 2,000) and
built here (``tests/hf_models.py``); nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from basins.analyses.blocks import parse_blocks, per_block_hessian  # noqa: E402
from basins.analyses.hessian import hessian_eigenvalues  # noqa: E402
from basins.cli.main import main  # noqa: E402
from basins.engine.data import TensorData  # noqa: E402
from basins.engine.problem import Problem  # noqa: E402
from basins.errors import InputError  # noqa: E402
from basins.files.loading import NamedLoss, load_data, load_model, open_data  # noqa: E402
from tests.hf_models import (  # noqa: E402
    VOCAB,
    TinyLM,
    Wrapped,
    causal_lm_hessian,
    sum_count_causal_lm,
    tiny_gpt2,
    train_tiny_gpt2,
)

N, T = 6, 10


def _tokens(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids (6, 10)``, ``attention_mask`` with right padding in two rows, labels (−100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (N, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 4:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.fixture(scope="module")
def gpt2() -> dict[str, object]:
    """A tiny GPT-2 trained briefly (40 Adam steps) on the padded tokens, saved as an HF directory,
    with the dense float64 Hessian of its own loss (``model(..., labels=labels).loss``)."""
    ids, mask, labels = _tokens()
    model = train_tiny_gpt2(ids, mask, labels)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    dense, loss = causal_lm_hessian(model, ids, mask, labels)
    offsets = np.cumsum([0] + [s.numel() for s in shapes])
    with torch.no_grad():
        hf = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    return {"model": model, "ids": ids, "mask": mask, "labels": labels, "dense": dense, "names": names,
            "offsets": offsets, "theta": theta, "loss": loss, "hf_loss": hf}


def _index(g: dict[str, object], selected: list[str]) -> torch.Tensor:
    names, offsets = g["names"], g["offsets"]
    return torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names) if n in selected])


def _named(g: dict[str, object]) -> dict[str, torch.Tensor]:
    return {"input_ids": g["ids"], "attention_mask": g["mask"]}


@pytest.fixture(scope="module")
def gpt2_dir(gpt2: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    gpt2["model"].save_pretrained(str(path))
    torch.save({"input_ids": gpt2["ids"], "attention_mask": gpt2["mask"]}, path.parent / "tokens.pt")
    return path


def test_causal_lm_loss_equals_hf_loss_on_all_tokens_at_once(gpt2: dict[str, object]) -> None:
    model, ids = gpt2["model"], gpt2["ids"]
    with torch.no_grad():
        hf = float(model(input_ids=ids, labels=ids).loss)  # transformers: in float32
        logits = model(input_ids=ids).logits
    reference = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)))
    problem = Problem(model, {"input_ids": ids}, ids, batch_size=4, check_determinism=False)
    assert problem.loss_name == "causal-lm"  # inferred: a *LMHeadModel with (n, T, V) logits
    assert problem.loss_at_optimum == pytest.approx(hf, rel=1e-6)
    assert problem.loss_at_optimum == pytest.approx(reference, rel=1e-12)
    assert problem.num_terms == N * (T - 1)


def test_padded_labels_every_chunk_size(gpt2: dict[str, object]) -> None:
    """−100 on padding: the mean is over all valid tokens of the data, whatever the chunks hold."""
    model, labels = gpt2["model"], gpt2["labels"]
    reference = gpt2["loss"]
    theta = gpt2["theta"].clone().requires_grad_(True)
    params, a = {}, 0
    for n, p in model.named_parameters():
        params[n] = theta[a : a + p.numel()].reshape(p.shape)
        a += p.numel()
    logits = torch.func.functional_call(model, params, (), _named(gpt2)).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    flat_ref = torch.autograd.grad(ref, theta)[0]
    assert reference == pytest.approx(gpt2["hf_loss"], rel=1e-6)  # the convention of model(..., labels=).loss
    for b in range(1, N + 1):
        problem = Problem(model, _named(gpt2), labels, "causal-lm", batch_size=b, check_determinism=False,
                          hvp_route="fwd-rev")
        assert problem.loss_at_optimum == pytest.approx(reference, rel=1e-12), b
        assert torch.allclose(problem.grad(), flat_ref, rtol=1e-10, atol=1e-12), b
        assert problem.num_terms == int((labels[:, 1:] != -100).sum())


def test_labels_default_to_input_ids_with_padding_ignored(gpt2: dict[str, object], tmp_path: Path) -> None:
    """Data without labels: targets are input_ids with attention_mask == 0 set to −100, in every format,
    with the same fingerprint; an HDF5 file streams in chunks to the same loss."""
    ids, mask, labels = gpt2["ids"], gpt2["mask"], gpt2["labels"]
    torch.save({"input_ids": ids, "attention_mask": mask}, tmp_path / "d.pt")
    np.savez(tmp_path / "d.npz", input_ids=ids.numpy(), attention_mask=mask.numpy())
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["input_ids"], f["attention_mask"] = ids.numpy(), mask.numpy()
    torch.save({"inputs": {"input_ids": ids, "attention_mask": mask}, "targets": labels}, tmp_path / "e.pt")
    loaded = [load_data(str(tmp_path / name)) for name in ("d.pt", "d.npz", "d.h5", "e.pt")]
    for data in loaded:
        assert torch.equal(data.targets, labels)
        assert set(data.inputs) == {"input_ids", "attention_mask"}
        assert data.sha256 == loaded[0].sha256
    stream = open_data(str(tmp_path / "d.h5"))
    problem = Problem(gpt2["model"], stream.open(0, N), None, "causal-lm", batch_size=4, data_memory_bytes=0,
                      check_determinism=False)
    assert problem.streaming
    assert problem.loss_at_optimum == pytest.approx(gpt2["loss"], rel=1e-12)
    assert f"{problem.data.digest:064x}" == loaded[0].sha256
    spec = open_data("tests.hf_models:token_dataset")  # a Dataset of dict items, streamed
    assert not isinstance(spec, TensorData)
    problem = Problem(gpt2["model"], spec.open(0, N), None, "causal-lm", batch_size=4, data_memory_bytes=0,
                      check_determinism=False)
    assert problem.loss_at_optimum == pytest.approx(gpt2["loss"], rel=1e-12)
    assert f"{problem.data.digest:064x}" == loaded[0].sha256


def test_user_loss_returning_sum_and_count_is_weighted_by_its_counts(gpt2: dict[str, object]) -> None:
    loss = NamedLoss(sum_count_causal_lm, "tests.hf_models:sum_count_causal_lm")
    for b in (1, 4):
        problem = Problem(gpt2["model"], _named(gpt2), gpt2["labels"], loss, batch_size=b, check_determinism=False)
        assert problem.pair_loss
        assert problem.loss_at_optimum == pytest.approx(gpt2["loss"], rel=1e-12)


@pytest.mark.slow
def test_top5_eigenvalues_equal_dense_reference(gpt2: dict[str, object]) -> None:
    problem = Problem(gpt2["model"], _named(gpt2), gpt2["labels"], "causal-lm", batch_size=4)
    result = hessian_eigenvalues(problem, k=5, tol=1e-11, max_hvps=600)
    reference = torch.linalg.eigvalsh(gpt2["dense"]).flip(0)[:5]
    assert result.top is not None
    assert torch.allclose(result.top.eigenvalues, reference, rtol=1e-8, atol=0), (result.top.eigenvalues, reference)


@pytest.mark.slow
def test_params_glob_on_hf_directory_equals_dense_sub_block(gpt2: dict[str, object], gpt2_dir: Path) -> None:
    r = CliRunner().invoke(main, ["hessian", str(gpt2_dir), "--data", str(gpt2_dir.parent / "tokens.pt"),
                                  "--params", "transformer.h.0.*", "-k", "3", "--tol", "1e-11", "--dtype", "float64",
                                  "--json", "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    selected = [n for n in gpt2["names"] if n.startswith("transformer.h.0.")]
    idx = _index(gpt2, selected)
    assert out["num_params"] == idx.numel() == 872
    assert out["loss"] == "causal-lm"
    assert out["loss_at_optimum"] == pytest.approx(gpt2["loss"], rel=1e-12)
    reference = torch.linalg.eigvalsh(gpt2["dense"][idx][:, idx]).flip(0)[:3]
    assert np.allclose(out["eigenvalues"], reference.numpy(), rtol=1e-8, atol=0)


def test_frozen_parameters_are_excluded(gpt2: dict[str, object]) -> None:
    model = tiny_gpt2()
    model.load_state_dict(gpt2["model"].state_dict())
    for p in model.transformer.wpe.parameters():
        p.requires_grad_(False)
    problem = Problem(model, _named(gpt2), gpt2["labels"], "causal-lm", check_determinism=False)
    assert problem.selection.frozen == ["transformer.wpe.weight"]
    assert "transformer.wpe.weight" not in problem.space.names
    kept = [n for n in gpt2["names"] if n != "transformer.wpe.weight"]
    idx = _index(gpt2, kept)
    assert problem.num_params == idx.numel()
    v = torch.randn(idx.numel(), 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(problem.hvp(v), gpt2["dense"][idx][:, idx] @ v, rtol=1e-9, atol=1e-11)
    assert Problem(model, _named(gpt2), gpt2["labels"], "causal-lm", include_frozen=True,
                   check_determinism=False).num_params == gpt2["theta"].numel()


def test_params_patterns_include_and_exclude(gpt2: dict[str, object]) -> None:
    problem = Problem(gpt2["model"], _named(gpt2), gpt2["labels"], "causal-lm", check_determinism=False,
                      params=["transformer.h.*", "!*.bias", "!*ln_*"])
    assert problem.space.names == [n for n in gpt2["names"] if n.startswith("transformer.h.")
                                   and not n.endswith(".bias") and "ln_" not in n]
    with pytest.raises(InputError, match="matches no parameter"):
        Problem(gpt2["model"], _named(gpt2), gpt2["labels"], params=["decoder.*"], check_determinism=False)


@pytest.mark.slow
def test_per_block_table_equals_separate_params_runs(gpt2: dict[str, object], gpt2_dir: Path) -> None:
    problem = Problem(gpt2["model"], _named(gpt2), gpt2["labels"], "causal-lm")
    blocks = parse_blocks(problem.space.names, ["3"])
    assert [b for b, _ in blocks] == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                                      "transformer.ln_f"]
    table = per_block_hessian(problem, blocks, tol=1e-10, trace_hvps=30, seed=3)
    for row, (_, names) in zip(table.rows, blocks):
        alone = Problem(gpt2["model"], _named(gpt2), gpt2["labels"], "causal-lm", params=list(names),
                        check_determinism=False)
        res = hessian_eigenvalues(alone, k=1, tol=1e-10, trace=row.num_params > 30, trace_hvps=30, seed=3)
        assert res.top is not None and row.num_params == alone.num_params
        assert row.lambda_max == pytest.approx(float(res.top.eigenvalues[0]), rel=1e-9)
        idx = _index(gpt2, list(names))
        sub = gpt2["dense"][idx][:, idx]
        assert row.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(sub)[-1]), rel=1e-8)
        if row.num_params > 30:  # Hutch++ with the same probes as the separate run
            assert row.trace == pytest.approx(res.trace, rel=1e-9, abs=1e-12)
            assert row.trace_stderr == pytest.approx(res.trace_stderr, rel=1e-6, abs=1e-12)
        else:  # exact
            assert row.trace == pytest.approx(float(torch.trace(sub)), rel=1e-9, abs=1e-12)
    # the command: a /hessian_blocks group and the table on stdout
    report = gpt2_dir.parent / "blocks.h5"
    r = CliRunner().invoke(main, ["hessian", str(gpt2_dir), "--data", str(gpt2_dir.parent / "tokens.pt"),
                                  "--per-block", "transformer.h.1.*", "--tol", "1e-10", "-o", str(report), "--json",
                                  "-q", "--seed", "3", "--trace-hvps", "30"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["block_names"] == ["transformer.h.1.*"]
    assert out["lambda_max"][0] == pytest.approx(table.rows[3].lambda_max, rel=1e-9)
    assert out["trace"][0] == pytest.approx(table.rows[3].trace, rel=1e-9)
    s = CliRunner().invoke(main, ["summary", str(report)])
    assert s.exit_code == 0 and "transformer.h.1.*" in s.stdout


@pytest.mark.parametrize("kind", ["tuple", "dict", "scores"])
def test_tuple_and_dict_outputs(kind: str) -> None:
    torch.manual_seed(0)
    inner = TinyLM().double()
    ids = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(2))
    plain = Problem(inner, ids, ids, "causal-lm", check_determinism=False, hvp_route="fwd-rev")
    wrapped = Problem(Wrapped(inner, kind), ids, ids, "causal-lm", check_determinism=False, hvp_route="fwd-rev")
    v = torch.randn(plain.num_params, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert wrapped.loss_at_optimum == pytest.approx(plain.loss_at_optimum, rel=1e-14)
    assert torch.allclose(wrapped.hvp(v), plain.hvp(v), rtol=1e-12, atol=1e-14)


def test_output_field_is_named_or_the_error_lists_the_fields() -> None:
    inner = TinyLM().double()
    ids = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(2))
    p = Problem(Wrapped(inner, "tuple"), ids, ids.double(), "mse", output="1", check_determinism=False)
    assert p._output_spec[0] == (6,)  # the second element, (n, T)

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.inner(x)
            return {"a": out, "b": out}

    with pytest.raises(InputError, match="fields a, b"):
        Problem(Two(), ids, ids, "causal-lm", check_determinism=False)
    assert Problem(Two(), ids, ids, "causal-lm", output="b", check_determinism=False).loss_at_optimum > 0


@pytest.mark.parametrize("route", ["graph", "fwd-rev", "rev-rev"])
def test_attention_model_under_each_route(route: str) -> None:
    """A model calling F.scaled_dot_product_attention (on CPU the fused flash kernel, which has no double
    backward nor forward AD) gives, under every route, the HVP of its explicit-softmax twin."""
    torch.manual_seed(0)
    fused = TinyLM().double()
    twin = TinyLM(manual=True).double()
    twin.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(2))
    problem = Problem(fused, ids, ids, "causal-lm", hvp_route=route, batch_size=3)
    assert problem.attention == "sdpa-math"
    params = [p for p in twin.parameters()]
    loss = torch.nn.functional.cross_entropy(twin(ids)[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vs = problem.space.unflatten(v)
    hv = torch.autograd.grad(grads, params, [vs[n] for n, _ in twin.named_parameters()])
    reference = torch.cat([h.reshape(-1) for h in hv])
    assert torch.allclose(problem.hvp_with_route(v, route), reference, rtol=1e-10, atol=1e-12)


def test_hf_model_with_sdpa_is_switched_to_eager(gpt2: dict[str, object]) -> None:
    model = tiny_gpt2(attn="sdpa")
    model.load_state_dict(gpt2["model"].state_dict())
    problem = Problem(model, _named(gpt2), gpt2["labels"], "causal-lm", hvp_route="fwd-rev", check_determinism=False)
    assert problem.attention == "eager (switched from sdpa)"
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(problem.hvp(v), gpt2["dense"] @ v, rtol=1e-9, atol=1e-11)


def test_pytorch_model_bin_directory_needs_trust_pickle(gpt2: dict[str, object], gpt2_dir: Path,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "old"
    path.mkdir()
    shutil.copy(gpt2_dir / "config.json", path / "config.json")
    torch.save(gpt2["model"].state_dict(), path / "pytorch_model.bin")
    with pytest.raises(InputError, match="pytorch_model.bin, a pickle.*trust_pickle=True"):
        load_model(str(path))
    r = CliRunner().invoke(main, ["hessian", str(path), "--data", str(gpt2_dir.parent / "tokens.pt"), "-k", "1"])
    assert r.exit_code == 2 and "--trust-pickle" in r.output
    loaded = load_model(str(path), trust_pickle=True)
    assert loaded.kind == "hf"
    with torch.no_grad():
        assert float(loaded.module(**_named(gpt2), labels=gpt2["labels"]).loss) == gpt2["hf_loss"]


def test_hf_directory_loads_locally_with_eager_attention(gpt2: dict[str, object], gpt2_dir: Path,
                                                          tmp_path: Path) -> None:
    loaded = load_model(str(gpt2_dir))
    assert loaded.kind == "hf" and loaded.attention == "eager" and len(loaded.sha256) == 64
    assert not loaded.module.config.use_cache
    remote = tmp_path / "remote"
    shutil.copytree(gpt2_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="never runs such code"):
        load_model(str(remote))
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        load_model(str(tmp_path / "plain"))


def test_missing_transformers_names_the_extra(gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InputError, match=r"basins\[hf\]"):
        load_model(str(gpt2_dir))


def test_safetensors_file_with_arch(gpt2: dict[str, object], tmp_path: Path) -> None:
    from safetensors.torch import save_model

    path = tmp_path / "w.safetensors"
    save_model(gpt2["model"], str(path))  # one copy of the tied embedding / output weights
    with pytest.raises(InputError, match="arch="):
        load_model(str(path))
    loaded = load_model(str(path), arch="tests.hf_models:tiny_gpt2")
    with torch.no_grad():
        assert float(loaded.module(**_named(gpt2), labels=gpt2["labels"]).loss) == gpt2["hf_loss"]


def test_cross_entropy_keeps_classes_in_dimension_1(gpt2: dict[str, object]) -> None:
    with pytest.raises(InputError, match="causal-lm"):
        Problem(gpt2["model"], _named(gpt2), gpt2["labels"], "cross-entropy", check_determinism=False)


def test_named_inputs_with_different_sizes_are_refused() -> None:
    with pytest.raises(InputError, match="different numbers of examples"):
        TensorData({"input_ids": torch.zeros(3, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)},
                   torch.zeros(3, 4, dtype=torch.long))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "vit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_families_load_from_their_directories(family: str, dtype: torch.dtype, tmp_path: Path) -> None:
    """GPT-2, Llama, a BERT classifier and a ViT classifier saved with save_pretrained (float32 or
    bfloat16) load as their own class with eager attention and compute the saved model's outputs;
    bfloat16 weights come back upcast to float32, exactly."""
    from tests.hf_models import tiny_family

    model, inputs = tiny_family(family)
    stored = model.to(dtype)
    stored.save_pretrained(str(tmp_path / family))
    loaded = load_model(str(tmp_path / family))
    assert loaded.kind == "hf" and type(loaded.module) is type(model)
    assert loaded.source_dtype == (None if dtype == torch.float32 else "bfloat16")
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}
    reference = stored.float()  # the stored weights, exactly, in float32
    with torch.no_grad():
        expected, got = reference(**inputs).logits, loaded.module(**inputs).logits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()
