"""What an analysis result hands to the outside world: one record for the report and for JSON.

Every result dataclass in :mod:`basins.analyses` has ``record() -> Record``. The command line
writes ``record.attrs`` as the report group's attributes and ``record.arrays`` as its datasets
(:mod:`basins.files.report`), and prints the same keys with ``--json``: one serialiser, so a
key cannot differ between the two. This module imports nothing heavy (no torch, no h5py), so
every layer may use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Array", "Record", "EIGEN_UNITS", "plain"]

#: Units of Hessian eigenvalues (and of its trace): the loss's units per parameter unit squared.
EIGEN_UNITS = "loss / parameter²"


@dataclass
class Array:
    """A dataset: values (tensor, array or list) with a description and units (None where meaningless).

    Attributes:
        values: what the report stores (a rectangular tensor or array).
        description, units: dataset attributes in the report.
        in_json: also a ``--json`` key (False for large arrays such as eigenvectors, which
            only a report holds).
        json_values: what ``--json`` shows instead of ``values`` where the natural JSON form
            differs (e.g. ragged lists rather than a NaN-padded matrix); None: ``values``.
    """

    values: Any
    description: str
    units: str | None = None
    in_json: bool = True
    json_values: Any = None


@dataclass
class Record:
    """One analysis as data: scalar or small attributes, and named arrays.

    Attributes:
        attrs: settings, results and costs: numbers, strings, booleans, None, and lists/dicts
            of these. Report attributes and ``--json`` keys.
        arrays: datasets with descriptions and units. Report datasets and ``--json`` keys
            (as lists).
        json_only: keys shown with ``--json`` only (nested per-item data too large or too
            irregular for a report attribute, e.g. per-example loadings).
    """

    attrs: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Array] = field(default_factory=dict)
    json_only: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` keys: every attribute, every array with ``in_json`` (its
        ``json_values`` where given), then :attr:`json_only`. Values are left as they are (tensors included); the command
        line converts them to JSON types."""
        out = dict(self.attrs)
        for name, arr in self.arrays.items():
            if arr.in_json:
                out[name] = arr.values if arr.json_values is None else arr.json_values
        out.update(self.json_only)
        return out

    def as_analysis(self) -> dict[str, Any]:
        """The record in the shape :func:`basins.files.report.read_report` gives an analysis group
        (``{"attrs": ..., "datasets": {name: {"values", "description", "units"}}, "groups": ...}``; a
        dataset named ``"sub/name"`` also appears as ``name`` in group ``sub``), for renderers."""
        datasets = {n: {"values": a.values, "description": a.description, "units": a.units}
                    for n, a in self.arrays.items()}
        groups: dict[str, Any] = {}
        for n, d in datasets.items():  # "family/profile" is dataset profile of subgroup family in a report
            if "/" in n:
                head, tail = n.split("/", 1)
                groups.setdefault(head, {"attrs": {}, "datasets": {}, "groups": {}})["datasets"][tail] = d
        return {"attrs": dict(self.attrs), "datasets": datasets, "groups": groups}


def plain(obj: Any) -> Any:
    """``obj`` as JSON types: tensors and arrays to (nested) lists, dataclasses to dicts, numpy
    scalars to Python numbers, non-finite floats to None, anything else to ``str``. The one
    conversion behind report attributes of nested values and ``--json``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if hasattr(obj, "tolist") and not isinstance(obj, (list, tuple)):
        return plain(obj.tolist())
    if hasattr(obj, "__dataclass_fields__"):
        return plain(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return str(obj)
