"""Loading walks forward: sniff once, check once, one loader per format, wrap; no module entered twice.

One load per format is traced with ``sys.setprofile``. An *entry* is a call into a function of a
``basins.files.loading`` module whose nearest calling frame in that package is in another module
(calls inside a module, and callbacks that torch makes into a module, are not entries). The
sequence of entries must name each module once (``A B A`` is a module returned to after it was
left), start ``models > sniff > checks > <the table's loader for the format>``, and ``sniff`` must run
once. Models are tiny and built here (``tests.models:mlp``, a two-layer GPT-2 of
``tests.hf_models``); nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import Any

import pytest
import torch

import basins.files.loading as loading
from basins.errors import InputError
from basins.files.loading import load_data, load_model, open_data, resolve_inputs, save_bundle
from basins.files.loading.models import LOADERS
from tests import models

_PACKAGE = str(Path(loading.__file__).resolve().parent)


def _module(code: CodeType) -> str | None:
    """The loading module a code object belongs to (by its file), or None outside the package."""
    file = code.co_filename
    return Path(file).stem if file.startswith(_PACKAGE) else None


def walk(fn: Callable[[], Any]) -> tuple[list[str], int]:
    """The loading modules entered while ``fn()`` runs, in order, and how many times ``sniff.sniff`` ran."""
    entries: list[str] = []
    sniffs = 0

    def profile(frame: Any, event: str, _arg: Any) -> None:
        nonlocal sniffs
        if event != "call" or (module := _module(frame.f_code)) is None:
            return
        sniffs += module == "sniff" and frame.f_code.co_name == "sniff"
        back, caller = frame.f_back, None
        while back is not None and (caller := _module(back.f_code)) is None:
            back = back.f_back
        if caller != module:
            entries.append(module)

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entries, sniffs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{format: (path, load_model keyword arguments)}`` for tests.models:mlp in every file format."""
    root = tmp_path_factory.mktemp("walk")
    mlp = models.mlp().eval()
    x, y = models.classification_data()
    torch.save(mlp.state_dict(), root / "state_dict.pt")
    torch.save(mlp, root / "pickled.pt")
    dynamic = torch.export.export(mlp, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(dynamic, str(root / "dynamic.pt2"))
    torch.export.save(torch.export.export(mlp, (x[:8],)), str(root / "fixed.pt2"))
    save_bundle(root / "bundle.pt", mlp, x, y, "cross-entropy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated; that is the point
        torch.jit.save(torch.jit.script(mlp), str(root / "script.pt"))
    arch = {"arch": "tests.models:mlp"}
    return {
        "export-dynamic": (str(root / "dynamic.pt2"), {}),
        "export-fixed": (str(root / "fixed.pt2"), {}),
        "bundle": (str(root / "bundle.pt"), {}),
        "state_dict": (str(root / "state_dict.pt"), arch),
        "pickle": (str(root / "pickled.pt"), {"trust_pickle": True}),
        "torchscript": (str(root / "script.pt"), {}),
    }


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict[str, Any]]]:
    """A tiny GPT-2 directory, a LoRA adapter on it, and an mlp's weights as .safetensors."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file

    from tests.hf_models import tiny_gpt2

    root = tmp_path_factory.mktemp("walk_hf")
    save_file(models.mlp().state_dict(), str(root / "weights.safetensors"))
    tiny_gpt2().save_pretrained(str(root / "gpt2"))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    peft.get_peft_model(tiny_gpt2(), config).save_pretrained(str(root / "adapter"))
    adapter_config = root / "adapter" / "adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()),
                                          "base_model_name_or_path": str(root / "gpt2")}))
    return {
        "safetensors": (str(root / "weights.safetensors"), {"arch": "tests.models:mlp"}),
        "hf": (str(root / "gpt2"), {}),
        "peft": (str(root / "adapter"), {}),
    }


def _loader(tag: str) -> str:
    return LOADERS[tag].__module__.rsplit(".", 1)[1]


def _assert_forward(entries: list[str], sniffs: int, loader: str | None) -> None:
    again = [m for i, m in enumerate(entries) if m in entries[:i]]
    assert not again, f"re-entered {again}: {' > '.join(entries)}"
    assert sniffs == 1, f"sniff ran {sniffs} times"
    start = ["models", "sniff", "checks"] + ([loader] if loader else [])
    assert entries[: len(start)] == start, " > ".join(entries)


@pytest.mark.parametrize("case", ["export-dynamic", "export-fixed", "state_dict", "pickle"])
def test_one_load_walks_forward(files: dict[str, tuple[str, dict[str, Any]]], case: str) -> None:
    path, kwargs = files[case]
    loaded: list[Any] = []
    entries, sniffs = walk(lambda: loaded.append(load_model(path, **kwargs)))
    _assert_forward(entries, sniffs, _loader(loaded[0].kind))
    x, _ = models.classification_data()
    batch = x[:8]
    reference = models.mlp().eval()
    torch.testing.assert_close(loaded[0].module(batch), reference(batch))


def test_export_reader_resolves_operators_once(files: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """The archive reader hands every operator of the graph to the allowlist in one call."""
    entries, _ = walk(lambda: load_model(files["export-dynamic"][0]))
    assert entries[3:] == ["exports", "export_reader", "export_ops"], " > ".join(entries)


def test_bundle_with_its_data_walks_forward(files: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """``resolve_inputs`` of a bundle: the model, then its data and loss, each module entered once."""
    out: list[Any] = []
    entries, sniffs = walk(lambda: out.append(resolve_inputs(files["bundle"][0])))
    assert entries[0] == "__init__"
    _assert_forward(entries[1:], sniffs, _loader("bundle"))
    assert entries[-2:] == ["data", "imports"]
    model, data, loss = out[0]
    assert model.kind == "bundle" and data.num_examples == 20 and loss == "cross-entropy"


def test_refused_format_stops_at_the_checks(files: dict[str, tuple[str, dict[str, Any]]]) -> None:
    def load() -> None:
        with pytest.raises(InputError, match="TorchScript"):
            load_model(files["torchscript"][0])

    entries, sniffs = walk(load)
    assert entries == ["models", "sniff", "checks"] and sniffs == 1


def test_data_files_walk_forward(files: dict[str, tuple[str, dict[str, Any]]], data_files) -> None:  # type: ignore[no-untyped-def]
    """A data file is sniffed once and read by the data module (a bundle's layout checked on the way)."""
    for path, expected in [(data_files.pt, ["data", "sniff"]), (data_files.npz, ["data", "sniff"]),
                           (files["bundle"][0], ["data", "sniff", "checks"])]:
        for reader in (load_data, open_data):
            entries, sniffs = walk(lambda: reader(path))  # noqa: B023 - called at once
            assert entries == expected and sniffs == 1, (path, reader.__name__, entries)


@pytest.mark.slow  # (imports transformers and peft)
@pytest.mark.parametrize("case", ["safetensors", "hf", "peft"])
def test_weights_and_directories_walk_forward(hf_files: dict[str, tuple[str, dict[str, Any]]], case: str) -> None:
    path, kwargs = hf_files[case]
    loaded: list[Any] = []
    entries, sniffs = walk(lambda: loaded.append(load_model(path, **kwargs)))
    _assert_forward(entries, sniffs, _loader(case))
    if case == "peft":  # the adapter's loader builds its base model with the directory loader, once
        assert entries[3:] == ["adapters", "hf"], " > ".join(entries)
        assert loaded[0].kind == "peft" and loaded[0].base_model == str(Path(path).parent / "gpt2")


def test_the_table_has_one_loader_module_per_kind_of_file() -> None:
    assert set(LOADERS) == {"export", "bundle", "state_dict", "safetensors", "hf", "peft", "pickle"}
    for tag, build in LOADERS.items():
        assert build.__name__ == "build" and build.__module__.startswith("basins.files.loading."), tag
    assert _loader("export") == _loader("bundle") == "exports"
    assert _loader("state_dict") == _loader("safetensors") == "arch"
