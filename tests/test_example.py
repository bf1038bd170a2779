"""Tests of basins.files.example: the shipped dataset and the trained example bundle."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from basins.errors import InputError
from basins.files.example import EXAMPLE_LOSS, load_example_data, make_example
from basins.files.loading import load_bundle

ROOT = Path(__file__).resolve().parent.parent
GRAD_TOL = 1e-3  # the CLI warns above this (cli/common.py CRITICAL_GRAD_TOL)


@dataclass(frozen=True)
class Built:
    path: str
    rng_restored: bool
    threads_restored: bool
    deterministic_restored: bool


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    path = make_example(str(tmp_path_factory.mktemp("example") / "out"), seed=0)
    return Built(
        path,
        torch.equal(rng, torch.get_rng_state()),
        threads == torch.get_num_threads(),
        deterministic == torch.are_deterministic_algorithms_enabled(),
    )


def _generator_module():  # data/make_example_data.py, imported from its path
    spec = importlib.util.spec_from_file_location("make_example_data", ROOT / "data" / "make_example_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_data_is_what_the_generator_writes():
    generator = _generator_module()
    inputs, targets = generator.make_arrays()
    shipped = (ROOT / "basins" / "data" / "example.npz").read_bytes()
    assert generator.npz_bytes({"inputs": inputs, "targets": targets}) == shipped
    x, y = load_example_data()  # through importlib.resources
    assert torch.equal(x, torch.from_numpy(inputs)) and torch.equal(y, torch.from_numpy(targets))


def test_example_data_shape():
    x, y = load_example_data()
    assert x.shape == (1500, 2) and x.dtype == torch.float32
    assert y.shape == (1500, 3) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(dim=1), torch.ones(1500))
    assert float(y.min()) > 0  # soft targets: the cross-entropy has a finite minimum


def test_example_bundle(built):
    assert built.path.endswith("out/model.pt")
    bundle = load_bundle(built.path)
    assert bundle.model.kind == "bundle" and bundle.model.fixed_batch_size is None
    assert bundle.loss == EXAMPLE_LOSS == "cross-entropy"
    num_params = sum(p.numel() for p in bundle.model.module.parameters())
    assert 2000 <= num_params <= 5000 and bundle.meta["num_params"] == num_params
    assert bundle.data.inputs.shape[0] >= 1000 and bundle.meta["num_samples"] == 1500
    assert bundle.meta["seed"] == 0 and bundle.meta["torch_version"] == str(torch.__version__)
    x, y = load_example_data()
    assert torch.equal(bundle.data.inputs, x) and torch.equal(bundle.data.targets, y)


def test_example_is_trained_to_a_minimum(built):
    bundle = load_bundle(built.path)
    module, x, y = bundle.model.module, bundle.data.inputs, bundle.data.targets
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p):
        return F.cross_entropy(functional_call(module, p, (x,)), y)

    value = float(loss(params))
    norm = float(torch.cat([g.reshape(-1) for g in grad(loss)(params).values()]).norm())
    accuracy = float((module(x).argmax(1) == y.argmax(1)).double().mean())
    assert accuracy >= 0.97 and accuracy == pytest.approx(bundle.meta["train_accuracy"])
    assert norm <= GRAD_TOL and norm == pytest.approx(bundle.meta["grad_norm"], rel=1e-3)
    assert value == pytest.approx(bundle.meta["train_loss"], rel=1e-6)
    assert 0 <= value - bundle.meta["target_entropy"] < 2e-3  # close to the best possible loss
    assert bundle.meta["initial_grad_norm"] > 100 * norm


def test_make_example_restores_global_state(built):
    assert built.rng_restored and built.threads_restored and built.deterministic_restored


@pytest.mark.slow
def test_example_is_reproducible(built, tmp_path):
    # Same seed, same torch, same machine: byte-identical bundle (torch.save to a buffer and
    # torch.export.save write no timestamps or random ids, only content).
    again = make_example(str(tmp_path), seed=0)
    digest = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (built.path, again)]
    assert digest[0] == digest[1]


def test_make_example_into_a_file_fails(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(InputError, match="cannot create"):
        make_example(str(tmp_path / "taken"))
