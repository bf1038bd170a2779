"""Tiny models and data factories for tests, importable as ``tests.models:<name>``.

Use them as ``--arch tests.models:mlp`` or ``--data tests.models:classification_data`` (run from
the repository root, or with it on ``PYTHONPATH``). Every factory is deterministic: models are
initialised under a forked RNG with a fixed seed, data come from a private generator.

Models (all in eval mode once loaded; shapes are per batch of ``b`` examples):

==========================  ====================  =================  =====================
factory                     input                 output             loss / targets
==========================  ====================  =================  =====================
``mlp``                     ``(b, 4)`` float32    ``(b, 3)`` logits  cross-entropy, int64
``cnn_bn``                  ``(b, 1, 8, 8)``      ``(b, 3)`` logits  cross-entropy, int64
``tanh_mlp_regression``     ``(b, 3)`` float32    ``(b, 2)``         mse, float32 ``(b, 2)``
==========================  ====================  =================  =====================
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "MLP_IN",
    "NUM_CLASSES",
    "mlp",
    "cnn_bn",
    "tanh_mlp_regression",
    "two_input_model",
    "classification_data",
    "image_data",
    "regression_data",
    "classification_numpy",
    "classification_dict",
    "classification_dataset",
    "classification_loader",
    "shuffled_loader",
    "random_data",
    "failing_factory",
    "not_data",
    "not_a_module",
]

MLP_IN = 4
NUM_CLASSES = 3


def _seeded_build(seed: int, build):  # type: ignore[no-untyped-def]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def mlp() -> nn.Module:
    """``4 → 8 → 3`` tanh MLP classifier, 67 parameters."""
    return _seeded_build(
        1, lambda: nn.Sequential(nn.Linear(MLP_IN, 8), nn.Tanh(), nn.Linear(8, NUM_CLASSES))
    )


def cnn_bn() -> nn.Module:
    """Conv(1→4, 3×3) + BatchNorm2d + ReLU + Linear on ``1×8×8`` images, 3 classes."""
    return _seeded_build(
        2,
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, NUM_CLASSES),
        ),
    )


def tanh_mlp_regression() -> nn.Module:
    """``3 → 8 → 2`` tanh MLP regressor, 50 parameters."""
    return _seeded_build(3, lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(MLP_IN, NUM_CLASSES)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + z


def two_input_model() -> nn.Module:
    """A model whose forward takes two tensors (basins refuses it: it calls ``model(x)``)."""
    return _seeded_build(4, _TwoInputs)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def classification_data(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``float32 (n, 4)``, targets ``int64 (n,)`` in ``{0, 1, 2}`` for :func:`mlp`."""
    g = _generator(10)
    inputs = torch.randn(n, MLP_IN, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return inputs, targets


def image_data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``float32 (n, 1, 8, 8)``, targets ``int64 (n,)`` for :func:`cnn_bn`."""
    g = _generator(11)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def regression_data(n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``float32 (n, 3)``, targets ``float32 (n, 2)`` for :func:`tanh_mlp_regression`."""
    g = _generator(12)
    inputs = torch.randn(n, 3, generator=g)
    targets = torch.stack([inputs[:, 0] * inputs[:, 1], torch.sin(inputs[:, 2])], dim=1)
    return inputs, targets + 0.05 * torch.randn(n, 2, generator=g)


def classification_numpy() -> tuple[np.ndarray, np.ndarray]:
    """:func:`classification_data` as NumPy arrays."""
    inputs, targets = classification_data()
    return inputs.numpy(), targets.numpy()


def classification_dict() -> dict[str, torch.Tensor]:
    """:func:`classification_data` as ``{"inputs", "targets"}``."""
    inputs, targets = classification_data()
    return {"inputs": inputs, "targets": targets}


class _PairDataset(Dataset):  # type: ignore[type-arg]
    """Map-style dataset yielding ``(x, int)`` pairs (targets as Python ints)."""

    def __init__(self) -> None:
        self.inputs, self.targets = classification_data()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs[index], int(self.targets[index])


def classification_dataset() -> Dataset:  # type: ignore[type-arg]
    """:func:`classification_data` as a map-style ``Dataset`` of ``(x, y)`` pairs."""
    return _PairDataset()


def classification_loader() -> DataLoader:  # type: ignore[type-arg]
    """:func:`classification_data` as an ordered ``DataLoader`` in batches of 7 (last one 6)."""
    return DataLoader(TensorDataset(*classification_data()), batch_size=7, shuffle=False)


def shuffled_loader() -> DataLoader:  # type: ignore[type-arg]
    """A shuffling ``DataLoader`` (basins refuses it: the order would change between runs)."""
    return DataLoader(TensorDataset(*classification_data()), batch_size=7, shuffle=True)


def random_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Draws from the *global* RNGs (torch and NumPy): reproducible only under a fixed seed."""
    inputs = torch.randn(10, MLP_IN) + torch.from_numpy(np.random.randn(10, MLP_IN)).float()
    return inputs, torch.randint(0, NUM_CLASSES, (10,))


def failing_factory() -> tuple[torch.Tensor, torch.Tensor]:
    """Raises, as a broken user factory would."""
    raise RuntimeError("boom: the dataset server is down")


def not_data() -> str:
    """Returns something that is not data."""
    return "not data"


def not_a_module() -> int:
    """An ``--arch`` factory that does not return an ``nn.Module``."""
    return 42
