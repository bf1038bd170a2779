"""Hugging Face model directories, from local files only.

A Hugging Face model directory (what ``model.save_pretrained(path)`` writes) holds
``config.json`` and the weights: ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), or, from older versions, ``pytorch_model.bin`` (a pickle).
:func:`load_hf_directory` reads it with ``transformers`` (the optional extra ``basins[hf]``):

* only local files: ``local_files_only=True``, nothing is fetched from a hub;
* every JSON file transformers reads is first parsed by basins with bounded size and depth
  (:mod:`.safe_json`); shards named by the index must be plain file names in the directory;
* the architecture comes from ``config.json``: its ``architectures`` names a model class of the
  ``transformers`` package (a tokenizer, config or processor class is refused), else
  ``AutoModelForCausalLM`` for its ``model_type``; code shipped with a model (``auto_map``) is
  never run (``trust_remote_code=False``);
* the model the config describes is sized before it is built: a config whose layers or widths
  call for far more parameters than the weight files hold (``n_layer=200000`` beside a few
  kilobytes of weights), or more memory than the machine has, is refused;
* weights from safetensors, each header checked (:func:`~.weights.safetensors_header`); a
  directory with only ``pytorch_model.bin`` is a pickle and is refused unless ``trust_pickle``
  (``--trust-pickle``), like any other pickle;
* attention on the ``eager`` path (``attn_implementation="eager"``): the fused SDPA kernels
  have no double backward and no forward-mode AD; ``use_cache=False`` (no key/value cache).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from basins.errors import InputError
from basins.files.bounds import check_allocation

from .formats import _HASH_CHUNK, _one_line
from .safe_json import read_json_file
from .weights import HF_EXTRA_HINT, half_dtypes, safetensors_header

__all__ = ["HFModel", "is_hf_directory", "load_hf_directory", "HF_EXTRA_HINT"]

_SAFE = ("model.safetensors", "model.safetensors.index.json")
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: other JSON files transformers reads from a model directory (parsed here first, bounded)
_OTHER_JSON = ("generation_config.json",)

_LAYERS = ("n_layer", "num_hidden_layers", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
           "num_encoder_layers", "num_decoder_layers")
_WIDTH = ("n_embd", "hidden_size", "d_model", "dim", "embed_dim")
_FEEDFORWARD = ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")
_TABLES = ("vocab_size", "n_positions", "max_position_embeddings", "num_labels")  # rows of tables and heads
#: a config may describe this many more parameters than its weight files hold (untied heads, new layers)
_SLACK_FACTOR, _SLACK = 4, 1 << 20
#: layer counts up to this are accepted whatever the weight files hold (ALBERT shares one layer's weights)
_FREE_LAYERS = 64


@dataclass
class HFModel:
    """A loaded Hugging Face directory: the module in eval mode, the SHA-256 over ``config.json``
    and the weight files, the attention path, and the floating dtypes narrower than float32 that
    the weight files store (``"bfloat16"``; None when none or unknown)."""

    module: torch.nn.Module
    sha256: str
    attention: str
    stored_half: str | None


def is_hf_directory(path: str) -> bool:
    """True for a directory holding a ``config.json``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _read_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "config.json")
    config = read_json_file(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"{config_path}: a Hugging Face config.json needs a string model_type")
    if config.get("auto_map"):
        raise InputError(
            f"{config_path} maps its architecture to code shipped with the model (auto_map); basins never "
            "runs such code (trust_remote_code): use a model whose class is part of transformers"
        )
    for name in _OTHER_JSON:
        if os.path.lexists(os.path.join(path, name)):
            read_json_file(os.path.join(path, name))
    return config


def _weights(path: str, trust_pickle: bool) -> tuple[list[str], bool]:
    """The weight files to hash and whether they are safetensors; refuses pickles unless trusted."""
    names = sorted(os.listdir(path))
    safe = [n for n in names if n.endswith(".safetensors") or n == "model.safetensors.index.json"]
    if any(n in names for n in _SAFE) or safe:
        return safe, True
    pickled = [n for n in names if n.startswith("pytorch_model") and (n.endswith(".bin") or n.endswith(".json"))]
    if pickled:
        if not trust_pickle:
            raise InputError(
                f"{path} holds its weights as {pickled[0]}, a pickle: loading a pickle runs code from the file; "
                "pass --trust-pickle (trust_pickle=True) only for files you trust, or convert it once with "
                "model.save_pretrained(path, safe_serialization=True)"
            )
        return pickled, False
    raise InputError(
        f"{path} has a config.json but no weights (model.safetensors, its shards, or pytorch_model.bin)"
    )


def _safetensors_files(path: str, files: list[str]) -> list[str]:
    """The safetensors files transformers will read: the index's shards (plain names of regular
    files in ``path``), else ``model.safetensors``."""
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.lexists(index):
        return [n for n in files if n.endswith(".safetensors")]
    content = read_json_file(index, max_bytes=64 << 20)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: a shard index needs a weight_map object")
    shards = sorted({str(v) for v in weight_map.values()})
    for shard in shards:
        if os.path.basename(shard) != shard or shard.startswith(".") or not shard.endswith(".safetensors"):
            raise InputError(f"{index} names shard {shard!r}: shards must be .safetensors files in the same directory")
    return shards


def _declared_weights(path: str, shards: list[str]) -> tuple[int, int, str | None]:
    """Parameters the safetensors files declare, the number of layers their names reach (largest
    numbered part + 1), and the narrow floating dtypes they store; every header checked."""
    count, layers, half = 0, 0, set()
    for shard in shards:
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise InputError(f"{file} is missing or not a regular file")
        header = safetensors_header(file)
        for name, (_, shape) in header.items():
            count += math.prod(shape)
            numbers = [int(part) for part in name.split(".") if part.isdigit()]
            layers = max([layers, *(k + 1 for k in numbers)])
        half.update(half_dtypes(header))
    return count, layers, ", ".join(sorted(half)) or None


def _config_size(config: dict[str, Any], depth: int = 0) -> tuple[int, int, str]:
    """A lower bound on the parameters ``config`` describes (with its sub-configs), the most layers
    it asks for, and the fields behind that bound (for messages)."""

    def first(keys: tuple[str, ...]) -> tuple[int, str]:
        found = [(v, k) for k in keys if type(v := config.get(k)) is int and v > 0]
        return max(found, default=(0, ""))

    (layers, lkey), (width, wkey), (ff, _) = first(_LAYERS), first(_WIDTH), first(_FEEDFORWARD)
    table_rows = [(k, v) for k in _TABLES if type(v := config.get(k)) is int and v > 0]
    size = layers * (width * width + 2 * width * ff) + sum(v for _, v in table_rows) * width
    largest_table = [max(table_rows, key=lambda kv: kv[1])] if table_rows and width else []
    fields = ", ".join(f"{k}={v}" for k, v in ((lkey, layers), (wkey, width), *largest_table) if k)
    for value in config.values():
        if isinstance(value, dict) and depth < 8:
            sub, sub_layers, sub_fields = _config_size(value, depth + 1)
            size += sub
            if sub_layers > layers:
                layers, fields = sub_layers, sub_fields
    return size, layers, fields


def _check_config_size(config: dict[str, Any], path: str, declared: tuple[int, int] | None) -> None:
    """Refuse a config that would build a model far beyond its weights or this machine (module docstring)."""
    size, layers, fields = _config_size(config)
    config_path = os.path.join(path, "config.json")
    check_allocation(4 * size, f"the model it describes (at least {size:,} parameters: {fields}) in float32",
                     config_path)
    if declared is None:
        return
    count, found_layers = declared
    if size > _SLACK_FACTOR * count + _SLACK:
        raise InputError(
            f"{config_path} describes a model of at least {size:,} parameters ({fields}) but its weight files "
            f"hold {count:,}: the config does not match the weights"
        )
    if layers > _FREE_LAYERS and layers > _SLACK_FACTOR * found_layers:
        raise InputError(
            f"{config_path} asks for {layers:,} layers ({fields}) but its weight files hold at most "
            f"{found_layers:,}: the config does not match the weights"
        )


def _directory_sha256(path: str, files: list[str]) -> str:
    """SHA-256 over ``config.json`` and the weight files, each preceded by its name."""
    digest = hashlib.sha256()
    for name in ["config.json", *files]:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as handle:
            for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _model_class(transformers: Any, config: dict[str, Any], path: str) -> Any:
    """The class named by ``architectures`` (a model class of transformers), else ``AutoModelForCausalLM``."""
    names = config.get("architectures") or []
    config_path = os.path.join(path, "config.json")
    if not isinstance(names, list) or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise InputError(f"{config_path}: architectures must be a list of class names")
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    for name in names:
        if name.startswith("_"):
            raise InputError(f"{config_path}: architectures names {name!r}, not a model class of transformers")
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, (transformers.PreTrainedModel, _BaseAutoModelClass))):
            raise InputError(
                f"{config_path}: architectures names {name!r}, which is not a model class of transformers "
                "(a tokenizer, config or processor?); name the model class, e.g. GPT2LMHeadModel"
            )
        return cls
    return transformers.AutoModelForCausalLM


def _check_loading_info(info: dict[str, Any], path: str, cls: str) -> None:
    """Refuse weights the files lack (transformers would initialise them at random) or hold beyond the model."""
    missing = sorted({str(k) for k in info.get("missing_keys") or ()}
                     | {str(k[0]) for k in info.get("mismatched_keys") or ()})
    unexpected = sorted(str(k) for k in info.get("unexpected_keys") or ())
    for keys, what in ((missing, "lack weights of"), (unexpected, "hold weights that are not in")):
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            raise InputError(f"{path}: the weight files {what} the {cls} that config.json describes ({keys[0]!r}{more}); "
                             "basins analyses the saved weights only: save the model with save_pretrained")


def load_hf_directory(path: str, *, trust_pickle: bool = False) -> HFModel:
    """Load a Hugging Face model directory (see module docstring).

    Returns:
        An :class:`HFModel`; the module is in eval mode, in the dtype transformers loads it in
        (the caller upcasts narrow dtypes: :func:`~.weights.upcast_half`).

    Raises:
        InputError: transformers missing (names the extra), a bad ``config.json`` or index, code
            shipped with the model, a config sized beyond its weights or this machine, no weights, a
            pickle without ``trust_pickle``, or transformers failing to build or load the model.
    """
    config = _read_config(path)
    files, safetensors = _weights(path, trust_pickle)
    declared = _declared_weights(path, _safetensors_files(path, files)) if safetensors else None
    _check_config_size(config, path, declared[:2] if declared else None)
    try:
        import transformers
    except ImportError as err:
        raise InputError(f"{path} is a Hugging Face model directory: {HF_EXTRA_HINT}") from err
    from transformers.utils import logging as hf_logging

    cls = _model_class(transformers, config, path)
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # the library is silent: no "Loading weights" bar or load report on stderr
    hf_logging.set_verbosity_error()
    try:
        module, info = cls.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=safetensors,
            attn_implementation="eager", output_loading_info=True,
        )
    except Exception as err:
        raise InputError(
            f"{path}: transformers could not load this {config.get('model_type')} model with {cls.__name__} "
            f"({_one_line(err)})"
        ) from err
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    _check_loading_info(info, path, cls.__name__)
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"{path}: {cls.__name__}.from_pretrained gave a {type(module).__name__}, not a model")
    if getattr(module, "config", None) is not None:
        module.config.use_cache = False
    module.eval()
    attention = getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager"
    return HFModel(module, _directory_sha256(path, files), str(attention), declared[2] if declared else None)


def load_state_tied(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """``module.load_state_dict(state)``, strict except for keys missing because their parameter is
    tied to one that is present (safetensors files keep one copy of shared tensors, e.g. a language
    model's ``lm_head.weight`` tied to its input embeddings).

    Raises:
        InputError: missing or unexpected keys, or shapes that do not fit.
    """
    try:
        result = module.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"{source}: the weights do not fit the model built by --arch {arch} ({_one_line(err)})") from err
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied_ok = {name for names in groups.values() if any(n in state for n in names) for name in names}
    missing = [k for k in result.missing_keys if k not in tied_ok]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
        if result.unexpected_keys:
            extra = result.unexpected_keys
            parts.append(f"unexpected {', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}")
        raise InputError(f"{source}: the weights do not fit the model built by --arch {arch} ({'; '.join(parts)})")
