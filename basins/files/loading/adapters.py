"""peft adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``) as models.

What ``peft_model.save_pretrained(path)`` writes is an adapter: a few small tensors (LoRA's
``lora_A``/``lora_B``, IA³ scalings, ...) and a config naming the base model. basins loads it as
one model (:func:`load_adapter_directory`):

* the base model is a local Hugging Face directory (:mod:`.hf`, all its checks): ``base_model``
  when given (``--base-model DIR``), else ``base_model_name_or_path`` of ``adapter_config.json``,
  as a path (absolute, relative to the working directory, or relative to the adapter directory).
  Nothing is fetched from a hub: a name that is not a local directory is refused;
* ``adapter_config.json`` is parsed by basins (bounded size and depth) and given to peft as
  keyword arguments; adapters that modify the model's weights are read (LoRA, IA³, LoHa, ...),
  prompt-learning adapters (prompt tuning, prefix tuning), whose forward is not the base
  model's, are refused;
* the adapter's weights come from ``adapter_model.safetensors`` (header checked,
  :func:`~.weights.safetensors_header`), or from ``adapter_model.bin`` read with
  ``weights_only=True``; every adapter tensor must be present;
* the module returned is the base model with the adapter layers in it (the ``nn.Module`` inside
  peft's ``PeftModel``, so that its outputs and loss are the base model's), in eval mode. The
  adapter's parameters are trainable and the base model's frozen, so θ is the adapter's
  parameters by default; ``--params``/``--include-frozen`` reach the others.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from basins.errors import InputError

from .formats import _HASH_CHUNK, _one_line, _torch_load_safe
from .hf import HFModel, is_hf_directory, load_hf_directory
from .safe_json import read_json_file
from .weights import check_names, half_dtypes, load_safetensors_state, safetensors_header

__all__ = ["AdapterModel", "is_adapter_directory", "load_adapter_directory", "PEFT_EXTRA_HINT"]

CONFIG = "adapter_config.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_EXTRA_HINT = "install peft: pip install 'basins[hf]' (transformers, safetensors and peft)"


@dataclass
class AdapterModel:
    """A loaded adapter: the base model with the adapter in it, the base directory used, the
    SHA-256 over the adapter's config and weights and the base directory's digest, the attention
    path, and the narrow floating dtypes the files store (None: none)."""

    module: torch.nn.Module
    base: str
    sha256: str
    attention: str
    stored_half: str | None


def is_adapter_directory(path: str) -> bool:
    """True for a directory holding an ``adapter_config.json``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def _base_directory(path: str, config: dict[str, Any], base_model: str | None) -> str:
    """The local directory of the base model (module docstring)."""
    if base_model is not None:
        if not is_hf_directory(base_model):
            raise InputError(f"--base-model {base_model}: not a local Hugging Face model directory (with config.json)")
        return base_model
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise InputError(f"{os.path.join(path, CONFIG)} names no base model (base_model_name_or_path): "
                         "pass --base-model DIR, the base model's local directory")
    for candidate in (named, os.path.join(path, named)):
        if is_hf_directory(candidate):
            return candidate
    raise InputError(
        f"{os.path.join(path, CONFIG)} names base model {named!r}, which is not a local model directory; basins "
        "never downloads from a hub: pass --base-model DIR, the base model saved with save_pretrained"
    )


def _adapter_weights(path: str) -> tuple[str, dict[str, torch.Tensor], str | None]:
    """The weight file's name, its tensors, and the narrow dtypes it stores."""
    for name in _WEIGHTS:
        file = os.path.join(path, name)
        if not os.path.lexists(file):
            continue
        if not os.path.isfile(file):
            raise InputError(f"{file} is not a regular file")
        if name.endswith(".safetensors"):
            stored = ", ".join(half_dtypes(safetensors_header(file))) or None
            return name, load_safetensors_state(file), stored
        try:
            state = _torch_load_safe(file, file)
        except pickle.UnpicklingError as err:
            raise InputError(f"{file} holds Python objects, not only tensors: save the adapter with "
                             "safe_serialization=True (adapter_model.safetensors)") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{file} is not a dict of tensors (an adapter's state dict)")
        check_names(state, file)
        narrow = sorted({str(v.dtype).replace("torch.", "") for v in state.values()
                         if v.is_floating_point() and v.element_size() < 4})
        return name, state, ", ".join(narrow) or None
    raise InputError(f"{path} has an {CONFIG} but no adapter weights ({' or '.join(_WEIGHTS)})")


def _check_sizes(config: dict[str, Any], state: dict[str, torch.Tensor], config_path: str) -> None:
    """Refuse ranks larger than every dimension of the adapter's tensors (peft would allocate
    layers of that rank before the weights are loaded) and layer replication (copies of the
    base model's layers, sized by the config alone)."""
    if config.get("layer_replication"):
        raise InputError(f"{config_path}: layer_replication copies the base model's layers; basins does not "
                         "build such adapters (save the replicated model itself)")
    largest = max((d for t in state.values() for d in t.shape), default=0)
    _check_patterns(config, config_path)
    ranks = [config.get("r")]
    if isinstance(config.get("rank_pattern"), dict):
        ranks += list(config["rank_pattern"].values())
    for rank in ranks:
        if rank is not None and (type(rank) is not int or not 0 < rank <= max(largest, 1)):
            raise InputError(f"{config_path}: rank r={rank!r} is not a positive integer within the adapter's "
                             f"tensor sizes (at most {largest}): the config does not match the weights")


def _backtracks(pattern: str) -> bool:
    """A quantified group holding a quantifier or an alternation (``(a+)+``, ``(.*)*x``, ``(a|ab)*``):
    the shapes whose matching by ``re`` can take exponential time."""
    opens: list[int] = []
    for i, char in enumerate(pattern):
        if char == "\\":
            continue
        if char == "(" and (i == 0 or pattern[i - 1] != "\\"):
            opens.append(i)
        elif char == ")" and opens and pattern[i - 1] != "\\":
            start = opens.pop()
            quantified = pattern[i + 1 : i + 2] in ("*", "+", "{", "?")
            if quantified and any(c in pattern[start + 1 : i] for c in "*+{|"):
                return True
    return False


_PATTERN_KEYS = ("target_modules", "exclude_modules", "layers_pattern", "rank_pattern", "alpha_pattern")


def _check_patterns(config: dict[str, Any], config_path: str) -> None:
    """peft matches module names against regular expressions from the config (``target_modules``
    as a string, pattern keys); one with nested quantifiers could backtrack for hours: refused."""
    for key in _PATTERN_KEYS:
        value = config.get(key)
        texts = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, dict)) else []
        for text in texts:
            if isinstance(text, str) and (len(text) > 1000 or _backtracks(text)):
                raise InputError(f"{config_path}: {key} pattern {text[:60]!r} nests quantifiers (or is over 1000 "
                                 "characters); basins does not match such regular expressions")


def load_adapter_directory(path: str, *, base_model: str | None = None, trust_pickle: bool = False) -> AdapterModel:
    """Load a peft adapter directory on its local base model (module docstring).

    Args:
        path: the adapter directory.
        base_model: the base model's directory (default: the one ``adapter_config.json`` names).
        trust_pickle: passed to the base model's loader (a base with only ``pytorch_model.bin``).

    Raises:
        InputError: peft missing (names the extra), a bad or unsupported ``adapter_config.json``, a
            base model that is not a local directory, missing or damaged adapter weights, or
            weights that do not fit the base model.
    """
    config_path = os.path.join(path, CONFIG)
    config = read_json_file(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise InputError(f"{config_path}: an adapter config needs a string peft_type")
    base_dir = _base_directory(path, config, base_model)
    weights_name, state, stored = _adapter_weights(path)
    _check_sizes(config, state, config_path)
    try:
        import peft
    except ImportError as err:
        raise InputError(f"{path} is a peft adapter directory: {PEFT_EXTRA_HINT}") from err
    base: HFModel = load_hf_directory(base_dir, trust_pickle=trust_pickle)
    kwargs = {k: v for k, v in config.items() if k not in ("runtime_config", "auto_mapping")}
    kwargs["inference_mode"] = False  # the adapter's parameters trainable: θ by default
    if "init_lora_weights" in kwargs:
        kwargs["init_lora_weights"] = False  # no initialisation computed from the base (PiSSA, LoftQ...): loaded next
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns on stderr (fan_in_fan_out, ...); the library is silent
        try:
            peft_config = peft.PeftConfig.from_peft_type(**kwargs)
        except Exception as err:
            raise InputError(f"{config_path}: peft refused this adapter config ({_one_line(err)})") from err
        if peft_config.is_prompt_learning or getattr(peft_config, "is_adaption_prompt", False):
            raise InputError(f"{config_path}: a {peft_config.peft_type} adapter changes the model's inputs, not its "
                             "weights; basins reads weight adapters (LoRA, IA3, LoHa, ...)")
        try:
            wrapped = peft.get_peft_model(base.module, peft_config)
            result = peft.set_peft_model_state_dict(wrapped, state)
        except Exception as err:
            raise InputError(f"{path}: the adapter does not fit the base model {base_dir} ({_one_line(err)})") from err
    missing = [k for k in result.missing_keys if ".default." in k or k.endswith(".default")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise InputError(f"{path}: the adapter's weights do not fit the base model {base_dir} ({what}, "
                         f"{len(missing) + len(unexpected)} in all)")
    module = wrapped.base_model.model
    module.eval()
    digest = hashlib.sha256()
    for name in (CONFIG, weights_name):
        digest.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as handle:
            for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    digest.update(b"base\0" + base.sha256.encode())
    halves = sorted({h for s in (stored, base.stored_half) if s for h in s.split(", ")})
    return AdapterModel(module, base_dir, digest.hexdigest(), base.attention, ", ".join(halves) or None)
