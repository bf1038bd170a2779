"""The loader of a pickled ``nn.Module`` (``torch.save(model, path)``), read only with ``trust_pickle``.

:func:`build` is the entry point :mod:`.models` calls for the tag ``pickle``; :mod:`.checks` has
refused the file unless ``trust_pickle`` is set, because unpickling runs code from it.
"""

from __future__ import annotations

import torch

from basins.errors import InputError

from .checks import Checked
from .describe import describe, one_line
from .sniff import Sniffed

__all__ = ["build"]


def build(sniffed: Sniffed, checked: Checked, *, arch: str | None, trust_pickle: bool
          ) -> tuple[torch.nn.Module, int | None, str | None]:
    """The unpickled module in eval mode (no fixed batch size, no attention path).

    Raises:
        InputError: unpickling fails (a class it references cannot be imported), or it gives
            something other than an ``nn.Module``.
    """
    path = sniffed.path
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise InputError(
            f"{path}: unpickling failed ({type(err).__name__}: {one_line(err)}); the classes "
            "it references must be importable (run from the project that defines them)"
        ) from err
    if not isinstance(obj, torch.nn.Module):
        raise InputError(
            f"{path} unpickled to {describe(obj)}, not an nn.Module: save the model itself "
            "(torch.save(model, path)) or, better, export a .pt2 with torch.export"
        )
    obj.eval()
    return obj, None, None
