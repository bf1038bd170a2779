"""Shared fixtures: tiny models and datasets saved in every input format basins reads.

The files are written once per test session into a temporary folder and shared: treat them as
read-only (copy one into ``tmp_path`` before changing it). Models and data come from
``tests/models.py`` (see its table), so ``--arch``/``--data`` specs such as
``tests.models:mlp`` work in CLI tests run from the repository root.

Fixtures (each returns a frozen dataclass of paths and reference tensors):

``model_files``
    ``tests.models:mlp`` (4 → 8 → 3 tanh, 67 parameters) with ``classification_data()``
    (20 examples, int64 labels) as ``.pt2`` with a dynamic batch dimension, ``.pt2`` with a
    static batch of 8, state dict (+ ``arch``), pickled module, TorchScript, and a bundle
    (loss ``cross-entropy``, ``meta={"origin": "conftest"}``).
``data_files``
    ``classification_data()`` as ``.pt``, ``.npz`` and ``.h5``, plus ``module:factory`` specs
    for tensors, NumPy arrays, a dict, a ``Dataset``, a ``DataLoader`` and a ``.py`` file path.
``cnn_bn_files``
    ``tests.models:cnn_bn`` (conv + BatchNorm2d, with non-trivial running statistics) and
    ``image_data()``, exported in eval mode and, separately, in training mode.
``regression_files``
    ``tests.models:tanh_mlp_regression`` with ``regression_data()`` (float32 targets): ``.pt2``,
    ``.npz`` and a bundle with loss ``mse``.
``write_data``
    ``write_data(path, inputs, targets)`` saves data in the format named by the suffix
    (``.pt``, ``.npz``, ``.h5``) and returns the path as ``str``; for ad-hoc bad data.
``export_pt2``
    ``export_pt2(module, example, path, dynamic=True)`` exports (eval mode unless the module is
    in training mode) and saves a ``.pt2``; returns the path as ``str``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # so that `tests.models` imports under a bare `pytest` too
    sys.path.insert(0, _ROOT)

from tests import models  # noqa: E402

MLP_ARCH = "tests.models:mlp"
FIXED_BATCH = 8


def _export(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> str:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return str(path)


def _write_data(path: str | Path, inputs: object, targets: object) -> str:
    path = Path(path)
    x = inputs.numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
    y = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if path.suffix == ".pt":
        torch.save({"inputs": torch.as_tensor(x), "targets": torch.as_tensor(y)}, path)
    elif path.suffix == ".npz":
        np.savez(path, inputs=x, targets=y)
    elif path.suffix in (".h5", ".hdf5"):
        with h5py.File(path, "w") as handle:
            handle.create_dataset("inputs", data=x)
            handle.create_dataset("targets", data=y)
    else:
        raise ValueError(f"write_data: unknown suffix {path.suffix!r}")
    return str(path)


@dataclass(frozen=True)
class ModelFiles:
    """``tests.models:mlp`` in every model format; ``module`` is the reference (eval mode)."""

    module: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    arch: str
    pt2: str
    pt2_fixed: str
    fixed_batch_size: int
    state_dict: str
    pickle: str
    torchscript: str
    bundle: str


@dataclass(frozen=True)
class DataFiles:
    """``classification_data()`` in every data format and as factory specs."""

    inputs: torch.Tensor
    targets: torch.Tensor
    pt: str
    npz: str
    h5: str
    factory_tensors: str
    factory_numpy: str
    factory_dict: str
    factory_dataset: str
    factory_loader: str
    factory_file: str  # "path/to/tests/models.py:classification_data"


@dataclass(frozen=True)
class CnnBnFiles:
    """``tests.models:cnn_bn`` (BatchNorm2d with trained running statistics) and its data."""

    module: nn.Module  # eval mode
    inputs: torch.Tensor
    targets: torch.Tensor
    pt2: str  # exported in eval mode, dynamic batch
    pt2_train: str  # exported in training mode, dynamic batch


@dataclass(frozen=True)
class RegressionFiles:
    """``tests.models:tanh_mlp_regression`` with float targets."""

    module: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    pt2: str
    npz: str
    bundle: str


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Run the suite on one intra-op thread: the test problems are tiny, and on a 2-core machine
    shared with other processes two OpenMP threads made them 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    from basins.files.loading import save_bundle

    folder = tmp_path_factory.mktemp("models")
    module = models.mlp().eval()
    inputs, targets = models.classification_data()
    torch.save(module.state_dict(), folder / "state_dict.pt")
    torch.save(module, folder / "pickled.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated; that is the point
        torch.jit.save(torch.jit.script(module), str(folder / "script.pt"))
    save_bundle(folder / "bundle.pt", module, inputs, targets, "cross-entropy",
                {"origin": "conftest"})
    return ModelFiles(
        module=module,
        inputs=inputs,
        targets=targets,
        arch=MLP_ARCH,
        pt2=_export(module, inputs[:2], folder / "dynamic.pt2"),
        pt2_fixed=_export(module, inputs[:FIXED_BATCH], folder / "fixed.pt2", dynamic=False),
        fixed_batch_size=FIXED_BATCH,
        state_dict=str(folder / "state_dict.pt"),
        pickle=str(folder / "pickled.pt"),
        torchscript=str(folder / "script.pt"),
        bundle=str(folder / "bundle.pt"),
    )


@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> DataFiles:
    folder = tmp_path_factory.mktemp("data")
    inputs, targets = models.classification_data()
    models_py = Path(models.__file__).resolve()
    return DataFiles(
        inputs=inputs,
        targets=targets,
        pt=_write_data(folder / "data.pt", inputs, targets),
        npz=_write_data(folder / "data.npz", inputs, targets),
        h5=_write_data(folder / "data.h5", inputs, targets),
        factory_tensors="tests.models:classification_data",
        factory_numpy="tests.models:classification_numpy",
        factory_dict="tests.models:classification_dict",
        factory_dataset="tests.models:classification_dataset",
        factory_loader="tests.models:classification_loader",
        factory_file=f"{models_py}:classification_data",
    )


@pytest.fixture(scope="session")
def cnn_bn_files(tmp_path_factory: pytest.TempPathFactory) -> CnnBnFiles:
    folder = tmp_path_factory.mktemp("cnn_bn")
    module = models.cnn_bn()
    inputs, targets = models.image_data()
    module.train()
    with torch.no_grad():  # give BatchNorm running statistics that differ from batch statistics
        for _ in range(3):
            module(2.0 * inputs + 1.0)
    pt2_train = _export(module, inputs[:2], folder / "cnn_bn_train.pt2")
    module.eval()
    pt2 = _export(module, inputs[:2], folder / "cnn_bn.pt2")
    return CnnBnFiles(module, inputs, targets, pt2, pt2_train)


@pytest.fixture(scope="session")
def regression_files(tmp_path_factory: pytest.TempPathFactory) -> RegressionFiles:
    from basins.files.loading import save_bundle

    folder = tmp_path_factory.mktemp("regression")
    module = models.tanh_mlp_regression().eval()
    inputs, targets = models.regression_data()
    save_bundle(folder / "bundle.pt", module, inputs, targets, "mse")
    return RegressionFiles(
        module=module,
        inputs=inputs,
        targets=targets,
        pt2=_export(module, inputs[:2], folder / "regression.pt2"),
        npz=_write_data(folder / "regression.npz", inputs, targets),
        bundle=str(folder / "bundle.pt"),
    )


@pytest.fixture
def write_data() -> Callable[[str | Path, object, object], str]:
    """``write_data(path, inputs, targets) -> str``: save data by suffix (.pt/.npz/.h5)."""
    return _write_data


@pytest.fixture
def export_pt2() -> Callable[..., str]:
    """``export_pt2(module, example, path, dynamic=True) -> str``: torch.export + save."""
    return _export
