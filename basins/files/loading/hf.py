"""Hugging Face model directories and ``.safetensors`` weights, from local files only.

A Hugging Face model directory (what ``model.save_pretrained(path)`` writes) holds
``config.json`` and the weights: ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), or, from older versions, ``pytorch_model.bin`` (a pickle).
:func:`load_hf_directory` reads it with ``transformers`` (the optional extra ``basins[hf]``):

* only local files: ``local_files_only=True``, nothing is fetched from a hub;
* the architecture comes from ``config.json`` (parsed as JSON first; its ``architectures``
  names a class of the ``transformers`` package, else ``AutoModelForCausalLM`` for its
  ``model_type``); code shipped with a model (``auto_map``) is never run
  (``trust_remote_code=False``);
* weights from safetensors; a directory with only ``pytorch_model.bin`` is a pickle and is
  refused unless ``trust_pickle`` (``--trust-pickle``), like any other pickle;
* attention on the ``eager`` path (``attn_implementation="eager"``): the fused SDPA kernels
  have no double backward and no forward-mode AD; ``use_cache=False`` (no key/value cache).

:func:`load_safetensors_state` reads a single ``.safetensors`` file as a state dict (for
``--arch``), with the ``safetensors`` package.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from basins.errors import InputError

from .formats import _HASH_CHUNK, _one_line

__all__ = ["is_hf_directory", "load_hf_directory", "load_safetensors_state", "HF_EXTRA_HINT"]

HF_EXTRA_HINT = "install the Hugging Face extra: pip install 'basins[hf]' (transformers and safetensors)"

_SAFE = ("model.safetensors", "model.safetensors.index.json")
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hf_directory(path: str) -> bool:
    """True for a directory holding a ``config.json``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _read_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{config_path}: not a readable JSON file ({_one_line(err)})") from err
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InputError(f"{config_path}: a Hugging Face config.json needs a string model_type")
    if config.get("auto_map"):
        raise InputError(
            f"{config_path} maps its architecture to code shipped with the model (auto_map); basins never "
            "runs such code (trust_remote_code): use a model whose class is part of transformers"
        )
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
    for name in config.get("architectures") or []:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoModelForCausalLM


def load_hf_directory(path: str, *, trust_pickle: bool = False) -> tuple[torch.nn.Module, str, str]:
    """Load a Hugging Face model directory (see module docstring).

    Returns:
        ``(module in eval mode, sha256 over config.json and the weight files, attention path)``.

    Raises:
        InputError: transformers missing (names the extra), a bad ``config.json``, code shipped
            with the model, no weights, a pickle without ``trust_pickle``, or transformers failing
            to build or load the model.
    """
    config = _read_config(path)
    files, safetensors = _weights(path, trust_pickle)
    try:
        import transformers
    except ImportError as err:
        raise InputError(f"{path} is a Hugging Face model directory: {HF_EXTRA_HINT}") from err
    from transformers.utils import logging as hf_logging

    cls = _model_class(transformers, config, path)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the library is silent: no "Loading weights" bar on stderr
    try:
        module = cls.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=safetensors,
            attn_implementation="eager",
        )
    except Exception as err:
        raise InputError(
            f"{path}: transformers could not load this {config.get('model_type')} model with {cls.__name__} "
            f"({_one_line(err)})"
        ) from err
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if getattr(module, "config", None) is not None:
        module.config.use_cache = False
    module.eval()
    attention = getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager"
    return module, _directory_sha256(path, files), str(attention)


def load_safetensors_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, on the CPU (no code runs: the format holds tensors only).

    Raises:
        InputError: the ``safetensors`` package is missing (names the extra), or the file is damaged.
    """
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise InputError(f"{path} is a .safetensors file: {HF_EXTRA_HINT}") from err
    try:
        return dict(load_file(path, device="cpu"))
    except Exception as err:
        raise InputError(f"{path}: cannot read the .safetensors file ({_one_line(err)})") from err


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
