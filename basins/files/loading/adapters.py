"""peft adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``) as models.

What ``peft_model.save_pretrained(path)`` writes is an adapter: a few small tensors (LoRA's
``lora_A``/``lora_B``, IA³ scalings, ...) and a config naming the base model. basins loads it as
one model (:func:`build`, the entry point :mod:`.models` calls for the tag ``peft``):

* the base model is a local Hugging Face directory (sniffed, checked and built as one: :mod:`.sniff`,
  :mod:`.checks`, :mod:`.hf`): ``base_model`` when given, else ``base_model_name_or_path`` of ``adapter_config.json``,
  as a path (absolute, relative to the working directory, or relative to the adapter directory).
  Nothing is fetched from a hub: a name that is not a local directory is refused;
* ``adapter_config.json`` is parsed by basins (bounded size and depth) and given to peft as
  keyword arguments; adapters that modify the model's weights are read (LoRA, IA³, LoHa, ...),
  prompt-learning adapters (prompt tuning, prefix tuning), whose forward is not the base
  model's, are refused;
* the adapter's weights come from ``adapter_model.safetensors`` (header checked,
  :func:`~.checks.safetensors_header`), or from ``adapter_model.bin`` read with
  ``weights_only=True``; every adapter tensor must be present;
* the module returned is the base model with the adapter layers in it (the ``nn.Module`` inside
  peft's ``PeftModel``, so that its outputs and loss are the base model's), in eval mode. The
  adapter's parameters are trainable and the base model's frozen, so θ is the adapter's
  parameters by default; ``params``/``include_frozen`` reach the others.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from basins.errors import InputError

from . import hf
from .checks import Checked
from .describe import PEFT_EXTRA_HINT, one_line
from .sniff import ADAPTER_CONFIG, Sniffed, is_adapter_directory

__all__ = ["build", "is_adapter_directory"]


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


def build(sniffed: Sniffed, checked: Checked, *, arch: str | None = None, trust_pickle: bool = False
          ) -> tuple[torch.nn.Module, int | None, str | None]:
    """The base model with the adapter in it (module docstring), in eval mode; no fixed batch size;
    the base model's attention path. ``arch`` is not used; ``trust_pickle`` goes to the base model.

    Raises:
        InputError: peft missing (names the extra), an unsupported ``adapter_config.json``, or weights
            that do not fit the base model.
    """
    path, config, state = sniffed.path, sniffed.config, checked.state
    assert sniffed.base is not None and checked.base is not None and state is not None
    base_dir = sniffed.base.path
    config_path = os.path.join(path, ADAPTER_CONFIG)
    _check_sizes(config, state, config_path)
    try:
        import peft
    except ImportError as err:
        raise InputError(f"{path} is a peft adapter directory: {PEFT_EXTRA_HINT}") from err
    base_module, _, attention = hf.build(sniffed.base, checked.base, trust_pickle=trust_pickle)
    kwargs = {k: v for k, v in config.items() if k not in ("runtime_config", "auto_mapping")}
    kwargs["inference_mode"] = False  # the adapter's parameters trainable: θ by default
    if "init_lora_weights" in kwargs:
        kwargs["init_lora_weights"] = False  # no initialisation computed from the base (PiSSA, LoftQ...): loaded next
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns on stderr (fan_in_fan_out, ...); the library is silent
        try:
            peft_config = peft.PeftConfig.from_peft_type(**kwargs)
        except Exception as err:
            raise InputError(f"{config_path}: peft refused this adapter config ({one_line(err)})") from err
        if peft_config.is_prompt_learning or getattr(peft_config, "is_adaption_prompt", False):
            raise InputError(f"{config_path}: a {peft_config.peft_type} adapter changes the model's inputs, not its "
                             "weights; basins reads weight adapters (LoRA, IA3, LoHa, ...)")
        try:
            wrapped = peft.get_peft_model(base_module, peft_config)
            result = peft.set_peft_model_state_dict(wrapped, state)
        except Exception as err:
            raise InputError(f"{path}: the adapter does not fit the base model {base_dir} ({one_line(err)})") from err
    missing = [k for k in result.missing_keys if ".default." in k or k.endswith(".default")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise InputError(f"{path}: the adapter's weights do not fit the base model {base_dir} ({what}, "
                         f"{len(missing) + len(unexpected)} in all)")
    module = wrapped.base_model.model
    module.eval()
    return module, None, attention
