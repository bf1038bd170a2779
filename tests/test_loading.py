"""Tests of basins.files.loading: every model/data format, every error path, bundles."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from basins.errors import InputError
from basins.files.loading import (
    BUNDLE_FORMAT,
    LoadedData,
    LoadedModel,
    import_object,
    load_bundle,
    load_data,
    load_model,
    resolve_inputs,
    save_bundle,
)
from tests import models


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _params_buffers(module: torch.nn.Module) -> tuple[dict, dict]:
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return params, buffers


def _reference_grad(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    module.zero_grad()
    torch.nn.functional.cross_entropy(module(x), y).backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters()}
    module.zero_grad()
    return grads


# ---------------------------------------------------------------------------------------------
# Models


def test_pt2_dynamic_batch(model_files):
    loaded = load_model(model_files.pt2)
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "export" and loaded.fixed_batch_size is None
    assert loaded.source == model_files.pt2 and loaded.sha256 == _sha(model_files.pt2)
    x = model_files.inputs
    for batch in (1, 3, 20):
        torch.testing.assert_close(loaded.module(x[:batch]), model_files.module(x[:batch]))


def test_pt2_fixed_batch_detected(model_files):
    loaded = load_model(model_files.pt2_fixed)
    assert loaded.fixed_batch_size == model_files.fixed_batch_size == 8
    x = model_files.inputs[:8]
    torch.testing.assert_close(loaded.module(x), model_files.module(x))


def test_pt2_recognised_by_content_not_extension(model_files, tmp_path):
    renamed = tmp_path / "weights.pt"
    shutil.copy(model_files.pt2, renamed)
    assert load_model(str(renamed)).kind == "export"
    state = tmp_path / "model.pt2"  # a state dict with a misleading name
    shutil.copy(model_files.state_dict, state)
    with pytest.raises(InputError, match=r"is a state dict"):
        load_model(str(state))


def test_functional_call_and_grad_on_pt2(model_files):
    module = load_model(model_files.pt2).module
    params, buffers = _params_buffers(module)
    x, y = model_files.inputs, model_files.targets

    def loss(p):
        return torch.nn.functional.cross_entropy(functional_call(module, (p, buffers), (x,)), y)

    torch.testing.assert_close(grad(loss)(params), _reference_grad(model_files.module, x, y))


def test_functional_call_on_batchnorm_exported_in_eval(cnn_bn_files):
    loaded = load_model(cnn_bn_files.pt2)
    module = loaded.module
    params, buffers = _params_buffers(module)
    assert "1.running_mean" in buffers
    x, y = cnn_bn_files.inputs, cnn_bn_files.targets
    out = functional_call(module, (params, buffers), (x,))
    torch.testing.assert_close(out, cnn_bn_files.module(x))  # running stats, not batch stats
    single = functional_call(module, (params, buffers), (x[:1],))
    torch.testing.assert_close(single, out[:1])  # an example's output ignores the rest of the batch

    def loss(p):
        return torch.nn.functional.cross_entropy(functional_call(module, (p, buffers), (x,)), y)

    torch.testing.assert_close(grad(loss)(params), _reference_grad(cnn_bn_files.module, x, y))
    after = dict(module.named_buffers())
    assert all(torch.equal(after[k], v) for k, v in buffers.items())


def test_batchnorm_exported_in_training_mode_runs_in_eval_mode(cnn_bn_files):
    module = load_model(cnn_bn_files.pt2_train).module
    before = {k: v.clone() for k, v in module.named_buffers()}
    x, y = cnn_bn_files.inputs, cnn_bn_files.targets
    torch.testing.assert_close(module(x), cnn_bn_files.module(x))
    assert all(torch.equal(v, before[k]) for k, v in module.named_buffers())  # no update
    params, buffers = _params_buffers(module)

    def loss(p):
        return torch.nn.functional.cross_entropy(functional_call(module, (p, buffers), (x,)), y)

    torch.testing.assert_close(grad(loss)(params), _reference_grad(cnn_bn_files.module, x, y))


def test_exported_module_eval_is_a_no_op_and_train_refused(model_files):
    module = load_model(model_files.pt2).module
    assert module.eval() is module and not module.training
    with pytest.raises(NotImplementedError, match="inference mode"):
        module.train()


def test_dropout_exported_in_training_mode_is_off(tmp_path, export_pt2):
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
    x = torch.randn(6, 4)
    path = export_pt2(net.train(), x[:2], tmp_path / "dropout.pt2")
    module = load_model(path).module
    torch.testing.assert_close(module(x), net.eval()(x))
    torch.testing.assert_close(module(x), module(x))


def test_pt2_with_two_inputs_refused(tmp_path):
    net = models.two_input_model().eval()
    x, z = torch.randn(2, 4), torch.randn(2, 3)
    torch.export.save(torch.export.export(net, (x, z)), str(tmp_path / "two.pt2"))
    with pytest.raises(InputError, match=r"takes 2 inputs \(x, z\).*one batch tensor"):
        load_model(str(tmp_path / "two.pt2"))


def test_state_dict_with_arch(model_files):
    loaded = load_model(model_files.state_dict, arch=model_files.arch)
    assert loaded.kind == "state_dict" and loaded.fixed_batch_size is None
    assert not loaded.module.training and loaded.sha256 == _sha(model_files.state_dict)
    x = model_files.inputs
    torch.testing.assert_close(loaded.module(x), model_files.module(x))


def test_state_dict_with_file_path_arch(model_files):
    arch = f"{Path(models.__file__).resolve()}:mlp"
    loaded = load_model(model_files.state_dict, arch=arch)
    torch.testing.assert_close(loaded.module(model_files.inputs), model_files.module(model_files.inputs))


def test_state_dict_without_arch(model_files):
    with pytest.raises(InputError, match=r"state_dict\.pt is a state dict \(4 tensors.*arch=\"module:factory\"") as info:
        load_model(model_files.state_dict)
    assert info.value.param == "arch"


def test_state_dict_not_fitting_arch(model_files):
    with pytest.raises(InputError, match=r"not fit the model built by arch tests\.models:cnn_bn") as info:
        load_model(model_files.state_dict, arch="tests.models:cnn_bn")
    assert info.value.param == "arch"


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("tests.models", r"not of the form module:attribute"),
        ("no_such_module_xyz:mlp", r"cannot import module 'no_such_module_xyz'"),
        ("tests.models:no_such_factory", r"has no attribute 'no_such_factory'"),
        ("tests.models:not_a_module", r"returned a int, not an nn.Module"),
        ("tests.models:MLP_IN", r"is a int, not a function"),
        ("tests.models:failing_factory", r"raised RuntimeError \(boom"),
        ("/no/such/file.py:mlp", r"Python file not found"),
    ],
)
def test_arch_errors(model_files, arch, message):
    with pytest.raises(InputError, match=message):
        load_model(model_files.state_dict, arch=arch)


def test_pickle_refused_without_trust(model_files):
    with pytest.raises(InputError, match=r"pickled Python object.*Sequential.*runs code from the file.*trust_pickle=True") as info:
        load_model(model_files.pickle)
    assert info.value.param == "trust_pickle"


def test_pickle_loaded_with_trust(model_files):
    loaded = load_model(model_files.pickle, trust_pickle=True)
    assert loaded.kind == "pickle" and not loaded.module.training
    torch.testing.assert_close(loaded.module(model_files.inputs), model_files.module(model_files.inputs))


def test_torchscript_refused(model_files):
    with pytest.raises(
        InputError,
        match=r"TorchScript.*torch\.func cannot differentiate.*torch\.export\.save\(torch\.export\.export\(model\.eval\(\), \(x\[:2\],\), dynamic_shapes=",
    ):
        load_model(model_files.torchscript)
    with pytest.raises(InputError, match="TorchScript"):
        load_model(model_files.torchscript, trust_pickle=True)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match=r"model file not found: .*nope\.pt2"):
        load_model(str(tmp_path / "nope.pt2"))
    with pytest.raises(InputError, match=r"is a directory, not a model file"):
        load_model(str(tmp_path))


def test_empty_and_garbage_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.pt is an empty file"):
        load_model(str(tmp_path / "empty.pt"))
    (tmp_path / "model.xyz").write_bytes(b"hello, I am not a model at all")
    with pytest.raises(InputError, match=r"model\.xyz is a file of unknown format \(starts with b'hello, I'\), not a model"):
        load_model(str(tmp_path / "model.xyz"))


def test_corrupt_zip(model_files, tmp_path):
    data = Path(model_files.pt2).read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.pt2 is a corrupt zip archive"):
        load_model(str(tmp_path / "cut.pt2"))


def test_unknown_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "thing.pt", "w") as archive:
        archive.writestr("readme.txt", "hi")
    with pytest.raises(InputError, match=r"a zip archive of unknown content \(members readme\.txt\)"):
        load_model(str(tmp_path / "thing.pt"))


def test_data_file_given_as_model(data_files):
    with pytest.raises(InputError, match=r"NumPy \.npz archive, which is data, not a model: pass it as data"):
        load_model(data_files.npz)
    with pytest.raises(InputError, match=r"is a data file .*pass it as data"):
        load_model(data_files.pt)


def test_torch_save_of_other_things(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(InputError, match=r"torch\.save file holding a list, not a model"):
        load_model(str(tmp_path / "list.pt"))


# ---------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize(
    "which",
    ["pt", "npz", "h5", "factory_tensors", "factory_numpy", "factory_dict", "factory_dataset",
     "factory_loader", "factory_file"],
)
def test_data_formats(data_files, which):
    spec = getattr(data_files, which)
    data = load_data(spec)
    assert isinstance(data, LoadedData) and data.source == spec
    assert data.inputs.dtype == torch.float32 and data.targets.dtype == torch.int64
    assert torch.equal(data.inputs, data_files.inputs)
    assert torch.equal(data.targets, data_files.targets)
    # the hash is of the content, so every format of the same data gives the same hash
    assert data.sha256 == load_data(data_files.npz).sha256


def test_float_targets_stay_float(regression_files, write_data, tmp_path):
    data = load_data(regression_files.npz)
    assert data.targets.dtype == torch.float32 and data.targets.shape == (20, 2)
    x, y = regression_files.inputs.double(), regression_files.targets.double()
    data64 = load_data(write_data(tmp_path / "d64.h5", x, y))
    assert data64.inputs.dtype == data64.targets.dtype == torch.float64


def test_int_targets_stay_int(write_data, tmp_path):
    x = torch.randn(5, 2)
    y = torch.tensor([0, 1, 2, 1, 0], dtype=torch.int32)
    assert load_data(write_data(tmp_path / "d.npz", x, y)).targets.dtype == torch.int32
    assert load_data(write_data(tmp_path / "d.pt", x, y.long())).targets.dtype == torch.int64


def test_max_samples_takes_the_first_examples(data_files):
    full = load_data(data_files.npz)
    for spec in (data_files.pt, data_files.npz, data_files.h5, data_files.factory_dataset,
                 data_files.factory_loader):
        part = load_data(spec, max_samples=9)
        assert torch.equal(part.inputs, full.inputs[:9]) and torch.equal(part.targets, full.targets[:9])
        assert part.sha256 != full.sha256
        assert part.sha256 == load_data(data_files.npz, max_samples=9).sha256
    assert load_data(data_files.npz, max_samples=1000).sha256 == full.sha256


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_max_samples_invalid(data_files, bad):
    with pytest.raises(InputError, match="max_samples must be a positive integer"):
        load_data(data_files.npz, max_samples=bad)


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".h5"])
def test_non_finite_data(write_data, tmp_path, suffix):
    x = torch.randn(6, 2)
    x[1, 0] = float("nan")
    x[4, 1] = float("inf")
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(InputError, match=r"non-finite values \(NaN or inf\) in the inputs of example 1: 2 in inputs among examples 0\.\.5; clean them"):
        load_data(write_data(tmp_path / f"nan{suffix}", x, y))
    yf = torch.zeros(6)
    yf[0] = float("-inf")
    with pytest.raises(InputError, match=r"1 in targets"):
        load_data(write_data(tmp_path / f"inf{suffix}", torch.randn(6, 2), yf))


def test_mismatched_and_empty_data(write_data, tmp_path):
    path = write_data(tmp_path / "bad.npz", torch.randn(5, 2), torch.zeros(4))
    with pytest.raises(InputError, match=r"bad\.npz: inputs have 5 examples but targets have 4"):
        load_data(path)
    path = write_data(tmp_path / "empty.pt", torch.randn(0, 2), torch.zeros(0))
    with pytest.raises(InputError, match=r"no examples \(n = 0\)"):
        load_data(path)
    path = write_data(tmp_path / "scalar.npz", np.float32(1.0), np.zeros(1))
    with pytest.raises(InputError, match="inputs is a scalar"):
        load_data(path)


def test_data_missing_keys(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(InputError, match=r"x\.npz is an \.npz with arrays \['x', 'y'\]; it needs arrays named inputs and targets"):
        load_data(str(tmp_path / "x.npz"))
    torch.save({"x": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(InputError, match=r"a dict with keys 'x'; data needs keys inputs and targets"):
        load_data(str(tmp_path / "x.pt"))
    import h5py

    with h5py.File(tmp_path / "x.h5", "w") as handle:
        handle.create_dataset("inputs", data=np.zeros((3, 2)))
        handle.create_dataset("labels", data=np.zeros(3))
    with pytest.raises(InputError, match=r"without a dataset named targets at its root \(found: inputs, labels\)"):
        load_data(str(tmp_path / "x.h5"))


def test_data_file_errors(tmp_path, model_files):
    with pytest.raises(InputError, match=r"data file not found: .*missing\.npz"):
        load_data(str(tmp_path / "missing.npz"))
    with pytest.raises(InputError, match=r"is a torch\.export archive \(\.pt2\), a model, not data"):
        load_data(model_files.pt2)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(InputError, match=r"single \.npy array"):
        load_data(str(tmp_path / "one.npy"))
    (tmp_path / "notes.txt").write_text("inputs, targets")
    with pytest.raises(InputError, match=r"notes\.txt is a file of unknown format .*not data basins can read: expected a \.pt"):
        load_data(str(tmp_path / "notes.txt"))
    with pytest.raises(InputError, match=r"holds pickled Python objects .*plain tensors"):
        load_data(model_files.pickle)
    np.savez(tmp_path / "obj.npz", inputs=np.array([{"a": 1}], dtype=object), targets=np.zeros(1))
    with pytest.raises(InputError, match=r"obj\.npz: cannot read the \.npz"):
        load_data(str(tmp_path / "obj.npz"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.models:shuffled_loader", r"the DataLoader shuffles.*shuffle=False"),
        ("tests.models:failing_factory", r"data factory tests\.models:failing_factory raised RuntimeError: boom"),
        ("tests.models:not_data", r"returned a str; expected \(inputs, targets\)"),
        ("tests.models:nope", r"has no attribute 'nope'"),
        ("no_such_module_xyz:data", r"cannot import module 'no_such_module_xyz'"),
    ],
)
def test_data_factory_errors(spec, message):
    with pytest.raises(InputError, match=message):
        load_data(spec)


def test_factory_seed_is_reproducible_and_restores_rngs():
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    expected_torch = torch.rand(1)
    expected_np = np.random.rand()
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    a = load_data("tests.models:random_data", seed=5)
    b = load_data("tests.models:random_data", seed=5)
    c = load_data("tests.models:random_data", seed=6)
    assert torch.equal(a.inputs, b.inputs) and a.sha256 == b.sha256
    assert not torch.equal(a.inputs, c.inputs)
    assert torch.equal(torch.rand(1), expected_torch) and np.random.rand() == expected_np


# ---------------------------------------------------------------------------------------------
# Bundles and resolution


def test_bundle_round_trip(model_files):
    bundle = load_bundle(model_files.bundle)
    assert bundle.loss == "cross-entropy" and bundle.meta == {"origin": "conftest"}
    assert bundle.model.kind == "bundle" and bundle.model.fixed_batch_size is None
    assert torch.equal(bundle.data.inputs, model_files.inputs)
    assert torch.equal(bundle.data.targets, model_files.targets)
    assert bundle.data.sha256 == load_data(model_files.bundle).sha256  # a bundle is also data
    x = model_files.inputs
    assert torch.equal(bundle.model.module(x), model_files.module(x))  # bit for bit


def test_bundle_is_plain_weights_only_content(model_files):
    raw = torch.load(model_files.bundle, weights_only=True)
    assert raw["format"] == BUNDLE_FORMAT and raw["version"] == 1
    assert raw["model"].dtype == torch.uint8 and raw["model"].ndim == 1
    embedded = raw["model"].numpy().tobytes()
    assert zipfile.is_zipfile(io.BytesIO(embedded))
    assert load_bundle(model_files.bundle).model.sha256 == hashlib.sha256(embedded).hexdigest()


def test_save_bundle_from_exported_program_and_same_bytes(model_files, tmp_path):
    program = torch.export.load(model_files.pt2)
    x, y = model_files.inputs, model_files.targets
    save_bundle(tmp_path / "a.pt", program, x, y, None, {"k": np.float32(0.5), "v": torch.__version__})
    save_bundle(tmp_path / "b.pt", program, x.numpy(), y.numpy(), None, {"k": 0.5, "v": str(torch.__version__)})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    bundle = load_bundle(str(tmp_path / "a.pt"))
    assert bundle.loss is None and bundle.meta == {"k": 0.5, "v": str(torch.__version__)}
    assert torch.equal(bundle.model.module(x), load_model(model_files.pt2).module(x))
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt"]  # no temporary files left


def test_save_bundle_with_static_batch_program(model_files, tmp_path):
    program = torch.export.load(model_files.pt2_fixed)
    save_bundle(tmp_path / "fixed.pt", program, model_files.inputs, model_files.targets, "cross-entropy")
    assert load_bundle(str(tmp_path / "fixed.pt")).model.fixed_batch_size == 8


def test_save_bundle_errors_leave_the_old_file(model_files, tmp_path):
    target = tmp_path / "keep.pt"
    target.write_bytes(b"old")
    x, y = model_files.inputs, model_files.targets
    with pytest.raises(InputError, match=r"bundle meta 'bad': dict is not allowed"):
        save_bundle(target, model_files.module, x, y, "mse", {"bad": {"nested": 1}})
    with pytest.raises(InputError, match="inputs have 20 examples but targets have 19"):
        save_bundle(target, model_files.module, x, y[:-1], "mse")
    with pytest.raises(InputError, match="cannot write"):
        save_bundle(tmp_path / "no" / "such" / "dir.pt", model_files.module, x, y, "mse")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["keep.pt"]


def test_save_bundle_restores_training_mode(tmp_path):
    net = models.cnn_bn().train()
    x, y = models.image_data()
    save_bundle(tmp_path / "bn.pt", net, x, y, "cross-entropy")
    assert net.training
    torch.testing.assert_close(load_bundle(str(tmp_path / "bn.pt")).model.module(x), net.eval()(x))


def test_bundle_of_a_newer_version_or_corrupt(model_files, tmp_path):
    raw = torch.load(model_files.bundle, weights_only=True)
    torch.save({**raw, "version": 2}, tmp_path / "v2.pt")
    with pytest.raises(InputError, match=r"bundle of version 2, newer than this basins reads \(1\); upgrade basins"):
        load_bundle(str(tmp_path / "v2.pt"))
    torch.save({**raw, "model": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"corrupt basins bundle \(model is not a uint8 byte tensor\)"):
        load_bundle(str(tmp_path / "bad.pt"))
    torch.save({**raw, "model": torch.zeros(10, dtype=torch.uint8)}, tmp_path / "junk.pt")
    with pytest.raises(InputError, match=r"junk.pt \(the bundle.s model\): not a readable zip archive"):
        load_bundle(str(tmp_path / "junk.pt"))


def test_load_bundle_of_other_files(model_files):
    with pytest.raises(InputError, match=r"dynamic\.pt2 is not a basins bundle \(it is a export model\)"):
        load_bundle(model_files.pt2)
    with pytest.raises(InputError, match=r"runs code from the file"):
        load_bundle(model_files.pickle)


def test_resolve_inputs_from_bundle(model_files, data_files):
    model, data, loss = resolve_inputs(model_files.bundle)
    assert model.kind == "bundle" and loss == "cross-entropy"
    assert torch.equal(data.inputs, model_files.inputs) and data.source == model_files.bundle
    _, data, loss = resolve_inputs(model_files.bundle, data=data_files.h5, loss="nll", max_samples=5)
    assert loss == "nll" and data.source == data_files.h5 and data.inputs.shape[0] == 5
    _, data, _ = resolve_inputs(model_files.bundle, max_samples=3)
    assert torch.equal(data.targets, model_files.targets[:3])


def test_resolve_inputs_needs_data_for_other_models(model_files, data_files):
    with pytest.raises(InputError, match=r"dynamic\.pt2 is a \.pt2 export, which holds no data: pass the data as data") as info:
        resolve_inputs(model_files.pt2)
    assert info.value.param == "data"
    model, data, loss = resolve_inputs(model_files.pt2, data=data_files.npz, max_samples=4)
    assert model.kind == "export" and loss is None and data.inputs.shape == (4, 4)
    model, _, loss = resolve_inputs(model_files.state_dict, data=data_files.pt, arch=model_files.arch, loss="mse")
    assert model.kind == "state_dict" and loss == "mse"


def test_import_object():
    assert import_object("tests.models:mlp") is models.mlp
    assert import_object("torch.nn:Linear") is torch.nn.Linear
    assert import_object("os.path:join") is os.path.join  # dotted module
    assert import_object("tests.models:mlp.__name__") == "mlp"  # dotted attribute
    from_file = import_object(f"{Path(models.__file__).resolve()}:NUM_CLASSES")
    assert from_file == 3
    with pytest.raises(InputError, match="not of the form module:attribute"):
        import_object("tests.models:")


def test_loader_messages_name_parameters_not_flags():
    """Every string the loaders can put in a message (not docstrings) names library parameters
    (``trust_pickle=True``, ``arch``), never a command-line flag: the CLI adds the flag from ``param``."""
    import ast
    import re

    import basins.files.loading as package

    folder = Path(package.__file__).parent
    flag = re.compile(r"(?<![\w-])--[a-z]")
    found = []
    for path in [*sorted(folder.glob("*.py")), folder.parent / "bounds.py", folder.parent / "hdf5.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = {id(body[0].value) for node in ast.walk(tree)
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and (body := node.body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)}
        found += [f"{path.name}:{node.lineno}: {node.value[:60]!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                  and flag.search(node.value)]
    assert not found, found
