"""Figures of reports: ``basins plot`` and the ``--plot`` options draw with this package.

Plotting is presentation, like the tables: it reads the same analysis dicts
(:func:`basins.files.report.read_report`, or ``Record.as_analysis()`` of a fresh result) and does
no math beyond choosing scales. matplotlib is an optional extra (``basins[plot]``); nothing here
imports it until a figure is drawn (:func:`basins.cli.figures.style.pyplot`).

Modules: :mod:`.style` (matplotlib set-up, deterministic output, atomic saving),
:mod:`.panels` (one function per analysis group), :mod:`.layout` (one report's figure, one
group's figure) and :mod:`.trajectory` (several reports against training step).
"""
