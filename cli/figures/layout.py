"""One report as one figure (a panel per analysis group), or one group alone (the ``--plot`` options)."""

from __future__ import annotations

import math
from typing import Any

from .panels import PANELS
from .style import pyplot, short


def title(problem: dict[str, Any]) -> str:
    """The figure title: the model and the short model and data hashes, and the problem's size."""
    model = str(problem.get("model", "model"))
    parts = [f"{model}  (model {short(problem.get('model_sha256'))}, data {short(problem.get('data_sha256'))})"]
    if problem.get("num_params") is not None:
        parts.append(f"P = {problem['num_params']:,}, n = {problem.get('num_examples', 0):,}, loss {problem.get('loss')}")
    if problem.get("step") is not None:
        parts.append(f"step {problem['step']}")
    return "\n".join([parts[0], ", ".join(parts[1:])]) if len(parts) > 1 else parts[0]


def _draw(group: str, ax: Any, analysis: dict[str, Any], fig: Any) -> None:
    if group == "landscape":
        PANELS[group](ax, analysis, fig)
    else:
        PANELS[group](ax, analysis)


def report_figure(report: dict[str, Any]) -> Any:
    """A figure with one panel per analysis group of ``report`` that has a panel
    (:data:`basins.cli.figures.panels.PANELS`); the others are named in a caption.

    Returns the matplotlib figure, or None when no group has a panel.
    """
    plt = pyplot()
    groups = [g for g in PANELS if g in report.get("analyses", {})]
    if not groups:
        return None
    cols = 1 if len(groups) == 1 else 2
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.9 * rows + 0.6), squeeze=False)
    for ax, group in zip(axes.ravel(), groups):
        _draw(group, ax, report["analyses"][group], fig)
    for ax in axes.ravel()[len(groups):]:
        ax.set_visible(False)
    others = [g for g in report.get("analyses", {}) if g not in PANELS]
    fig.suptitle(title(report.get("problem", {})), fontsize=9.5)
    if others:
        fig.text(0.01, 0.005, "not drawn: " + ", ".join("/" + g for g in others) + " (see basins summary)",
                 fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    return fig


def group_figure(group: str, analysis: dict[str, Any], problem: dict[str, Any] | None = None) -> Any:
    """One group's panel as a figure (``basins spectrum --plot``, ``basins volume --plot``)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _draw(group, ax, analysis, fig)
    if problem:
        fig.suptitle(title(problem), fontsize=8.5)
    fig.tight_layout()
    return fig
