"""The ``.pt2`` reader (``basins.files.loading.export_reader``, the only loader of untrusted archives)
against ``torch.export.load``.

For every model of a zoo, fixed and dynamic batch, the module read here and
``ExportedProgram.module()`` must have the same parameter, buffer and state-dict names in the same
order, and give bit-identical outputs and gradients (dynamic exports: at two batch sizes);
archives outside what the reader reads are refused with an ``InputError`` naming the item and
``trust_pickle`` (crafted archives: ``tests/test_hostile_inputs.py``).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from basins.errors import InputError
from basins.files.loading import load_model
from basins.files.loading.export_reader import read_export_archive


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class Attention(nn.Module):
    """Embedding (integer input), LayerNorm, SDPA, GELU, dropout; dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(11, 8), nn.Parameter(torch.randn(5, 8) * 0.1)
        self.norm, self.qkv, self.out = nn.LayerNorm(8), nn.Linear(8, 24), nn.Linear(8, 11)
        self.drop = nn.Dropout(0.1)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(self.emb(ids) + self.pos)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
        return {"logits": self.out(self.drop(nn.functional.gelu(a + h))), "hidden": h}


class Constants(nn.Module):
    """A tensor constant (lifted), a non-persistent buffer, tied weights, keyword-heavy ops,
    multi-output operators and a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight  # tied
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6), persistent=False)
        self.offset = torch.tensor([0.25, -0.5, 1.0, 0.0, 0.1, 0.2])  # a plain tensor attribute: a constant

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.a(x) * self.scale + self.offset)
        top, _ = torch.max(h, dim=1, keepdim=True)
        var, mean = torch.var_mean(h, dim=1, keepdim=True, correction=0)
        parts = torch.split(self.b(h), 2, dim=1)
        idx = torch.arange(x.shape[1], dtype=torch.float32, device=x.device)
        z = torch.cat([p.sum(dim=1, keepdim=True) for p in parts], dim=1).to(dtype=torch.float32)
        return z + top + mean / (var + 1.0), h.sum(dim=-1) + idx.mean()


class Recurrent(nn.Module):
    """A two-layer LSTM and a multi-head attention (list arguments, several outputs, a weights output)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True, num_layers=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x)
        a, w = self.attn(h, h, h)
        return self.head(a[:, -1]) + w.mean()


class Signal(nn.Module):
    """Conv1d, transposed conv, group/instance norm, interpolation, reflect padding, top-k, sort,
    unbind, where, einsum, integer division: operators with string, float-list and None arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.up = nn.Conv1d(3, 4, 3, padding=1), nn.ConvTranspose1d(4, 2, 3, stride=2)
        self.group, self.inst = nn.GroupNorm(2, 4), nn.InstanceNorm1d(2, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inst(self.up(self.group(self.conv(nn.functional.pad(x, (1, 1), mode="reflect")))))
        h = nn.functional.interpolate(h, scale_factor=1.5, mode="linear")
        top, _ = torch.topk(h, 2, dim=-1)
        ordered, _ = torch.sort(h, dim=-1, descending=True)
        a, b = h.unbind(1)
        w = torch.where(h > 0, h, 0.1 * h)
        gram = torch.einsum("bij,bkj->bik", w, w).flatten(1)
        return gram + top.sum((1, 2))[:, None] + ordered[..., 0].mean(-1, keepdim=True) + a.mean() \
            + torch.div(b, 3, rounding_mode="floor").mean()


def _cases() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    conv = ConvBN()
    with torch.no_grad():  # running statistics that are not the initial ones
        conv.bn.running_mean.uniform_(-0.2, 0.2)
        conv.bn.running_var.uniform_(0.5, 1.5)
    return [
        ("mlp", nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)), torch.randn(9, 5)),
        ("conv-bn", conv, torch.randn(4, 3, 6, 6)),
        ("attention", Attention(), torch.randint(0, 11, (3, 5))),
        ("constants", Constants(), torch.randn(4, 6)),
        ("recurrent", Recurrent(), torch.randn(3, 5, 4)),
        ("signal", Signal(), torch.randn(2, 3, 8)),
        ("float64", nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 1)).double(),
         torch.randn(6, 3, dtype=torch.float64)),
    ]


CASES = _cases()
#: exported with a dynamic batch (torch.export.Dim), compared at the exported batch and at another one
DYNAMIC = {"mlp": 4, "conv-bn": 7, "attention": 1, "constants": 2, "signal": 5, "float64": 3}


def _read(path: str | bytes, source: str = "x") -> tuple[torch.fx.GraphModule, tuple[int | None, ...]]:
    read = read_export_archive(path, source)
    return read.module, read.input_shape


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pt2")
    out = {}
    for name, model, x in CASES:
        path = str(folder / f"{name}.pt2")
        torch.export.save(torch.export.export(model.eval(), (x,)), path)
        out[name] = path
        if name in DYNAMIC:
            path = str(folder / f"{name}-dynamic.pt2")
            batch = torch.export.Dim("batch", min=1, max=64)
            torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=({0: batch},)), path)
            out[f"{name}-dynamic"] = path
    return out


def _leaves(output: object) -> list[torch.Tensor]:
    return list(torch.utils._pytree.tree_leaves(output))


def _same_outputs_and_gradients(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    out_ours, out_theirs = ours(x), theirs(x)
    assert torch.utils._pytree.tree_structure(out_ours) == torch.utils._pytree.tree_structure(out_theirs)
    for a, b in zip(_leaves(out_ours), _leaves(out_theirs)):
        assert torch.equal(a, b)
    # gradients through both, bit for bit
    loss_o = sum(t.float().square().sum() for t in _leaves(out_ours) if t.is_floating_point())
    loss_t = sum(t.float().square().sum() for t in _leaves(out_theirs) if t.is_floating_point())
    g_o = torch.autograd.grad(loss_o, list(ours.parameters()), allow_unused=True)  # (a tied weight is unused)
    g_t = torch.autograd.grad(loss_t, list(theirs.parameters()), allow_unused=True)
    assert len(g_o) == len(g_t)
    for a, b in zip(g_o, g_t):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("case", [c[0] for c in CASES] + [f"{c}-dynamic" for c in DYNAMIC])
def test_reader_equals_torch_export_load(case: str, archives: dict[str, str]) -> None:
    base = case.removesuffix("-dynamic")
    _, _, x = next(c for c in CASES if c[0] == base)
    ours, shape = _read(archives[case], archives[case])
    theirs = torch.export.load(archives[case]).module()
    if case.endswith("-dynamic"):
        assert shape == (None, *x.shape[1:])
        other = torch.cat([x] * 8)[: DYNAMIC[base]]  # another batch size, same kind of values
        _same_outputs_and_gradients(ours, theirs, other)
    else:
        assert shape == tuple(x.shape)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (_, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
        assert a.requires_grad == b.requires_grad
    _same_outputs_and_gradients(ours, theirs, x)


def test_reader_refuses_other_input_shapes(archives: dict[str, str]) -> None:
    module, _ = _read(archives["mlp"], "mlp")
    with pytest.raises(RuntimeError, match=r"shape \[9, 5\], got \[4, 5\]"):
        module(torch.randn(4, 5))
    dynamic, _ = _read(archives["mlp-dynamic"], "mlp")
    with pytest.raises(RuntimeError, match=r"shape \[\*, 5\], got \[4, 6\]"):
        dynamic(torch.randn(4, 6))
    with pytest.raises(RuntimeError, match=r"size 0 in \[1, 64\]"):
        dynamic(torch.randn(65, 5))


def test_load_model_uses_the_reader_and_matches(archives: dict[str, str]) -> None:
    """load_model's module (reader path) gives what the torch.export path gave: same inference-mode
    outputs, the static batch size, and num_batches_tracked dropped from the graph."""
    loaded = load_model(archives["conv-bn"])
    assert loaded.kind == "export" and loaded.fixed_batch_size == 4
    assert not any(n.op == "call_function" and "add_" in str(n.target) for n in loaded.module.graph.nodes)
    x = CASES[1][2]
    assert torch.equal(loaded.module(x), torch.export.load(archives["conv-bn"]).module()(x))


class SizeArithmetic(nn.Module):
    """Python arithmetic on the batch size (floordiv, add, mul nodes in the exported graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.lin(x).reshape(n * 2, -1).sum(1) * (n // 2 + 1)


def test_dynamic_batch_with_size_arithmetic(tmp_path: pytest.TempPathFactory) -> None:
    """A dynamic batch with size arithmetic is read here (checked integer functions), equal to
    torch's module at two batch sizes; load_model gives no fixed batch size."""
    model, x = SizeArithmetic(), torch.randn(6, 4)
    path = str(tmp_path / "dynamic.pt2")
    batch = torch.export.Dim("batch", min=2, max=64)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), path)
    ours, shape = _read(path)
    assert shape == (None, 4)
    assert {n.target.__name__ for n in ours.graph.nodes if n.op == "call_function" and callable(n.target)
            and not isinstance(n.target, torch._ops.OpOverload)} >= {"size_floordiv", "size_add", "size_mul"}
    theirs = torch.export.load(path).module()
    for n in (6, 11):
        _same_outputs_and_gradients(ours, theirs, torch.randn(n, 4))
    loaded = load_model(path)
    assert loaded.fixed_batch_size is None
    assert torch.equal(loaded.module(x[:5]), model(x[:5]))



def test_training_mode_export_reads_the_same_way(tmp_path: pytest.TempPathFactory) -> None:
    """A batch-norm exported in training mode (in-place running-statistics updates in the graph)
    is read here, and load_model's inference rewrite gives what it gives on torch.export.load's module."""
    from basins.files.loading.exports import _prepare_exported

    torch.manual_seed(1)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    x = torch.randn(8, 3)
    training = str(tmp_path / "training.pt2")
    torch.export.save(torch.export.export(bn, (x,)), training)
    ours = load_model(training).module
    theirs, fixed = _prepare_exported(torch.export.load(training), training)
    assert fixed == 8
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours(x), bn.eval()(x))


def test_malformed_archives_are_refused(tmp_path: pytest.TempPathFactory, archives: dict[str, str]) -> None:
    """Missing members, a schema from another major version, a pickled payload, a non-aten
    operator or a bad CRC: refused, naming the item and trust_pickle, never guessed."""
    source = archives["mlp"]
    with zipfile.ZipFile(source) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    model_json = next(n for n in members if n.endswith("models/model.json"))

    def rewrite(name: str, edit: dict[str, bytes | None]) -> str:
        path = str(tmp_path / name)
        with zipfile.ZipFile(path, "w") as zf:
            for member, data in members.items():
                data = edit.get(member, data)
                if data is not None:
                    zf.writestr(member, data)
        return path

    def refused(archive: str | bytes, words: str, hint: bool = True) -> None:
        with pytest.raises(InputError, match=words) as info:
            read_export_archive(archive, "x")
        assert ("trust_pickle=True" in str(info.value)) == hint and "\n" not in str(info.value)
        assert (info.value.param == "trust_pickle") == hint

    text = members[model_json].decode()
    refused(rewrite("no-json.pt2", {model_json: None}), "0 models")
    refused(rewrite("schema.pt2", {model_json: text.replace('"major": 8', '"major": 99').encode()}), "schema version 99")
    refused(rewrite("op.pt2", {model_json: text.replace("torch.ops.aten.tanh.default", "torch.ops.mylib.tanh.default").encode()}),
            "mylib.tanh.default.* not an aten or prims operator")
    config = next(n for n in members if n.endswith("model_weights_config.json"))
    refused(rewrite("pickle.pt2", {config: members[config].replace(b'"use_pickle": false', b'"use_pickle": true', 1)}), "pickled")
    refused(b"not a zip", "not a readable zip", hint=False)
    weights = next(n for n in members if n.endswith("data/weights/weight_0"))
    stored = rewrite("stored.pt2", {})
    data = bytearray(open(stored, "rb").read())
    at = data.find(members[weights][:64])
    assert at > 0
    data[at + 5] ^= 0xFF  # one flipped byte in a weight: the member's CRC no longer matches
    refused(bytes(data), "weight_0.* damaged .*CRC", hint=False)  # (a damaged file: trusting it would not help)


def test_reading_a_pt2_does_not_import_dynamo(archives: dict[str, str]) -> None:
    """Loading a dynamic-batch .pt2 and taking a gradient leave torch._dynamo, sympy and the
    export serialiser unimported (each costs about a second and tens of MiB per process)."""
    code = (
        "import sys, torch\n"
        "from basins.files.loading import load_model\n"
        f"m = load_model({archives['conv-bn-dynamic']!r}).module\n"
        "x = torch.randn(3, 3, 6, 6)\n"
        "torch.autograd.grad(m(x).sum(), list(m.parameters()))\n"
        "print(sorted(k for k in ('torch._dynamo', 'torch._export.serde.serialize', 'sympy') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_reader_reads_an_exported_gpt2(attn: str, tmp_path: pytest.TempPathFactory) -> None:
    """A Hugging Face GPT-2 (tiny, local config, float64) exported whole with a dynamic batch: read
    here, and equal to torch.export.load's module bit for bit, outputs and gradients, at two batch sizes."""
    pytest.importorskip("transformers")
    from tests.hf_models import tiny_gpt2

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=ids).logits

    ids = torch.randint(0, 23, (3, 12), generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "gpt2.pt2")
    batch = torch.export.Dim("batch", min=1, max=32)
    torch.export.save(torch.export.export(Logits(tiny_gpt2(attn)).eval(), (ids,), dynamic_shapes=({0: batch},)), path)
    ours, shape = _read(path, path)
    assert shape == (None, 12)
    theirs = torch.export.load(path).module()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for n in (3, 5):
        _same_outputs_and_gradients(ours, theirs, torch.randint(0, 23, (n, 12), generator=torch.Generator().manual_seed(n)))


def test_reader_reads_a_core_aten_export(tmp_path: pytest.TempPathFactory) -> None:
    """After ``run_decompositions()`` (core ATen: convolution, ``_native_batch_norm_legit_no_training``
    with three outputs, ``max_pool2d_with_indices``, addmm): read here, equal to torch's module."""
    model, x = ConvBN().eval(), torch.randn(4, 3, 6, 6)
    path = str(tmp_path / "core.pt2")
    torch.export.save(torch.export.export(model, (x,)).run_decompositions(), path)
    ours, _ = _read(path, path)
    ops = {str(n.target) for n in ours.graph.nodes if n.op == "call_function"}
    assert "aten._native_batch_norm_legit_no_training.default" in ops
    assert torch.equal(ours(x), torch.export.load(path).module()(x))
    assert torch.equal(load_model(path).module(x), model(x))


def test_weights_saved_from_a_gpu_are_read_onto_the_cpu(tmp_path: pytest.TempPathFactory, archives: dict[str, str]) -> None:
    """An archive whose payloads say ``cuda`` (exported on a GPU) is read, its weights on the CPU."""
    with zipfile.ZipFile(archives["mlp-dynamic"]) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    config = next(n for n in members if n.endswith("model_weights_config.json"))
    members[config] = members[config].replace(b'"type": "cpu"', b'"type": "cuda"')
    path = str(tmp_path / "gpu.pt2")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    ours, _ = _read(path)
    theirs, _ = _read(archives["mlp-dynamic"])
    assert all(p.device.type == "cpu" for p in ours.parameters())
    x = CASES[0][2]
    assert torch.equal(ours(x), theirs(x))


def test_dynamic_batch_export_takes_one_example_and_equals_the_fixed_export(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """torch.export makes every dynamic dimension at least 2; the reader pads a smaller batch by
    repeating its first example and cuts the outputs back, so one-example pieces (route timing,
    the dtype audit, a chunk's remainder) work, and every command gives the fixed export's numbers."""
    import json

    from click.testing import CliRunner

    from basins.cli.main import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    x, y = torch.randn(11, 5), torch.randint(0, 3, (11,))
    batch = torch.export.Dim("batch", min=2, max=4096)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), tmp_path / "dyn.pt2")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "fixed.pt2")
    torch.save({"inputs": x, "targets": y}, tmp_path / "d.pt")
    module = load_model(str(tmp_path / "dyn.pt2")).module
    with torch.no_grad():
        # padded to 2 rows, cut back to 1 (equal to BLAS rounding: a 2-row product may round otherwise)
        torch.testing.assert_close(module(x[:1]), model(x[:1]), rtol=1e-6, atol=1e-7)
        assert module(x[:1]).shape == (1, 3)
        assert torch.equal(module(x[:3]), model(x[:3]))
    out = {}
    for name in ("dyn", "fixed"):
        r = CliRunner().invoke(main, ["hessian", str(tmp_path / f"{name}.pt2"), "--data", str(tmp_path / "d.pt"),
                                      "-k", "3", "--batch-size", "5", "--hvp", "fwd-rev", "--json", "-q"])
        assert r.exit_code == 0, r.output
        out[name] = json.loads(r.stdout)
    # chunks of 5, 5 and 1 example for the dynamic export; the fixed one takes the whole batch
    assert out["dyn"]["eigenvalues"] == pytest.approx(out["fixed"]["eigenvalues"], rel=1e-5)


def test_hessian_on_a_pt2_imports_no_dynamo(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The whole `basins hessian` run on a fixed-batch .pt2 (route choice, Lanczos, the dtype audit,
    the rounding checks) leaves torch._dynamo and sympy unimported: each costs about a second and
    tens of MiB per process (a dispatch-mode dtype audit once imported torch._dynamo)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    torch.save({"inputs": x, "targets": y}, tmp_path / "d.pt")
    code = (
        "import sys\n"
        "from basins.cli.main import main\n"
        f"try:\n    main(['hessian', {str(tmp_path / 'm.pt2')!r}, '--data', {str(tmp_path / 'd.pt')!r}, '-k', '2', '-q'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules), file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr


def test_attention_with_dropout_is_refused(tmp_path: Path) -> None:
    """An attention call whose dropout probability is not 0 draws random numbers on every call (it
    ignores eval mode): refused, naming the operator and p; with p = 0 it is read."""

    class Attention(nn.Module):
        def __init__(self, p: float) -> None:
            super().__init__()
            self.p, self.qkv = p, nn.Linear(4, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.p).flatten(1)

    x = torch.randn(3, 2, 4)
    for p in (0.0, 0.5):
        path = str(tmp_path / f"attention_{p}.pt2")
        torch.export.save(torch.export.export(Attention(p).eval(), (x,)), path)
        if p:
            with pytest.raises(InputError, match=r"scaled_dot_product_attention applies dropout \(p=0\.5\)") as info:
                read_export_archive(path, path)
            assert info.value.param == "trust_pickle"
        else:
            assert read_export_archive(path, path).module(x).shape == (3, 8)
