"""The engine's pieces after the split: one memory budget, one validation of tensors, the
per-process shard, and the collectives a Problem offers to analyses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from basins import InputError, Problem
from basins.engine import data as engine_data
from basins.engine.data import TensorData
from basins.engine.memory import memory_budget, process_memory_bytes
from basins.files.loading import LoadedData, shard_for_process


def _regression(n: int = 12) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    return model, torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)


def test_memory_budget_is_shared_by_the_processes_of_a_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = process_memory_bytes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert process_memory_bytes() == alone // 4
    assert memory_budget() == int(alone // 4 * 0.25)
    assert memory_budget(12345) == 12345
    with pytest.raises(InputError, match="memory_bytes must be ≥ 0"):
        memory_budget(-1)


def test_tensors_are_validated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = engine_data.check_finite

    def counting(*args: object, **kwargs: object) -> None:
        calls.append(1)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_data, "check_finite", counting)
    model, x, y = _regression()
    loaded = LoadedData(x, y, "mem")
    assert len(calls) == 1
    p = Problem(model, loaded, None, "mse", hvp_route="rev-rev")  # a DataSource: not checked again
    p.loss()
    p.hvp(torch.ones(p.num_params, dtype=torch.float64))
    assert len(calls) == 1
    Problem(model, x, y, "mse", hvp_route="rev-rev")  # tensors: checked once, by TensorData
    assert len(calls) == 2


def test_validation_messages_name_the_source_and_the_example() -> None:
    x = torch.zeros(5, 2)
    x[3, 1] = float("nan")
    with pytest.raises(InputError, match=r"^src: non-finite values \(NaN or inf\) in the inputs of example 3: "
                                         r"1 in inputs among examples 0\.\.4; clean them$"):
        TensorData(x, torch.zeros(5), source="src")
    assert TensorData(x, torch.zeros(5), max_samples=3).num_examples == 3  # the NaN is not kept
    with pytest.raises(InputError, match=r"^src: inputs have 5 examples but targets have 4;"):
        TensorData(x, torch.zeros(4), source="src")
    with pytest.raises(InputError, match=r"^src: targets is a scalar"):
        TensorData(x, torch.tensor(1.0), source="src")
    with pytest.raises(InputError, match=r"no examples \(n = 0\)"):
        TensorData(torch.zeros(0, 2), torch.zeros(0))
    with pytest.raises(InputError, match="the inputs have NumPy dtype <U1, not numbers"):
        TensorData([["a"]], [1])


def test_shard_for_process_takes_contiguous_rows_without_checking_again() -> None:
    model, x, y = _regression(11)
    loaded = LoadedData(x, y, "mem")
    assert shard_for_process(loaded) is loaded  # one process: all of it, no copy
    shards = [shard_for_process(loaded, world_size=3, rank=r) for r in range(3)]
    assert [(s.first_index, s.num_examples) for s in shards] == [(0, 4), (4, 4), (8, 3)]
    assert torch.equal(torch.cat([s.inputs for s in shards]), x)  # type: ignore[attr-defined]
    # the shards' Problems sum (by hand here) to the whole data's loss and HVP
    full = Problem(model, loaded, None, "mse", hvp_route="fwd-rev")
    parts = [Problem(model, s, None, "mse", hvp_route="fwd-rev", total_examples=11) for s in shards]
    v = torch.randn(full.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sum(float(p.loss()) for p in parts), float(full.loss()), rtol=1e-13, atol=0)
    torch.testing.assert_close(sum(p.hvp(v) for p in parts), full.hvp(v), rtol=1e-12, atol=1e-14)


def test_collectives_are_identities_in_one_process() -> None:
    model, x, y = _regression()
    p = Problem(model, x, y, "mse", hvp_route="rev-rev")
    t = torch.ones(3)
    assert p.reduce(t) is t and p.gather({"a": 1}) == [{"a": 1}] and p.agree(("vmap", 4)) == ("vmap", 4)
    # two "processes" holding the same shard: the engine sums their parts and agrees on rank 0's choices
    q = Problem(model, x, y, "mse", hvp_route="rev-rev", total_examples=2 * x.shape[0],
                reduce=lambda s: 2 * s, gather=lambda o: [o, o])
    assert torch.equal(q.reduce(t), 2 * t) and q.agree("rank 0") == "rank 0" and q.gather(1) == [1, 1]
    torch.testing.assert_close(float(q.loss()), float(p.loss()), rtol=1e-14, atol=0)
