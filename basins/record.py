"""What an analysis result hands to the outside world: one record for the report and for JSON.

Every result dataclass in :mod:`basins.analyses` has ``record() -> Record``. The one serialiser:

* report: :meth:`Record.report_attrs` and :attr:`Record.arrays` are what
  :func:`basins.files.report.write_analysis` writes to a group; :meth:`Record.from_analysis`
  turns the group :func:`basins.files.report.read_report` reads back into the same record;
* JSON: :func:`json_object` (the problem's keys, the warnings, :meth:`Record.as_json`), printed by a
  command for the record it computed and by ``basins summary --json`` for the record read back,
  so the two are equal key for key.

This module imports nothing heavy (numpy only when an array is converted; no torch, no h5py), so
every layer may use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Array", "Record", "EIGEN_UNITS", "REPORT_ATTRS", "json_object", "plain", "stored"]

#: Units of Hessian eigenvalues (and of its trace): the loss's units per parameter unit squared.
EIGEN_UNITS = "loss / parameter²"

#: Attributes a report group holds beside its record's own: the command line (``argv``), when it was
#: written and how many earlier runs it replaced, the problem and the warnings of the run that wrote it,
#: and the record's :attr:`Record.json_only` keys. A record's attributes never use these names.
REPORT_ATTRS = ("argv", "created", "replaced", "problem", "warnings", "json_only")


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

    def json(self) -> Any:
        """The ``--json`` value: :func:`plain` of ``json_values`` where given, else of the array a
        report stores (:func:`stored`), so that it is the same read back from a report."""
        return plain(self.json_values) if self.json_values is not None else plain(stored(self.values))


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
        """The ``--json`` keys, as JSON types (:func:`plain`): every attribute, every array with
        ``in_json`` (:meth:`Array.json`), then :attr:`json_only`. A record read back from a report
        (:meth:`from_analysis`) gives the same object, key for key."""
        out = plain(self.attrs)
        for name, arr in self.arrays.items():
            if arr.in_json:
                out[name] = arr.json()
        out.update(plain(self.json_only))
        return out

    def report_attrs(self, **meta: Any) -> dict[str, Any]:
        """The attributes of the record's report group: :attr:`attrs`, :attr:`json_only` (as one
        attribute ``json_only``, when there are any) and ``meta`` (names in :data:`REPORT_ATTRS`:
        ``argv``, ``problem``, ``warnings``). :meth:`from_analysis` is the inverse."""
        clash = [k for k in self.attrs if k in REPORT_ATTRS]
        if clash:
            raise ValueError(f"record attribute(s) {clash} use names a report group reserves ({REPORT_ATTRS})")
        unknown = [k for k in meta if k not in REPORT_ATTRS]
        if unknown:
            raise ValueError(f"unknown report attribute(s) {unknown}; expected names in {REPORT_ATTRS}")
        out = dict(self.attrs)
        if self.json_only:
            out["json_only"] = self.json_only
        out.update(meta)
        return out

    @classmethod
    def from_analysis(cls, analysis: dict[str, Any]) -> Record:
        """The record a report group holds (a group of :func:`basins.files.report.read_report`):
        the inverse of writing :meth:`report_attrs` and :attr:`arrays`. The attributes in
        :data:`REPORT_ATTRS` are left out (``json_only`` becomes :attr:`json_only`); a dataset in
        subgroup ``sub`` becomes array ``"sub/name"``."""
        attrs = {k: v for k, v in analysis.get("attrs", {}).items() if k not in REPORT_ATTRS}
        arrays: dict[str, Array] = {}

        def walk(group: dict[str, Any], prefix: str) -> None:
            for name, d in group.get("datasets", {}).items():
                arrays[prefix + name] = Array(d["values"], d.get("description") or "", d.get("units"),
                                              in_json=bool(d.get("in_json", True)), json_values=d.get("json_values"))
            for sub, g in group.get("groups", {}).items():
                walk(g, f"{prefix}{sub}/")

        walk(analysis, "")
        json_only = analysis.get("attrs", {}).get("json_only")
        return cls(attrs, arrays, dict(json_only) if isinstance(json_only, dict) else {})

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


def json_object(problem: dict[str, Any], record: Record, warnings: list[str], **extra: Any) -> dict[str, Any]:
    """The one ``--json`` object of an analysis: the problem's keys (the whole ``/problem``
    record), ``warnings``, then :meth:`Record.as_json` and ``extra`` (e.g. ``report``), as JSON
    types. A command prints it for the record it computed; ``basins summary --json`` for the
    record read back from the report, which gives the same object."""
    return plain({**problem, "warnings": list(warnings), **record.as_json(), **extra})


def stored(values: Any) -> Any:
    """``values`` as the numpy array a report stores (a tensor is copied to the CPU; bfloat16,
    which numpy lacks, becomes float32)."""
    import numpy as np

    if hasattr(values, "detach"):
        values = values.detach().cpu()
        if str(values.dtype) == "torch.bfloat16":
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


def plain(obj: Any, finite: bool = True) -> Any:
    """``obj`` as JSON types: tensors and arrays to (nested) lists, dataclasses to dicts, numpy
    scalars to Python numbers, non-finite floats to None (kept with ``finite=False``, as a report
    stores them), anything else to ``str``. The one conversion behind ``--json`` and report
    attributes."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if not finite or math.isfinite(obj) else None
    if hasattr(obj, "detach"):
        obj = stored(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (list, tuple)):
        return plain(obj.tolist(), finite)
    if hasattr(obj, "__dataclass_fields__"):
        return plain(asdict(obj), finite)
    if isinstance(obj, dict):
        return {str(k): plain(v, finite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, finite) for v in obj]
    return str(obj)
