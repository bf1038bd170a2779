"""The figure of one report: a panel per analysis group that has one, in a fixed order, under a
title naming the model and the short model and data hashes.

:data:`PANELS` maps a report group to the function that draws it on one axes,
``draw(ax, analysis, problem)``; a group not listed (or whose panel fails) gets no panel and a
note, so a report with groups this version does not know still draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from basins.errors import InputError

from . import extra, features, hessian, landscape, llc, nullity, spectrum, volume, walls
from .style import figure_style, new_figure, report_title

Panel = Callable[[Any, dict[str, Any], dict[str, Any]], None]

#: report group → panel, in the order panels are laid out
PANELS: dict[str, Panel] = {
    "hessian": hessian.draw,
    "spectrum": spectrum.draw,
    "nullity": nullity.draw,
    "features": features.draw,
    "volume": volume.draw,
    "walls": walls.draw,
    "llc": llc.draw,
    "landscape": landscape.draw,
    "hessian_blocks": extra.draw_blocks,
    "llc_blocks": llc.draw_blocks,
    "evidence": extra.draw_evidence,
}


def report_figure(report: dict[str, Any], notes: list[str] | None = None, *, debug: bool = False,
                  groups: list[str] | None = None) -> Any:
    """The figure of one report (a :func:`basins.files.report.read_report` dict, or
    ``{"problem": ..., "analyses": {group: record.as_analysis()}}``).

    Args:
        report: the report dict.
        notes: collects one line per group drawn without a panel (unknown group, or its panel
            raised); the caller prints them.
        debug: let a panel's exception propagate instead of noting it.
        groups: only these groups (default: every group that has a panel).

    Returns:
        a :class:`matplotlib.figure.Figure` (made under :func:`figure_style`; save it with
        :func:`~.style.save_figure` inside the same style).

    Raises:
        InputError: no group of the report has a panel.
    """
    notes = notes if notes is not None else []
    analyses = report.get("analyses", {})
    wanted = [g for g in PANELS if g in analyses and (groups is None or g in groups)]
    for g in analyses:
        if g not in PANELS:
            notes.append(f"/{g}: no panel for this group; not drawn")
    if not wanted:
        have = ", ".join("/" + g for g in analyses) or "no analysis group"
        raise InputError(f"{report.get('path', 'the report')}: nothing to draw ({have}); panels exist for "
                         + ", ".join("/" + g for g in PANELS))
    fig, axes = new_figure(len(wanted))
    for ax, group in zip(axes, wanted):
        try:
            PANELS[group](ax, analyses[group], report.get("problem", {}))
        except Exception as exc:
            if debug:
                raise
            notes.append(f"/{group}: its panel failed ({type(exc).__name__}: {exc}); left empty")
            ax.clear()
            ax.set_axis_off()
            ax.set_title(f"/{group}: not drawn")
    fig.suptitle(report_title(report.get("problem", {}), narrow=len(wanted) == 1), fontsize=10)
    return fig


def single_panel(group: str, analysis: dict[str, Any], problem: dict[str, Any], title: str | None = None) -> Any:
    """A figure of one panel (the ``--plot`` options of ``spectrum`` and ``volume``)."""
    fig, axes = new_figure(1)
    PANELS[group](axes[0], analysis, problem)
    if title:
        axes[0].set_title(title)
    return fig


__all__ = ["PANELS", "report_figure", "single_panel", "figure_style"]
