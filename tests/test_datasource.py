"""Streamed data (basins.engine.data): the same examples, in the same order, as the data held in memory.

A Problem over a stream must give the numbers of a Problem over the same tensors (float64,
rtol 1e-12: the same chunks, so the same sums), whether it keeps the chunks after the first
pass or reads the stream on every pass; a stream must read only its own part of the data.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from basins import InputError, Problem
from basins.engine.data import TensorData, combine_digests
from basins.engine.streams import HDF5Stream, IterableStream, hdf5_stream, stream_from_object
from basins.files.loading import load_data, open_data

RTOL = 1e-12


class CountingDataset(Dataset):  # type: ignore[type-arg]
    """Examples made on demand from their index (nothing stored), recording every index read."""

    def __init__(self, n: int = 23, d: int = 4, k: int = 2, classes: int | None = None) -> None:
        self.n, self.d, self.k, self.classes = n, d, k, classes
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads.append(int(i))
        g = torch.Generator().manual_seed(1000 + int(i))
        x = torch.randn(self.d, generator=g, dtype=torch.float64)
        if self.classes is not None:
            return x, torch.tensor(int(i) % self.classes)
        return x, torch.randn(self.k, generator=g, dtype=torch.float64)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self[i] for i in range(self.n)]
        self.reads.clear()
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class CountingIterable(IterableDataset):  # type: ignore[type-arg]
    """The same examples as :class:`CountingDataset`, only iterable (no length)."""

    def __init__(self, base: CountingDataset) -> None:
        self.base = base

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i in range(self.base.n):
            yield self.base[i]


def _model(d: int = 4, k: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, k)).double()


def _quantities(p: Problem) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    v = torch.randn(p.num_params, 3, generator=g, dtype=torch.float64)
    thetas = p.theta0 + 1e-2 * torch.randn(4, p.num_params, generator=g, dtype=torch.float64)
    return {"loss": p.loss(), "grad": p.grad(), "hvp": p.hvp(v[:, 0]), "block": p.hvp(v),
            "rev-rev": p.hvp_with_route(v, "rev-rev"), "loss_many": p.loss_many(thetas)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=1e-14, msg=key)


# ---------------------------------------------------------------------- sources
def test_dataset_stream_shards_tile_the_data_in_order_and_read_only_their_part() -> None:
    ds = CountingDataset(23)
    x, y = ds.tensors()
    spec = stream_from_object(ds, "counting")
    assert spec is not None and spec.num_examples == 23
    parts = [spec.shard(2, r) for r in range(2)]
    assert [p.num_examples for p in parts] == [12, 11] and [p.first_index for p in parts] == [0, 12]
    got = [list(parts[r].batches(5)) for r in range(2)]
    assert [b[0].shape[0] for b in got[0]] == [5, 5, 2] and [b[0].shape[0] for b in got[1]] == [5, 5, 1]
    assert torch.equal(torch.cat([b[0] for r in range(2) for b in got[r]]), x)
    assert torch.equal(torch.cat([b[1] for r in range(2) for b in got[r]]), y)
    ds.reads.clear()
    list(parts[1].batches(4))
    assert sorted(set(ds.reads)) == list(range(12, 23)) and len(ds.reads) == 11


def test_digest_ignores_batch_size_and_sharding_but_not_content_or_order() -> None:
    ds = CountingDataset(23)
    whole = stream_from_object(ds, "d").shard()  # type: ignore[union-attr]
    list(whole.batches(23))
    rebatched = stream_from_object(ds, "d").shard()  # type: ignore[union-attr]
    list(rebatched.batches(4))
    shards = [stream_from_object(ds, "d").shard(3, r) for r in range(3)]  # type: ignore[union-attr]
    for s in shards:
        list(s.batches(5))
    assert whole.digest is not None
    assert combine_digests([whole.digest]) == combine_digests([rebatched.digest])  # type: ignore[list-item]
    assert combine_digests([s.digest for s in shards]) == combine_digests([whole.digest])  # type: ignore[misc]
    x, y = ds.tensors()
    swapped = TensorDataset(x[[1, 0, *range(2, 23)]], y[[1, 0, *range(2, 23)]])
    other = stream_from_object(swapped, "d").shard()  # type: ignore[union-attr]
    list(other.batches(23))
    assert other.digest != whole.digest
    assert TensorData(x, y).digest is None  # in memory: the loader hashes the tensors themselves


def test_loader_keeps_its_sampler_order_batch_size_and_collate() -> None:
    ds = CountingDataset(10)
    order = [7, 3, 9, 0, 1, 2, 8, 4, 6, 5]

    def collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([a for a, _ in items]) * 2, torch.stack([b for _, b in items])

    loader = DataLoader(ds, batch_size=3, sampler=order, collate_fn=collate)
    spec = stream_from_object(loader, "loader", max_samples=8)
    assert spec is not None and spec.num_examples == 8
    src = spec.shard()
    assert src.default_batch_size == 256  # the loader's 3, raised to the smallest default chunk
    x, y = ds.tensors()
    got = list(src.batches(3))
    assert torch.equal(torch.cat([b[0] for b in got]), 2 * x[order[:8]])
    assert torch.equal(torch.cat([b[1] for b in got]), y[order[:8]])
    # the same examples as load_data materialises from that loader
    loaded = load_data("tests.test_datasource:_ordered_loader")
    streamed = open_data("tests.test_datasource:_ordered_loader")
    assert not isinstance(streamed, type(loaded))
    xs = torch.cat([b[0] for b in streamed.shard().batches(4)])  # type: ignore[union-attr]
    assert torch.equal(xs, loaded.inputs)


def _ordered_loader() -> DataLoader:  # type: ignore[type-arg]
    return DataLoader(CountingDataset(11), batch_size=4, sampler=[10, 0, 9, 1, 8, 2, 7, 3, 6, 4, 5])


def test_iterable_loader_shards_are_slices_of_the_stream_rebatched() -> None:
    base = CountingDataset(17)
    x, y = base.tensors()
    for batch_size in (None, 5):
        loader = DataLoader(CountingIterable(base), batch_size=batch_size)
        spec = stream_from_object(loader, "iterable")
        assert spec is not None and spec.num_examples == 17
        for r, (a, b) in enumerate([(0, 9), (9, 17)]):
            shard = spec.shard(2, r)
            assert isinstance(shard, IterableStream)
            got = list(shard.batches(4))
            assert [t[0].shape[0] for t in got] == [4] * ((b - a) // 4) + ([(b - a) % 4] if (b - a) % 4 else [])
            assert torch.equal(torch.cat([t[0] for t in got]), x[a:b])
            assert torch.equal(torch.cat([t[1] for t in got]), y[a:b])


def test_hdf5_stream_reads_slices(tmp_path: Path) -> None:
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    y = np.arange(20) % 3
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["inputs"], f["targets"] = x, y
    spec = hdf5_stream(str(path), max_samples=15)
    assert spec.num_examples == 15
    shard = spec.shard(2, 1)
    assert isinstance(shard, HDF5Stream) and (shard.first_index, shard.num_examples) == (8, 7)
    got = list(shard.batches(3))
    assert torch.equal(torch.cat([b[0] for b in got]), torch.from_numpy(x[8:15]))
    assert torch.equal(torch.cat([b[1] for b in got]), torch.from_numpy(y[8:15]))
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["inputs"], f["targets"] = x, y[:5]
    with pytest.raises(InputError, match="inputs have 20 examples but targets have 5"):
        hdf5_stream(str(tmp_path / "bad.h5"))


def test_stream_errors_name_the_examples() -> None:
    x, y = CountingDataset(9).tensors()
    x[6, 1] = float("nan")
    src = stream_from_object(TensorDataset(x, y), "nan-data").shard()  # type: ignore[union-attr]
    with pytest.raises(InputError, match=r"nan-data: non-finite values \(NaN or inf\) in the inputs of example 6: 1 in inputs among examples 4\.\.7; clean them"):
        list(src.batches(4))

    ds = CountingDataset(9)
    src = stream_from_object(ds, "shrinking").shard()  # type: ignore[union-attr]
    ds.n = 5  # the dataset lost examples after it was opened
    with pytest.raises(InputError, match="shrinking: reading the data failed with IndexError: 5"):
        list(src.batches(4))
    base = CountingDataset(9)
    stream = stream_from_object(DataLoader(CountingIterable(base), batch_size=2), "iterable").shard()  # type: ignore[union-attr]
    base.n = 5
    with pytest.raises(InputError, match="iterable: a pass yielded 5 examples instead of 9"):
        list(stream.batches(4))
    assert stream_from_object(torch.zeros(3), "t") is None and stream_from_object((x, y), "t") is None


# ---------------------------------------------------------------------- a Problem over a stream
@pytest.mark.parametrize("memory", [None, 0], ids=["kept-after-first-pass", "read-every-pass"])
def test_streamed_problem_equals_the_problem_in_memory(memory: int | None) -> None:
    ds = CountingDataset(23)
    x, y = ds.tensors()
    want = _quantities(Problem(_model(), x, y, "mse", batch_size=5, hvp_route="rev-rev"))
    src = stream_from_object(ds, "counting").shard()  # type: ignore[union-attr]
    p = Problem(_model(), src, None, "mse", batch_size=5, hvp_route="rev-rev", data_memory_bytes=memory)
    assert p.num_examples == 23 and p.batch_size == 5 and p.streaming is (memory == 0)
    ds.reads.clear()
    got = _quantities(p)
    _assert_same(got, want)
    # kept: no more reads; streamed: every loss, gradient, HVP (block) and batched loss reads all 23 once
    assert len(ds.reads) == (0 if memory is None else 23 * 6)


def test_streamed_problem_keeps_what_fits_and_streams_what_does_not() -> None:
    ds = CountingDataset(40)
    src = stream_from_object(ds, "counting").shard()  # type: ignore[union-attr]
    one_chunk = 10 * 4 * 8 + 10 * 2 * 8  # bytes of a chunk of 10: inputs (10, 4) + targets (10, 2), float64
    p = Problem(_model(), src, None, "mse", batch_size=10, data_memory_bytes=3 * one_chunk, hvp_route="rev-rev")
    assert p.streaming  # 4 chunks do not fit in the room of 3
    q = Problem(_model(), stream_from_object(ds, "c").shard(), None, "mse", batch_size=10,  # type: ignore[union-attr]
                data_memory_bytes=4 * one_chunk, hvp_route="rev-rev")
    assert not q.streaming
    torch.testing.assert_close(p.hvp(torch.ones(p.num_params)), q.hvp(torch.ones(q.num_params)), rtol=RTOL, atol=0)


def test_streamed_fixed_batch_export_is_padded_per_chunk(model_files: Any) -> None:
    from basins.files.loading import load_model

    loaded = load_model(model_files.pt2_fixed)
    x, y = model_files.inputs, model_files.targets
    want = _quantities(Problem(loaded.module, x, y, "cross-entropy", fixed_batch_size=loaded.fixed_batch_size,
                               dtype="float64", hvp_route="rev-rev"))
    src = stream_from_object(TensorDataset(x, y), "pairs").shard()  # type: ignore[union-attr]
    p = Problem(loaded.module, src, None, "cross-entropy", fixed_batch_size=loaded.fixed_batch_size,
                dtype="float64", hvp_route="rev-rev", data_memory_bytes=0)
    assert p.batch_size == loaded.fixed_batch_size and p.num_chunks == -(-x.shape[0] // loaded.fixed_batch_size)
    _assert_same(_quantities(p), want)


def test_streamed_targets_are_checked_in_every_chunk() -> None:
    ds = CountingDataset(12, k=3, classes=3)
    model = _model(4, 3)
    Problem(copy.deepcopy(model), stream_from_object(ds, "ok").shard(), None, "cross-entropy", batch_size=4)  # type: ignore[union-attr]

    class BadLabel(CountingDataset):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, t = super().__getitem__(i)
            return x, torch.tensor(7) if i == 10 else t

    bad = BadLabel(12, k=3, classes=3)
    with pytest.raises(InputError, match=r"class indices in \[\d, 7\] but the model has 3 outputs"):
        Problem(model, stream_from_object(bad, "bad").shard(), None, "cross-entropy", batch_size=4)  # type: ignore[union-attr]


@pytest.mark.parametrize("memory", [None, 0], ids=["kept-after-first-pass", "read-every-pass"])
def test_a_dataset_with_random_augmentation_is_refused(memory: int | None) -> None:
    class Augmented(CountingDataset):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = super().__getitem__(i)
            return x + 0.1 * torch.randn(x.shape, dtype=x.dtype), y

    src = stream_from_object(Augmented(10), "augmented").shard()  # type: ignore[union-attr]
    with pytest.raises(InputError, match="same example for the same index"):
        Problem(_model(), src, None, "mse", data_memory_bytes=memory)


def test_tensors_and_a_source_are_not_mixed() -> None:
    x, y = CountingDataset(5).tensors()
    with pytest.raises(InputError, match="not both"):
        Problem(_model(), TensorData(x, y), y, "mse")
    with pytest.raises(InputError, match="targets are missing"):
        Problem(_model(), x, None, "mse")
    p = Problem(_model(), stream_from_object(TensorDataset(x, y), "s").shard(), None, "mse",  # type: ignore[union-attr]
                data_memory_bytes=0)
    with pytest.raises(InputError, match="streamed from s"):
        _ = p.inputs


def test_a_streamed_problem_holds_no_chunk_between_passes() -> None:
    """With --stream, no batch the loader made outlives its pass: memory is one chunk, not n."""
    import gc
    import weakref

    alive: set[int] = set()

    def collate(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([a for a, _ in items])
        key = id(x)
        alive.add(key)
        weakref.finalize(x, alive.discard, key)
        return x, torch.stack([b for _, b in items])

    ds = CountingDataset(40)
    src = stream_from_object(DataLoader(ds, batch_size=8, collate_fn=collate), "tracked").shard()  # type: ignore[union-attr]
    p = Problem(_model(), src, None, "mse", hvp_route="rev-rev", data_memory_bytes=0)
    for _ in range(3):
        p.hvp(torch.ones(p.num_params, dtype=torch.float64))
        gc.collect()
        assert not alive, f"{len(alive)} chunks still alive after a pass"


# ---------------------------------------------------------------------- loaders the way users write them
def _streamed(obj: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    spec = stream_from_object(obj, "loader", **kw)
    assert spec is not None
    got = list(spec.shard().batches(7))
    return torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])


def test_batch_samplers_and_sequential_samplers_over_a_subset_keep_their_indices() -> None:
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    ds = CountingDataset(50)
    x, y = ds.tensors()
    even = list(range(0, 50, 2))
    cases = {
        "batch sampler over even indices": (DataLoader(ds, batch_sampler=BatchSampler(even, 4, False)), even),
        "sequential sampler over the first 20": (DataLoader(ds, batch_size=4, sampler=SequentialSampler(range(20))),
                                                 list(range(20))),
    }
    for name, (loader, order) in cases.items():
        gx, gy = _streamed(loader)
        assert torch.equal(gx, x[order]) and torch.equal(gy, y[order]), name
    with pytest.raises(InputError, match="shuffles"):
        stream_from_object(DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, False)), "random")
    with pytest.raises(InputError, match="drops its last batch, so examples would be left out"):
        stream_from_object(DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 8, drop_last=True)), "d")
    from torch.utils.data.distributed import DistributedSampler

    with pytest.raises(InputError, match="DistributedSampler"):
        stream_from_object(DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False)), "d")

    class Drawn:
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(torch.randperm(50).tolist())

        def __len__(self) -> int:
            return 50

    with pytest.raises(InputError, match="different order each time"):
        stream_from_object(DataLoader(ds, batch_size=5, sampler=Drawn()), "drawn")


def test_a_loader_subclass_is_iterated_as_it_is() -> None:
    class Doubling(DataLoader):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            for a, b in super().__iter__():
                yield 2 * a, b

    ds = CountingDataset(23)
    x, y = ds.tensors()
    gx, gy = _streamed(Doubling(ds, batch_size=5))
    assert torch.equal(gx, 2 * x) and torch.equal(gy, y)


def test_batch_size_none_yields_examples_or_batches() -> None:
    from torch.utils.data import BatchSampler, SequentialSampler

    ds = CountingDataset(30)
    x, y = ds.tensors()

    class PreBatched(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            for a in range(0, 30, 8):
                yield x[a : a + 8], y[a : a + 8]

    class BatchedGetItem(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 30

        def __getitem__(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            return x[keys], y[keys]

    def as_dict(item: Any) -> dict[str, torch.Tensor]:
        return {"inputs": item[0], "targets": item[1]}

    class BatchedItems(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]

    loaders = {
        "pre-batched iterable": DataLoader(PreBatched(), batch_size=None),
        "pre-batched map-style items": DataLoader(BatchedItems(), batch_size=None),
        "batched __getitem__": DataLoader(BatchedGetItem(), batch_size=None,
                                          sampler=BatchSampler(SequentialSampler(range(30)), 8, False)),
        "single examples": DataLoader(ds, batch_size=None),
        "single examples, converting collate_fn": DataLoader(ds, batch_size=None, collate_fn=as_dict),
        "single examples, iterable": DataLoader(CountingIterable(ds), batch_size=None),
    }
    for name, loader in loaders.items():
        gx, gy = _streamed(loader)
        assert torch.equal(gx, x) and torch.equal(gy, y), name
        assert _streamed(loader, max_samples=11)[0].shape[0] == 11, name


def test_one_source_serves_several_problems_each_checked_and_kept() -> None:
    ds = CountingDataset(20, k=3, classes=3)
    src = stream_from_object(ds, "shared").shard()  # type: ignore[union-attr]
    models = [_model(4, 3) for _ in range(2)]
    first = Problem(models[0], src, None, "cross-entropy", batch_size=5)
    second = Problem(models[1], src, None, "cross-entropy", batch_size=5)
    assert not first.streaming and not second.streaming  # both kept their chunks
    ds.reads.clear()
    second.hvp(torch.ones(second.num_params, dtype=torch.float64))
    assert ds.reads == []
    with pytest.raises(InputError, match=r"shared: the targets of examples 0\.\.4: targets hold class indices"):
        Problem(_model(4, 2), src, None, "cross-entropy", batch_size=5)  # 2 classes: label 2 is out of range


def test_every_pass_checks_the_example_count() -> None:
    base = CountingDataset(12)
    src = stream_from_object(DataLoader(CountingIterable(base), batch_size=4), "shrinking").shard()  # type: ignore[union-attr]
    p = Problem(_model(), src, None, "mse", hvp_route="rev-rev", data_memory_bytes=0)
    p.hvp(torch.ones(p.num_params, dtype=torch.float64))
    base.n = 9  # the stream lost examples after the checks at load
    with pytest.raises(InputError, match="yielded 9 examples instead of 12"):
        p.hvp(torch.ones(p.num_params, dtype=torch.float64))


def test_small_integer_labels_work_as_class_indices() -> None:
    x, y = CountingDataset(15, classes=3).tensors()
    want = Problem(_model(4, 3), x, y, "cross-entropy").loss()
    for dtype in (torch.uint8, torch.int32):
        torch.testing.assert_close(Problem(_model(4, 3), x, y.to(dtype), "cross-entropy").loss(), want, rtol=0, atol=0)
        src = stream_from_object(TensorDataset(x, y.to(dtype)), "u8").shard()  # type: ignore[union-attr]
        torch.testing.assert_close(Problem(_model(4, 3), src, None, "cross-entropy").loss(), want, rtol=0, atol=0)


class _FailsAtFive(CountingDataset):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i == 5:
            raise KeyError("image 5 is missing")
        return super().__getitem__(i)


def test_an_error_in_a_loader_worker_shows_the_users_message() -> None:
    src = stream_from_object(DataLoader(_FailsAtFive(8), batch_size=4, num_workers=1), "workers").shard()  # type: ignore[union-attr]
    with pytest.raises(InputError, match=r"workers: reading the data failed with KeyError: .image 5 is missing."):
        list(src.batches(4))


def test_loader_items_that_are_not_pairs_say_what_they_are() -> None:
    x, y = CountingDataset(4).tensors()
    triples = DataLoader(TensorDataset(x, y, y), batch_size=2)
    with pytest.raises(InputError, match="batch 0 is a list of 3 items, not an"):
        list(stream_from_object(triples, "triples").shard().batches(2))  # type: ignore[union-attr]
    named = DataLoader([{"image": a, "label": b} for a, b in zip(x, y)], batch_size=2)
    with pytest.raises(InputError, match="keys image, label .expected keys inputs and targets."):
        list(stream_from_object(named, "named").shard().batches(2))  # type: ignore[union-attr]


def test_batch_size_none_sequences_with_labels_of_their_length_are_single_examples() -> None:
    """Language-model data: tokens (T,) and next tokens (T,) per example, batching off."""
    tokens = torch.arange(60).reshape(10, 6)

    class Sequences(IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            for row in tokens:
                yield row, row + 1

    spec = stream_from_object(DataLoader(Sequences(), batch_size=None), "lm")
    assert spec is not None and spec.num_examples == 10
    got = list(spec.shard().batches(4))
    assert torch.equal(torch.cat([b[0] for b in got]), tokens) and torch.equal(torch.cat([b[1] for b in got]), tokens + 1)


class _OpensInWorker(CountingDataset):
    """Opens its 'file' in ``worker_init_fn``, as datasets reading from disk with workers do."""

    handle: str | None = None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.handle is None:
            raise RuntimeError("read before worker_init_fn opened the file")
        return super().__getitem__(i)


def _open_in_worker(_: int) -> None:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    assert info is not None
    info.dataset.handle = "open"  # the user's dataset, not a wrapper


def test_worker_init_fn_sees_the_users_dataset() -> None:
    ds = _OpensInWorker(9)
    loader = DataLoader(ds, batch_size=4, num_workers=1, worker_init_fn=_open_in_worker)
    spec = stream_from_object(loader, "workers")
    assert spec is not None
    ds.handle = "open"
    x, y = CountingDataset(9).tensors()
    ds.handle = None
    got = list(spec.shard().batches(4))
    assert torch.equal(torch.cat([b[0] for b in got]), x)
    hx, _ = spec.shard().head(2)
    assert torch.equal(hx, x[:2])


def test_a_stream_that_grows_is_refused_by_the_last_shard() -> None:
    base = CountingDataset(12)
    spec = stream_from_object(DataLoader(CountingIterable(base), batch_size=4), "growing")
    assert spec is not None
    first, last = spec.shard(2, 0), spec.shard(2, 1)
    base.n = 15
    assert sum(b[0].shape[0] for b in first.batches(4)) == 6  # not its concern
    with pytest.raises(InputError, match="yielded 15 examples instead of 12"):
        list(last.batches(4))


def test_processes_that_open_different_data_disagree_on_its_identity() -> None:
    ds = CountingDataset(20)
    same = [stream_from_object(DataLoader(ds, batch_size=4), "d").identity() for _ in range(2)]  # type: ignore[union-attr]
    assert same[0] == same[1]
    x, y = ds.tensors()
    halves = [stream_from_object(TensorDataset(x[r::2], y[r::2]), "d").identity() for r in range(2)]  # type: ignore[union-attr]
    assert halves[0] != halves[1]


def test_data_that_change_while_routes_are_timed_are_reported_as_bad_data() -> None:
    """Not as 'no HVP route works' (a run-time failure): the stream changed, whatever the route."""
    base = CountingDataset(12)

    class GrowsLater(IterableDataset):  # type: ignore[type-arg]
        passes = 0

        def __iter__(self):  # type: ignore[no-untyped-def]
            GrowsLater.passes += 1
            for i in range(12):
                yield base[i]
            # passes: 1 count, 2 first examples, 3-7 loss/gradient/data re-read/determinism, 8+ route timing
            if GrowsLater.passes >= 8:
                for i in range(3):
                    yield base[i]

    src = stream_from_object(DataLoader(GrowsLater(), batch_size=4), "growing").shard()  # type: ignore[union-attr]
    # the change shows at the first complete pass after it: in the set-up (the memory plan's or the
    # route's pass) or at the first HVP, an InputError either way, never "no HVP route works"
    with pytest.raises(InputError, match="yielded 15 examples instead of 12"):
        p = Problem(_model(), src, None, "mse", data_memory_bytes=0)
        p.hvp(torch.ones(p.num_params))
