"""Figures of reports (``basins plot``, and the ``--plot`` options of ``spectrum`` and ``volume``).

Presentation only, like the summary tables: every panel draws the "analysis dict" that
:func:`basins.files.report.read_report` returns for a report group (the same shape
:meth:`basins.record.Record.as_analysis` gives a fresh result), and never computes a quantity
the report does not hold.

| module | job |
|---|---|
| ``style`` | the one style, axis scales from the data, titles, atomic deterministic writes |
| ``data`` | reading analysis dicts in both shapes (subgroups vs ``family/name`` keys, JSON attrs) |
| ``layout`` | one report: :data:`~.layout.PANELS` (group → panel) laid out on a grid |
| ``trajectory`` | several reports: each quantity against training step |
| ``hessian``, ``spectrum``, ``nullity``, ``features``, ``volume``, ``walls``, ``llc``, ``landscape``, ``extra`` | one panel kind each: ``draw(ax, analysis, problem)`` |

No module here imports matplotlib (or torch) at import time: matplotlib is the optional extra
``basins[plot]``, checked by :func:`~.style.require_matplotlib` before anything is drawn.
"""
