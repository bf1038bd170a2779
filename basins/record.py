"""What an analysis result hands to the outside world: one record for the report and for JSON.

Every result dataclass in :mod:`basins.analyses` has ``record() -> Record``. The command line
writes ``record.attrs`` as the report group's attributes and ``record.arrays`` as its datasets
(:mod:`basins.files.report`), and prints the same keys with ``--json``: one serialiser, so a
key cannot differ between the two. This module imports nothing heavy (no torch, no h5py), so
every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Array", "Record"]


@dataclass
class Array:
    """A dataset: values (tensor, array or list) with a description and units (None where meaningless)."""

    values: Any
    description: str
    units: str | None = None


@dataclass
class Record:
    """One analysis as data: scalar or small attributes, and named arrays.

    Attributes:
        attrs: settings, results and costs: numbers, strings, booleans, None, and lists/dicts
            of these. Report attributes and ``--json`` keys.
        arrays: datasets with descriptions and units. Report datasets and ``--json`` keys
            (as lists).
    """

    attrs: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Array] = field(default_factory=dict)
