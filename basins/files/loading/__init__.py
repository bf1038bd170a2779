"""Load a model and its data from the files users have, and write self-contained bundles.

Files are recognised by their **content**, not their extension: the first bytes and, for zip
archives, the names of the members. ``torch.save`` files, ``torch.export`` archives, TorchScript
archives and ``.npz`` files are all zip archives, so a ``.pt`` file may hold a bundle, a state
dict, a pickled module or TorchScript; errors say which one was found. Every failure raises
:class:`~basins.errors.InputError` with a one-line message naming the file, what it holds and
what to do. Nothing here prints.

Models (:func:`load_model`)
    * ``.pt2`` written by ``torch.export.save``: read by basins' own archive reader
      (:mod:`.export_reader`), the only loader of untrusted archives: it validates every field it
      reads (names, symbolic sizes, an operator allowlist, members, CRCs, declared sizes) and
      refuses the rest; the module equals ``ExportedProgram.module()``, fixed or dynamic batch,
      without importing ``torch._dynamo``. ``torch.export.load`` runs only with ``trust_pickle``
      (:mod:`.exports`). The exported program is turned into inference mode: batch-norm layers use their
      running statistics and dropout is off, even if the model was exported in training mode,
      and the module's ``eval()`` is a no-op rather than the error exported modules raise. If
      the batch dimension of the input was exported as static, ``fixed_batch_size`` is that
      size (the model can only be called on batches of exactly that many examples).
    * a state dict (``torch.save(model.state_dict(), path)``), read with ``weights_only=True``,
      plus ``arch="module:factory"``: ``factory()`` builds the ``nn.Module`` and the weights are
      loaded with ``strict=True``.
    * a pickled ``nn.Module`` (``torch.save(model, path)``): loading it runs code from the file,
      so it is refused unless ``trust_pickle=True``.
    * a Hugging Face model directory (``config.json`` + ``model.safetensors``), local files only,
      with ``transformers`` (extra ``basins[hf]``): :mod:`~basins.files.loading.hf`; a
      ``pytorch_model.bin`` is a pickle (``trust_pickle``);
    * a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) on its
      base model's local directory (``base_model``, else the one the config names):
      :mod:`~basins.files.loading.adapters`; θ is the adapter's parameters by default;
    * a ``.safetensors`` file of weights plus ``arch="module:factory"``, like a state dict;
    * TorchScript (``torch.jit.save``) is always refused: ``torch.func`` cannot differentiate it.
      The error gives the ``torch.export`` one-liner to use instead.

    Weights stored in bfloat16 or float16 are upcast to float32 (exactly), the analysis precision;
    ``LoadedModel.source_dtype`` records the stored dtype. Parameter names must be dotted
    identifiers, tensors must hold values (no ``meta`` device) in the dense layout, and JSON and
    safetensors headers are bounded and checked before use (:mod:`~basins.files.loading.checks`).

Data (:func:`load_data`)
    ``spec`` is a file or ``module:factory``:

    * ``.pt``: ``torch.save({"inputs": X, "targets": Y}, path)``, read with ``weights_only=True``;
      ``inputs`` may be a dict of named inputs, or the file (like an ``.npz``, the root of an
      ``.h5``, a factory's dict or a Dataset's items) may hold named inputs directly:
      ``{"input_ids": ..., "attention_mask": ..., "labels": ...}`` (passed to the model as keyword
      arguments; targets from ``labels`` or ``targets``, else ``input_ids`` with padding
      (``attention_mask == 0``) set to −100, as a causal LM's labels);
    * ``.npz``: ``numpy.savez(path, inputs=X, targets=Y)`` (read with ``allow_pickle=False``);
    * ``.h5``/``.hdf5``: datasets named ``inputs`` and ``targets`` at the root;
    * a bundle (its data);
    * ``module:factory`` or ``path/to/file.py:factory``: the attribute, called with no
      arguments if it is callable, gives ``(inputs, targets)`` (tensors or arrays), a dict with
      those keys, a map-style ``Dataset`` of ``(x, y)`` pairs, or a ``DataLoader`` of
      ``(x, y)`` batches (iterated once, in order; a shuffling or ``drop_last`` loader is
      refused because the data would change from run to run).

    Inputs have shape ``(n, ...)`` and targets ``(n, ...)`` with the same ``n ≥ 1``; dtypes are
    kept as stored (integer class labels stay integer, float targets stay float); NumPy arrays
    become tensors. Floating-point inputs and targets must be finite.
    ``max_samples=k`` keeps the **first** ``k`` examples, in stored order: a fixed subset,
    nothing random, so the same file and ``k`` always give the same problem (and the same data
    hash). ``seed`` only seeds ``torch``, ``numpy`` and ``random`` while a factory runs and its
    dataset or loader is materialised (global generator states are restored afterwards), so a
    factory that draws random numbers gives the same data on every run.

Bundle format (version 1)
    One ``torch.save`` file, readable with ``torch.load(path, weights_only=True)`` (no code
    runs when it is loaded), holding a dict::

        {
            "format": "basins-bundle",       # str, identifies the file
            "version": 1,                    # int, this layout
            "model": uint8 tensor (m,),      # the bytes of a torch.export.save (.pt2) archive
            "inputs": tensor (n, ...),       # the data, dtypes as given
            "targets": tensor (n, ...),
            "loss": "cross-entropy" | None,  # a loss name (mse, cross-entropy, nll, bce) or
                                             # "module:function"; None: infer from the targets
            "meta": {str: str | int | float | bool | None | list of these},
        }

    ``basins example`` writes one (:mod:`basins.files.example`), :func:`save_bundle` writes one from
    a module or an ``ExportedProgram``, and any command accepts it as ``MODEL`` with no other
    option (``data``/``loss`` override what it carries). Readers refuse other ``format``
    values and newer versions. ``LoadedModel.sha256`` of a bundle is the hash of the embedded
    ``.pt2`` bytes. (It differs from the hash of a ``.pt2`` file of the same program: the
    archive's member names start with the file's name, ``archive/`` in a bundle.)

How a model is loaded (:mod:`~basins.files.loading.models`): one walk forward, no module entered twice
    1. :mod:`~basins.files.loading.sniff`: what the path holds (first bytes, zip members, directory
       contents, a ``torch.save`` file's ``weights_only`` content), once, as a format tag;
    2. :mod:`~basins.files.loading.checks`: the checks every format shares, once (refusals, trust,
       layout, safetensors headers, parameter names, stored dtypes, the hash);
    3. the loader the table :data:`~basins.files.loading.models.LOADERS` gives for the tag, one entry
       point ``build`` per module: :mod:`~basins.files.loading.exports` (``.pt2``, a bundle's
       ``.pt2``; through :mod:`~basins.files.loading.export_reader`), :mod:`~basins.files.loading.arch`
       (a state dict or ``.safetensors`` file with ``arch``), :mod:`~basins.files.loading.hf`,
       :mod:`~basins.files.loading.adapters` (peft, on :mod:`~basins.files.loading.hf` for its base),
       :mod:`~basins.files.loading.pickled`;
    4. the wrap (:mod:`~basins.files.loading.models`): tensors checked, narrow dtypes upcast.

Other modules: :mod:`~basins.files.loading.data`, :mod:`~basins.files.loading.bundle` (writing
bundles), :mod:`~basins.files.loading.imports` (``module:attr`` specs),
:mod:`~basins.files.loading.matching` (a second checkpoint of the same architecture),
:mod:`~basins.files.loading.describe` (words for messages); everything public is importable from
``basins.files.loading``.

Example:
    >>> from basins.files.loading import resolve_inputs
    >>> model, data, loss = resolve_inputs("basins-example/model.pt")  # doctest: +SKIP
"""

from __future__ import annotations

from basins.engine import distributed as dist
from basins.engine.data import DataSource
from basins.engine.losses import NamedLoss
from basins.engine.streams import StreamSpec
from basins.errors import InputError

from .bundle import Bundle, load_bundle, save_bundle
from .data import LoadedData, _finish_data, load_data, open_data
from .describe import BUNDLE_FORMAT, BUNDLE_VERSION
from .imports import import_object, load_loss
from .matching import OtherCheckpoint, load_parameters_like
from .models import LoadedModel, _load_model_file, load_model

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "Bundle",
    "LoadedData",
    "LoadedModel",
    "OtherCheckpoint",
    "StreamSpec",
    "import_object",
    "load_bundle",
    "load_data",
    "load_loss",
    "load_model",
    "load_parameters_like",
    "open_data",
    "resolve_inputs",
    "save_bundle",
    "shard_for_process",
]



def resolve_inputs(
    model: str,
    *,
    data: str | None = None,
    loss: str | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    max_samples: int | None = None,
    seed: int = 0,
    stream: bool = False,
    loaded_data: LoadedData | StreamSpec | None = None,
    base_model: str | None = None,
) -> tuple[LoadedModel, LoadedData | StreamSpec, str | NamedLoss | None]:
    """The model, data and loss a command runs on.

    A bundle supplies all three; an explicit ``data`` or ``loss`` replaces what it carries.
    Any other model file needs ``data``. The loss comes back as a built-in name, a
    :class:`~basins.engine.losses.NamedLoss` for a ``module:function`` spec (:func:`load_loss`),
    or ``None`` (none given: the caller infers it from the targets). With ``stream``, ``data`` is opened by
    :func:`open_data` (a Dataset, DataLoader or HDF5 file is not read yet); otherwise the
    data come back loaded (:class:`LoadedData`). ``loaded_data``: what an earlier call returned for
    the same ``data`` (several checkpoints on one data set), used instead of loading it again.
    ``base_model``: a peft adapter's base model directory (:func:`load_model`).

    Raises:
        InputError: as :func:`load_model` and :func:`load_data`, or ``data`` missing for a
            model that is not a bundle.
    """
    loaded, raw = _load_model_file(model, arch=arch, trust_pickle=trust_pickle, base_model=base_model)
    if data is not None and loaded_data is not None:
        bundle_loss = raw.get("loss") if raw is not None else None
        return loaded, loaded_data, load_loss(loss if loss is not None else bundle_loss)
    if raw is not None:
        bundle_loss = raw.get("loss")
        found: LoadedData | StreamSpec
        if data is not None:
            found = (open_data if stream else load_data)(data, max_samples=max_samples, seed=seed)
        else:
            found = _finish_data(raw["inputs"], raw["targets"], model, max_samples)
        return loaded, found, load_loss(loss if loss is not None else bundle_loss)
    if data is None:
        kind = {
            "export": "a .pt2 export",
            "state_dict": "a state dict",
            "pickle": "a pickled module",
            "hf": "a Hugging Face model directory",
            "peft": "a peft adapter directory",
        }.get(loaded.kind, loaded.kind)
        raise InputError(
            f"{model} is {kind}, which holds no data: pass the data as data (a .pt, .npz or .h5 file with inputs "
            "and targets or named inputs such as input_ids, or module:function); only a bundle written by "
            "basins example or save_bundle carries its own", param="data"
        )
    return loaded, (open_data if stream else load_data)(data, max_samples=max_samples, seed=seed), load_loss(loss)



def shard_for_process(
    data: LoadedData | StreamSpec, *, world_size: int | None = None, rank: int | None = None
) -> DataSource:
    """This process' contiguous shard of the data every process opened (all of it in one process).

    Under ``torchrun`` every process opens the whole data (a file, a ``Dataset``, a loader) and
    keeps its shard (:func:`basins.engine.distributed.shard_range`). First the processes check
    that they opened the same data: the same fingerprint for data in memory, the same size and
    fingerprint of the first examples for a stream. Pass the shard to
    :class:`~basins.Problem` with ``total_examples=data.num_examples``.

    Args:
        data: what :func:`load_data` or :func:`open_data` returned.
        world_size, rank: default: those of the initialised :mod:`torch.distributed` process
            group (1 and 0 without one).

    Returns:
        A :class:`~basins.engine.data.DataSource`: ``data`` itself in one process; a copy of
        this rank's rows of tensors (so that the whole data can be freed); a stream over this
        rank's examples (it reads only those).

    Raises:
        InputError: the processes opened different data (a factory that splits by rank, a
            ``DistributedSampler``), or fewer examples than processes.
    """
    world = dist.world_size() if world_size is None else int(world_size)
    rank_ = dist.rank() if rank is None else int(rank)
    if world > 1:  # every process must have opened the same data before taking its shard of it
        seen = dist.all_gather_object(data.identity() if isinstance(data, StreamSpec) else data.sha256)
        if len(set(seen)) > 1:
            raise InputError(
                f"{data.source}: the processes opened different data (sizes/fingerprints {sorted(set(seen))}); "
                "return the whole dataset (no DistributedSampler, no splitting by RANK): basins gives each "
                "process its shard"
            )
    if isinstance(data, StreamSpec):  # a Dataset, DataLoader or HDF5 file: this rank reads only its shard
        return data.shard(world, rank_)
    if world == 1:
        return data
    return data.shard(*dist.shard_range(data.num_examples, world, rank_))
