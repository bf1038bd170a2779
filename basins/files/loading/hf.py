"""Hugging Face model directories, from local files only.

A Hugging Face model directory (what ``model.save_pretrained(path)`` writes) holds
``config.json`` and the weights: ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), or, from older versions, ``pytorch_model.bin`` (a pickle).
:func:`build`, the entry point :mod:`.models` calls for the tag ``hf`` (and :mod:`.adapters` for an
adapter's base model), reads it with ``transformers`` (the optional extra ``basins[hf]``):

* only local files: ``local_files_only=True``, nothing is fetched from a hub;
* every JSON file transformers reads was parsed by basins with bounded size and depth, and the
  shards named by the index checked to be plain file names in the directory (:mod:`.sniff`);
* the architecture comes from ``config.json``: its ``architectures`` names a model class of the
  ``transformers`` package (a tokenizer, config or processor class is refused), else
  ``AutoModelForCausalLM`` for its ``model_type``; code shipped with a model (``auto_map``) is
  never run (``trust_remote_code=False``);
* the model the config describes is sized before it is built: a config whose layers or widths
  call for far more parameters than the weight files hold (``n_layer=200000`` beside a few
  kilobytes of weights), or more memory than the machine has, is refused;
* weights from safetensors, each header checked (:func:`~.checks.safetensors_header`); a
  directory with only ``pytorch_model.bin`` is a pickle and is refused unless ``trust_pickle``,
  like any other pickle (:mod:`.checks`, which also refuses ``auto_map``);
* attention on the ``eager`` path (``attn_implementation="eager"``): the fused SDPA kernels
  have no double backward and no forward-mode AD; ``use_cache=False`` (no key/value cache).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from basins.errors import InputError
from basins.files.bounds import check_allocation

from .checks import Checked
from .describe import HF_EXTRA_HINT, one_line
from .sniff import Sniffed

__all__ = ["build"]

_LAYERS = ("n_layer", "num_hidden_layers", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
           "num_encoder_layers", "num_decoder_layers")
_WIDTH = ("n_embd", "hidden_size", "d_model", "dim", "embed_dim")
_FEEDFORWARD = ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim")
_TABLES = ("vocab_size", "n_positions", "max_position_embeddings", "num_labels")  # rows of tables and heads
#: a config may describe this many more parameters than its weight files hold (untied heads, new layers)
_SLACK_FACTOR, _SLACK = 4, 1 << 20
#: layer counts up to this are accepted whatever the weight files hold (ALBERT shares one layer's weights)
_FREE_LAYERS = 64


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


def build(sniffed: Sniffed, checked: Checked, *, arch: str | None = None, trust_pickle: bool = False
          ) -> tuple[torch.nn.Module, int | None, str | None]:
    """The model of a Hugging Face directory (see module docstring) in eval mode, in the dtype
    transformers loads it in (:mod:`.models` upcasts narrow dtypes); no fixed batch size; the
    attention path (``eager``). ``arch`` and ``trust_pickle`` are not used (:mod:`.checks` refused
    pickled weights without ``trust_pickle``).

    Raises:
        InputError: transformers missing (names the extra), a config sized beyond its weights or this
            machine, a config naming a class that is not a model, or transformers failing to build or
            load the model, or leaving weights at random.
    """
    path, config = sniffed.path, sniffed.config
    _check_config_size(config, path, checked.declared)
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
            path, local_files_only=True, trust_remote_code=False, use_safetensors=not sniffed.pickled,
            attn_implementation="eager", output_loading_info=True,
        )
    except Exception as err:
        raise InputError(
            f"{path}: transformers could not load this {config.get('model_type')} model with {cls.__name__} "
            f"({one_line(err)})"
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
    return module, None, str(attention)
