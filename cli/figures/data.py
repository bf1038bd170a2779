"""Reading the "analysis dict" that panels draw, in either of its two shapes.

An analysis is ``{"attrs", "datasets": {name: {"values", "description", "units"}}, "groups"}``
as :func:`basins.files.report.read_report` returns a report group, or as
:meth:`basins.record.Record.as_analysis` gives a fresh result. They differ in two ways these
helpers hide: a dataset named ``family/name`` is a subgroup's dataset in a report but a flat key
in a record, and nested attributes (lists, dicts) may be JSON text in older reports.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..common import attr_value


def attr(analysis: dict[str, Any], key: str) -> Any:
    """The attribute ``key`` (JSON text of a list/dict decoded), or None."""
    return attr_value(analysis.get("attrs", {}), key)


def number(value: Any) -> float | None:
    """``value`` as a finite float, else None (bools, None, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def dataset(analysis: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The dataset ``name`` (``"a/b"`` looks in subgroup ``a`` too): ``{"values", "description",
    "units"}`` with ``values`` a float or bool numpy array, or None when absent."""
    item = analysis.get("datasets", {}).get(name)
    if item is None and "/" in name:
        head, rest = name.split("/", 1)
        sub = analysis.get("groups", {}).get(head)
        return dataset(sub, rest) if isinstance(sub, dict) else None
    if item is None:
        return None
    values = item.get("values")
    if hasattr(values, "detach"):  # a tensor in a fresh record
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype.kind not in "b":
        arr = np.asarray(arr, dtype=float)
    return {"values": arr, "description": item.get("description"), "units": item.get("units")}


def values(analysis: dict[str, Any], name: str) -> np.ndarray | None:
    """The values of dataset ``name`` (see :func:`dataset`), or None."""
    d = dataset(analysis, name)
    return None if d is None else d["values"]


def units(analysis: dict[str, Any], name: str, default: str | None = None) -> str | None:
    """The units stored on dataset ``name``, else ``default``."""
    d = dataset(analysis, name)
    u = None if d is None else d.get("units")
    return u if u else default


def subgroups(analysis: dict[str, Any]) -> list[str]:
    """Names of the families (``family/...`` datasets or subgroups) of a ``/volume`` or ``/walls`` analysis,
    in stored order."""
    names = list(analysis.get("groups", {}))
    for key in analysis.get("datasets", {}):
        if "/" in key and key.split("/", 1)[0] not in names:
            names.append(key.split("/", 1)[0])
    return names
