"""The loader of weights without an architecture: a state dict or a ``.safetensors`` file, plus ``arch``.

:func:`build` is the entry point :mod:`.models` calls for the tags ``state_dict`` and
``safetensors``: ``arch="module:factory"`` (:func:`~.imports.import_object`) builds the ``nn.Module``
(the factory is called with no arguments; an ``nn.Module`` instance is used as is), and the
tensors :mod:`.checks` read and checked are loaded into it: strictly for a state dict; for a
``.safetensors`` file, strictly except for keys missing because their parameter is tied to one that
is present (safetensors files keep one copy of shared tensors, e.g. a language model's
``lm_head.weight`` tied to its input embeddings).
"""

from __future__ import annotations

import torch

from basins.errors import InputError

from .checks import Checked
from .describe import describe, one_line
from .imports import import_object
from .sniff import Sniffed

__all__ = ["build"]


def build(sniffed: Sniffed, checked: Checked, *, arch: str | None, trust_pickle: bool
          ) -> tuple[torch.nn.Module, int | None, str | None]:
    """The module ``arch`` builds, holding the checked weights, in eval mode (no fixed batch size, no
    attention path).

    Raises:
        InputError: ``arch`` cannot be imported, is not a factory of an ``nn.Module``, or the weights
            do not fit the module it builds (missing, unexpected or misshapen keys).
    """
    assert arch is not None and checked.state is not None  # (checks refused a file without arch)
    module = _build_module(arch)
    fits = f"the weights do not fit the model built by arch {arch}"
    try:
        result = module.load_state_dict(checked.state, strict=sniffed.tag != "safetensors")
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(f"{sniffed.path}: {fits} ({one_line(err)})", param="arch") from err
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied = {name for names in groups.values() if any(n in checked.state for n in names) for name in names}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}")
        if result.unexpected_keys:
            extra = result.unexpected_keys
            parts.append(f"unexpected {', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}")
        raise InputError(f"{sniffed.path}: {fits} ({'; '.join(parts)})", param="arch")
    module.eval()
    return module, None, None


def _build_module(arch: str) -> torch.nn.Module:
    factory = import_object(arch)
    if isinstance(factory, torch.nn.Module):
        return factory
    if not callable(factory):
        raise InputError(f"arch {arch} is a {type(factory).__name__}, not a function returning an nn.Module",
                         param="arch")
    try:
        module = factory()
    except Exception as err:
        raise InputError(
            f"arch {arch}: calling it with no arguments raised {type(err).__name__} "
            f"({one_line(err)}); it must build the model without arguments", param="arch"
        ) from err
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"arch {arch} returned {describe(module)}, not an nn.Module", param="arch")
    return module
