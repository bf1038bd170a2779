"""Words and constants shared by the loaders: what a file holds, in one line, for error messages.

Nothing here reads a file; only the error paths of the other modules call these functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "EXPORT_HINT", "HF_EXTRA_HINT", "KIND_WORDS", "PEFT_EXTRA_HINT",
           "describe", "not_readable", "one_line", "unpickling_global"]

BUNDLE_FORMAT = "basins-bundle"

BUNDLE_VERSION = 1

EXPORT_HINT = (
    "torch.export.save(torch.export.export(model.eval(), (x[:2],), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2') "
    "with x a batch of inputs"
)

HF_EXTRA_HINT = "install the Hugging Face extra: pip install 'basins[hf]' (transformers and safetensors)"

PEFT_EXTRA_HINT = "install peft: pip install 'basins[hf]' (transformers, safetensors and peft)"

#: what each sniffed tag (:func:`basins.files.loading.sniff.sniff`) is, as the object of "is"
KIND_WORDS = {
    "export": "a torch.export archive (.pt2)",
    "aoti": "an AOTInductor compiled package",
    "torchscript": "a TorchScript archive (torch.jit.save)",
    "torch-save": "a torch.save file",
    "npz": "a NumPy .npz archive",
    "npy": "a single NumPy .npy array",
    "hdf5": "an HDF5 file",
    "safetensors": "a .safetensors file of weights",
    "zip": "a zip archive of unknown content",
    "corrupt-zip": "a corrupt zip archive",
    "empty": "an empty file",
    "unknown": "a file of unknown format",
}


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message on one line of at most ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unpickling_global(err: BaseException) -> str:
    """What a refused pickle references, from ``torch.load``'s ``weights_only`` error."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f"it references {match.group(1)}" if match else "it is not plain tensors"


def describe(obj: Any) -> str:
    """``obj`` in a few words: a dict's first keys, a tensor's shape, else its type."""
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj)[:5]]
        more = ", ..." if len(obj) > 5 else ""
        return f"a dict with keys {', '.join(keys)}{more}" if keys else "an empty dict"
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def not_readable(path: str, kind: str, detail: str, what: str) -> str:
    """The message for a file that is neither a model nor data basins reads."""
    found = KIND_WORDS.get(kind, kind)
    detail = f" ({detail})" if detail else ""
    if what == "model":
        expected = (
            "a .pt2 (torch.export.save), a state dict (.pt or .safetensors) with arch, a Hugging Face "
            "model directory, or a bundle written by basins example"
        )
    else:
        expected = (
            'a .pt ({"inputs", "targets"}), .npz or .h5 file with inputs and targets, '
            "or module:factory"
        )
    noun = "a model" if what == "model" else "data"
    return f"{path} is {found}{detail}, not {noun} basins can read: expected {expected}"
