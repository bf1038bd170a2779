"""Models as they come: bfloat16/float16 checkpoints and peft LoRA adapter directories.

Half-precision weights are upcast (exactly) to the analysis dtype: every number is checked against
the float64 model built here from the same stored weights (``model.to(bfloat16).double()``), its
loss by ``F.cross_entropy`` and its Hessian dense by plain autograd (``tests.hf_models.causal_lm_hessian``).
A LoRA adapter is trained here with peft on a tiny GPT-2 and saved; basins loads the directory on
its base model, and the reference is the in-memory peft model it came from (not reloaded).
Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")

from basins.cli.main import main  # noqa: E402
from basins.engine.params import select_parameters  # noqa: E402
from basins.errors import InputError  # noqa: E402
from basins.files.loading import load_model  # noqa: E402
from basins.files.report import read_report  # noqa: E402
from tests.hf_models import causal_lm_hessian, train_tiny_gpt2  # noqa: E402
from tests.test_transformers import _tokens  # noqa: E402

BLOCK = "transformer.h.1.*"


def _cli(*args: str) -> tuple[int, dict[str, object] | None, str]:
    r = CliRunner().invoke(main, list(args))
    out = json.loads(r.stdout) if r.exit_code == 0 and "--json" in args else None
    return r.exit_code, out, r.stderr


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A trained tiny GPT-2 saved with save_pretrained in bfloat16 and in float16, and for each the
    float64 model of the stored weights (what basins must analyse)."""
    ids, mask, labels = _tokens()
    model = train_tiny_gpt2(ids, mask, labels)
    root = tmp_path_factory.mktemp("half")
    torch.save({"input_ids": ids, "attention_mask": mask}, root / "tokens.pt")
    out: dict[str, object] = {"root": root, "ids": ids, "mask": mask, "labels": labels}
    for name, dtype in (("bf", torch.bfloat16), ("fp", torch.float16)):
        stored = copy.deepcopy(model).to(dtype)
        stored.save_pretrained(str(root / name))
        out[name] = copy.deepcopy(stored).double()
    return out


def _hessian_of_block(half: dict[str, object], key: str, *args: str) -> tuple[torch.Tensor, float, dict, str]:
    """The dense float64 Hessian of the block and the loss of the stored weights ``half[key]``, and
    ``basins hessian DIR --params BLOCK *args --json``'s output and stderr (exit 0 checked)."""
    root, up = half["root"], half[key]
    names = [n for n, _ in up.named_parameters() if n.startswith(BLOCK[:-1])]
    dense, loss = causal_lm_hessian(up, half["ids"], half["mask"], half["labels"], names)
    code, out, err = _cli("hessian", str(root / key), "--data", str(root / "tokens.pt"), "--params", BLOCK,
                          "--json", *args)
    assert code == 0, err
    return dense, loss, out, err


@pytest.mark.slow
def test_bf16_directory_float64_eigenvalues_equal_dense_reference(half: dict[str, object]) -> None:
    report = str(half["root"] / "bf.h5")
    dense, loss, out, err = _hessian_of_block(half, "bf", "-k", "3", "--tol", "1e-11", "--dtype", "float64",
                                              "-o", report)
    assert out["dtype"] == "float64" and out["source_dtype"] == "bfloat16"
    assert [ln for ln in err.splitlines() if "bfloat16" in ln] == ["weights stored as bfloat16: upcast to float64"]
    assert out["loss_at_optimum"] == pytest.approx(loss, rel=1e-12)
    reference = torch.linalg.eigvalsh(dense).flip(0)[:3].numpy()
    assert np.allclose(out["eigenvalues"], reference, rtol=1e-8, atol=0), (out["eigenvalues"], reference)
    problem = read_report(report)["problem"]
    assert problem["source_dtype"] == "bfloat16" and problem["dtype"] == "float64"


@pytest.mark.slow
def test_fp16_directory_float32_default_bounds_hold(half: dict[str, object]) -> None:
    """Default analysis dtype float32: each printed eigenvalue is within its error bound of the float64 truth."""
    dense, _, out, err = _hessian_of_block(half, "fp", "-k", "2")
    assert out["dtype"] == "float32" and out["source_dtype"] == "float16"
    assert "weights stored as float16: upcast to float32 (--dtype float64 for float64)" in err
    reference = torch.linalg.eigvalsh(dense).flip(0)[:2].numpy()
    gaps = np.abs(np.asarray(out["eigenvalues"]) - reference)
    assert np.all(gaps <= np.asarray(out["error_bounds"])), (gaps, out["error_bounds"])


@pytest.mark.slow
def test_landscape_between_bf16_and_fp16_directories(half: dict[str, object]) -> None:
    """A second command on half-precision directories: the line's end losses are those of the two
    float64 models of the stored weights (which differ: bf16 and fp16 round differently)."""
    root = half["root"]
    ref = [_loss(half[k], half) for k in ("bf", "fp")]
    assert ref[0] != ref[1]
    code, out, err = _cli("landscape", str(root / "bf"), "--to", str(root / "fp"), "--data", str(root / "tokens.pt"),
                          "--dtype", "float64", "--points", "5", "--json", "-q")
    assert code == 0, err
    assert out["source_dtype"] == "bfloat16"
    assert out["loss_a"] == pytest.approx(ref[0], rel=1e-12)
    assert out["loss_b"] == pytest.approx(ref[1], rel=1e-12)


def _loss(model: torch.nn.Module, half: dict[str, object]) -> float:
    """The float64 mean next-token cross-entropy of ``model`` on the test tokens."""
    with torch.no_grad():
        logits = model(input_ids=half["ids"], attention_mask=half["mask"]).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   half["labels"][:, 1:].reshape(-1), ignore_index=-100))


def test_half_state_dict_pickle_and_safetensors_are_upcast(tmp_path: Path) -> None:
    """A bf16 state dict (into a float64 --arch), a trusted fp16 pickle and a bf16 .safetensors with
    --arch: the module comes back in float32 or float64, with the stored dtype recorded."""
    from safetensors.torch import save_model

    from tests.hf_models import tiny_gpt2

    model = tiny_gpt2().to(torch.bfloat16)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    save_model(model, str(tmp_path / "w.safetensors"))
    torch.save(tiny_gpt2().half(), tmp_path / "pickled.pt")
    for path, kw, dtype, source in (
        ("sd.pt", {"arch": "tests.hf_models:tiny_gpt2"}, torch.float64, "bfloat16"),
        ("w.safetensors", {"arch": "tests.hf_models:tiny_gpt2"}, torch.float64, "bfloat16"),
        ("pickled.pt", {"trust_pickle": True}, torch.float32, "float16"),
    ):
        loaded = load_model(str(tmp_path / path), **kw)
        assert loaded.source_dtype == source, path
        assert {p.dtype for p in loaded.module.parameters()} == {dtype}, path
        expected = tiny_gpt2().to(torch.bfloat16 if source == "bfloat16" else torch.float16).to(dtype)
        for (name, p), q in zip(loaded.module.named_parameters(), expected.parameters()):
            assert torch.equal(p, q), (path, name)
    assert load_model(str(tmp_path / "sd.pt"), arch="tests.hf_models:tiny_gpt2").source_dtype == "bfloat16"


# ---------------------------------------------------------------------- peft adapters
@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A LoRA (r=2 on c_attn) trained 20 Adam steps on a trained tiny GPT-2 loaded from its
    directory, saved with save_pretrained; the in-memory model is the reference."""
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    ids, mask, labels = _tokens()
    root = tmp_path_factory.mktemp("lora")
    train_tiny_gpt2(ids, mask, labels).save_pretrained(str(root / "base"))
    torch.save({"input_ids": ids, "attention_mask": mask}, root / "tokens.pt")
    base = GPT2LMHeadModel.from_pretrained(str(root / "base"), attn_implementation="eager").double()
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                        lora_dropout=0.0, fan_in_fan_out=True))
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        wrapped(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    wrapped.eval()
    wrapped.save_pretrained(str(root / "adapter"))
    inner = wrapped.base_model.model
    names = [n for n, p in inner.named_parameters() if p.requires_grad]
    assert len(names) == 4 and all("lora_" in n for n in names)
    return {"root": root, "inner": inner, "names": names, "ids": ids, "mask": mask, "labels": labels}


def _lora_reference(lora: dict[str, object], names: list[str]) -> tuple[torch.Tensor, float]:
    return causal_lm_hessian(lora["inner"], lora["ids"], lora["mask"], lora["labels"], names)


def test_lora_adapter_directory_hessian_over_adapter_parameters(lora: dict[str, object]) -> None:
    root = lora["root"]
    dense, loss = _lora_reference(lora, lora["names"])
    code, out, err = _cli("hessian", str(root / "adapter"), "--data", str(root / "tokens.pt"), "-k", "3",
                          "--tol", "1e-11", "--dtype", "float64", "--json")
    assert code == 0, err
    assert out["num_params"] == dense.shape[0] == 128
    assert out["base_model"] == str(root / "base")
    assert out["loss_at_optimum"] == pytest.approx(loss, rel=1e-12)
    reference = torch.linalg.eigvalsh(dense).flip(0)[:3].numpy()
    assert np.allclose(out["eigenvalues"], reference, rtol=1e-8, atol=0), (out["eigenvalues"], reference)
    assert "28 frozen (requires_grad=False) left out" in " ".join(err.split())


def test_lora_params_glob_and_frozen_base_parameter(lora: dict[str, object]) -> None:
    """--params selects among the adapter's parameters, and a glob naming a frozen base parameter selects it."""
    root = lora["root"]
    common = ["--data", str(root / "tokens.pt"), "-k", "2", "--tol", "1e-11", "--dtype", "float64", "--json", "-q"]
    for glob, names in (("*lora_A*", [n for n in lora["names"] if "lora_A" in n]),
                        ("transformer.h.0.attn.c_attn.base_layer.weight",
                         ["transformer.h.0.attn.c_attn.base_layer.weight"])):
        dense, _ = _lora_reference(lora, names)
        code, out, err = _cli("hessian", str(root / "adapter"), "--params", glob, *common)
        assert code == 0, err
        assert out["num_params"] == dense.shape[0], glob
        reference = torch.linalg.eigvalsh(dense).flip(0)[:2].numpy()
        assert np.allclose(out["eigenvalues"], reference, rtol=1e-8, atol=0), glob


def test_adapter_base_model_option_and_no_hub(lora: dict[str, object], tmp_path: Path) -> None:
    """A base named as a hub id is refused (exit 2, one line naming --base-model); --base-model DIR serves."""
    root = lora["root"]
    moved = tmp_path / "adapter"
    shutil.copytree(root / "adapter", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "openai-community/gpt2"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    args = ["hessian", str(moved), "--data", str(root / "tokens.pt"), "-k", "1", "--json", "-q"]
    code, _, err = _cli(*args)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--base-model" in lines[0] and "never downloads" in lines[0], err
    code, out, err = _cli(*args, "--base-model", str(root / "base"))
    assert code == 0, err
    assert out["num_params"] == 128 and out["base_model"] == str(root / "base")
    code, _, err = _cli("hessian", str(root / "base"), "--base-model", str(root / "base"), "--data",
                        str(root / "tokens.pt"), "--json", "-q")
    assert code == 2 and "base_model is for a peft adapter directory" in err


def test_everything_frozen_names_the_parameter() -> None:
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(InputError, match="set include_frozen=True") as exc:
        select_parameters(list(frozen.named_parameters()))
    assert exc.value.param is None and "--" not in str(exc.value)  # no pattern at fault: the hint names the fix
    with pytest.raises(InputError, match="set include_frozen=True") as exc:
        select_parameters(list(frozen.named_parameters()), ["!bias"])
    assert exc.value.param == "params"
    assert select_parameters(list(frozen.named_parameters()), ["weight"]).selected == ["weight"]
    assert select_parameters(list(frozen.named_parameters()), include_frozen=True).selected == ["weight", "bias"]


def test_bf16_export_is_upcast(tmp_path: Path) -> None:
    """A .pt2 exported from a bfloat16 model: parameters come back in float32, equal to the stored
    values, and the module computes the float32 model of those weights on float32 inputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    stored = model.to(torch.bfloat16)
    x = torch.randn(5, 4)
    program = torch.export.export(stored, (x[:2].bfloat16(),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "bf.pt2"))
    loaded = load_model(str(tmp_path / "bf.pt2"))
    assert loaded.source_dtype == "bfloat16"
    reference = copy.deepcopy(stored).float()
    got = dict(loaded.module.named_parameters())
    for name, p in reference.named_parameters():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], p), name
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), reference(x), rtol=1e-6, atol=1e-7)


def test_classifier_adapter_with_modules_to_save(tmp_path: Path) -> None:
    """LoRA on a BERT classifier whose head is trained whole (peft's modules_to_save): θ is the LoRA
    matrices and the head's copy, and the loaded model computes the in-memory peft model's logits."""
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    from tests.hf_models import tiny_family

    model, inputs = tiny_family("bert")
    model.save_pretrained(str(tmp_path / "bert"))
    base = BertForSequenceClassification.from_pretrained(str(tmp_path / "bert"), attn_implementation="eager")
    wrapped = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        wrapped(**inputs, labels=torch.tensor([0, 1, 2])).loss.backward()
        opt.step()
    wrapped.eval()
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    loaded = load_model(str(tmp_path / "adapter"))
    assert loaded.kind == "peft" and loaded.base_model == str(tmp_path / "bert")
    trainable = [n for n, p in loaded.module.named_parameters() if p.requires_grad]
    assert sum("lora_" in n for n in trainable) == 8
    assert {n for n in trainable if "lora_" not in n} == {"classifier.modules_to_save.default.weight",
                                                         "classifier.modules_to_save.default.bias"}
    with torch.no_grad():
        assert torch.allclose(loaded.module(**inputs).logits, wrapped(**inputs).logits, rtol=1e-6, atol=1e-7)
