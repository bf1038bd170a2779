"""Hostile model files of the Hugging Face / state-dict kind: each is refused with exit 2 and one
line, no traceback, no hang, before anything large is allocated.

Cases (built here from a tiny GPT-2 directory, a safetensors file and torch.save state dicts):
config sizes far beyond the weights or the machine (``n_layer=200000``, ``n_embd=10**6``),
``architectures`` naming a tokenizer/config/processor class, JSON nested 100,000 deep in
``config.json``/``generation_config.json``/``adapter_config.json``/a safetensors header, parameter
names that are not dotted identifiers or that shadow ``nn.Module`` attributes, ``meta`` and sparse
tensors, safetensors headers that lie about sizes or offsets, a shard index pointing outside the
directory, a FIFO as the weights, and adapters whose config asks for a huge rank, a backtracking
regular expression or a base model from a hub. Each goes through ``load_model`` in this process
(fast) and, marked slow, through the CLI in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from basins.errors import InputError  # noqa: E402
from basins.files.loading import load_model  # noqa: E402
from tests.hf_models import tiny_gpt2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCH = "tests.hf_models:tiny_gpt2"
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 directory, a LoRA adapter on it, and tokens."""
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_gpt2().float()
    model.save_pretrained(str(root / "gpt"))
    torch.save({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, root / "tokens.pt")
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    wrapped.peft_config["default"].base_model_name_or_path = str(root / "gpt")
    wrapped.save_pretrained(str(root / "adapter"))
    return root


def _copy(base: Path, tmp: Path, name: str = "gpt") -> Path:
    out = tmp / f"m_{name}"
    shutil.copytree(base / name, out)
    return out


def _edit_json(path: Path, **changes: object) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


def _safetensors(path: Path, header: dict[str, object] | str, data: bytes = b"", length: int | None = None) -> None:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _config(**changes: object) -> Callable[[Path, Path], tuple[Path, dict[str, object]]]:
    def build(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
        d = _copy(base, tmp)
        _edit_json(d / "config.json", **changes)
        return d, {}
    return build


def _raw_file(name: str, text: str, what: str = "gpt") -> Callable[[Path, Path], tuple[Path, dict[str, object]]]:
    def build(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
        d = _copy(base, tmp, what)
        (d / name).write_text(text)
        return d, {}
    return build


def _st_name(name: str) -> Callable[[Path, Path], tuple[Path, dict[str, object]]]:
    def build(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
        _safetensors(tmp / "w.safetensors", {name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
        return tmp / "w.safetensors", {"arch": ARCH}
    return build


def _st_header(header: dict[str, object] | str, data: bytes = b"", length: int | None = None) -> Callable[
        [Path, Path], tuple[Path, dict[str, object]]]:
    def build(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
        _safetensors(tmp / "w.safetensors", header, data, length)
        return tmp / "w.safetensors", {"arch": ARCH}
    return build


def _state(state: dict[object, torch.Tensor]) -> Callable[[Path, Path], tuple[Path, dict[str, object]]]:
    def build(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
        torch.save(state, tmp / "sd.pt")
        return tmp / "sd.pt", {"arch": ARCH}
    return build


def _pickled_meta(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
    torch.save(torch.nn.Linear(2, 2, device="meta"), tmp / "meta.pt")
    return tmp / "meta.pt", {"trust_pickle": True}


def _dir_weights(header: dict[str, object], data: bytes = b"") -> Callable[[Path, Path], tuple[Path, dict[str, object]]]:
    def build(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
        d = _copy(base, tmp)
        _safetensors(d / "model.safetensors", header, data)
        return d, {}
    return build


def _index_outside(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
    d = _copy(base, tmp)
    shutil.copy(d / "model.safetensors", tmp / "secret.safetensors")
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../secret.safetensors"}}))
    return d, {}


def _fifo_weights(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
    d = _copy(base, tmp)
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    return d, {}


def _weights_edit(drop: str | None = None, add: str | None = None) -> Callable[[Path, Path], tuple[Path, dict[str, object]]]:
    def build(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
        from safetensors.torch import load_file, save_file

        d = _copy(base, tmp)
        state = load_file(str(d / "model.safetensors"))
        if drop:
            del state[drop]
        if add:
            state[add] = torch.zeros(2)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d, {}
    return build


def _adapter(**changes: object) -> Callable[[Path, Path], tuple[Path, dict[str, object]]]:
    def build(base: Path, tmp: Path) -> tuple[Path, dict[str, object]]:
        d = _copy(base, tmp, "adapter")
        _edit_json(d / "adapter_config.json", **changes)
        return d, {}
    return build


_FORWARD = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
CASES: dict[str, tuple[Callable[[Path, Path], tuple[Path, dict[str, object]]], str]] = {
    "n_layer_200000": (_config(n_layer=200_000), "does not match the weights"),
    "n_embd_1e6": (_config(n_embd=1_000_000), "parameters"),
    "positions_1e10": (_config(max_position_embeddings=10_000_000_000), "max_position_embeddings=10000000000"),
    "num_labels_1e9": (_config(num_labels=1_000_000_000), "num_labels=1000000000"),
    "architectures_tokenizer": (_config(architectures=["GPT2TokenizerFast"]), "not a model class"),
    "architectures_config": (_config(architectures=["GPT2Config"]), "not a model class"),
    "architectures_processor": (_config(architectures=["AutoProcessor"]), "not a model class"),
    "architectures_private": (_config(architectures=["__class__"]), "not a model class"),
    "config_deep_json": (_raw_file("config.json", '{"model_type": "gpt2", "x": ' + DEEP + "}"), "nested"),
    "generation_config_deep_json": (_raw_file("generation_config.json", DEEP), "nested"),
    "adapter_config_deep_json": (_raw_file("adapter_config.json", DEEP, "adapter"), "nested"),
    "safetensors_header_deep_json": (_st_header('{"a": ' + DEEP + "}"), "nested"),
    "name_forward": (_st_name("forward"), "attribute of every nn.Module"),
    "name_training": (_st_name("layer.training"), "attribute of every nn.Module"),
    "name__parameters": (_st_name("_parameters"), "attribute of every nn.Module"),
    "name_empty": (_st_name(""), "not a dotted identifier"),
    "name_not_dotted": (_st_name("a..b"), "not a dotted identifier"),
    "name_escape": (_st_name("w\x1b]0;owned\x07"), "not a dotted identifier"),
    "state_dict_forward": (_state({"forward": torch.zeros(1)}), "attribute of every nn.Module"),
    "state_dict_empty_name": (_state({"": torch.zeros(1)}), "not a dotted identifier"),
    "state_dict_int_name": (_state({3: torch.zeros(1)}), "not a string"),
    "state_dict_meta": (_state({"transformer.wte.weight": torch.empty(23, 8, device="meta")}), "meta"),
    "pickled_module_meta": (_pickled_meta, "meta device"),
    "state_dict_sparse": (_state({"transformer.wte.weight": torch.zeros(23, 8).to_sparse()}), "sparse"),
    "safetensors_declares_40gb": (_st_header({"w": {"dtype": "F32", "shape": [100_000, 100_000],
                                                    "data_offsets": [0, 40_000_000_000]}}, b"\0" * 16),
                                  "does not match the file"),
    "safetensors_offsets_lie": (_st_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}},
                                           b"\0" * 16), "does not match the file"),
    "safetensors_overlap": (_st_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
                            "overlap"),
    "safetensors_header_length_lies": (_st_header({"w": _FORWARD}, b"\0" * 4, length=1 << 60), "unknown format"),
    "safetensors_bad_dtype": (_st_header({"w": {"dtype": "X99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                              "malformed"),
    "dir_weights_lie": (_dir_weights({"lm_head.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                                                         "data_offsets": [0, 16]}}, b"\0" * 16),
                        "does not match the file"),
    "weight_missing": (_weights_edit(drop="transformer.h.0.ln_1.weight"), "lack weights"),
    "weight_unexpected": (_weights_edit(add="transformer.extra.weight"), "not in"),
    "index_outside_directory": (_index_outside, "same directory"),
    "fifo_weights": (_fifo_weights, "not a regular file"),
    "adapter_hub_base": (_adapter(base_model_name_or_path="openai-community/gpt2"), "base_model"),
    "adapter_huge_rank": (_adapter(r=1_000_000_000), "rank"),
    "adapter_backtracking_regex": (_adapter(target_modules="(.*)*x"), "nests quantifiers"),
    "adapter_layer_replication": (_adapter(layer_replication=[[0, 100000]]), "layer_replication"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_in_process(base: Path, tmp_path: Path, case: str) -> None:
    build, words = CASES[case]
    path, kwargs = build(base, tmp_path)
    with pytest.raises(InputError) as info:
        load_model(str(path), **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert words in message, message
    assert "\n" not in message and "\x1b" not in message


@pytest.mark.slow
@pytest.mark.parametrize("case", ["n_layer_200000", "architectures_tokenizer", "config_deep_json", "name_forward",
                                  "state_dict_meta", "safetensors_declares_40gb", "adapter_hub_base"])
def test_refused_by_the_cli(base: Path, tmp_path: Path, case: str) -> None:
    """Exit 2, one line, no traceback, within the timeout (a hang fails the test)."""
    build, words = CASES[case]
    path, kwargs = build(base, tmp_path)
    args = [sys.executable, "-m", "basins.cli", "hessian", str(path), "--data", str(base / "tokens.pt"),
            "-k", "1", "--json", "-q"]
    if "arch" in kwargs:
        args += ["--arch", str(kwargs["arch"])]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert r.stdout == ""
