"""``basins plot REPORT... -o FIG.png|pdf|svg``: draw a report's analyses, or several reports
against training step.

The panels live in :mod:`basins.cli.figures`; this module checks the options, reads the reports,
and writes the figure atomically. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

from typing import Any

import click

from .common import _set_debug, stderr_console


@click.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="The figure; its extension picks the format: .png, .pdf or .svg. Written atomically.")
@click.option("--dpi", type=click.IntRange(min=30, max=1200), default=None,
              help="Resolution of a .png. [default: 110]")
@click.option("-q", "--quiet", is_flag=True, help="No notes on stderr.")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show a traceback on errors.")
def plot(reports: tuple[str, ...], output_path: str, dpi: int | None, quiet: bool) -> None:
    """Draw REPORT(s) to a figure (needs matplotlib: pip install 'basins[plot]').

    One report: a panel per analysis (spectral density with its band, extreme eigenvalues
    with error bounds, the nullity ladder, the feature spectrum, the volume ladder with CIs,
    wall profiles, LLC chains, landscape curves or contours, per-block λ_max, evidence terms),
    titled with the model and short model/data hashes. Groups without a panel are noted on
    stderr and skipped.

    Several reports (checkpoints): λ_max, trace, nullity at each rtol, log-volume, LLC and
    log evidence against training step, each with the error bar its report stores. The step
    is /problem's `step` when every report has one, else the digits in the model file name,
    else the report's position.

    The format follows the extension of -o (.png, .pdf, .svg); the file is written atomically
    and deterministically. spectrum --plot and volume --plot draw with the same panels. No
    HVPs: reports are read, torch is not imported.

    \b
    Examples:
      basins plot report.h5 -o report.png
      basins plot runs/ckpt_*.h5 -o trajectory.pdf
    """
    from basins.files.report import read_report

    from .figures.style import DPI, figure_format, figure_style, require_matplotlib, save_figure

    figure_format(output_path)
    require_matplotlib()
    log = stderr_console(quiet)
    data = [read_report(path) for path in reports]
    debug = bool(click.get_current_context().meta.get("basins.debug"))
    notes: list[str] = []
    with figure_style():
        fig = _figure(data, notes, debug)
        save_figure(fig, output_path, dpi=dpi or DPI)
    for line in notes:
        log.print(f"note: {line}")
    log.print(f"wrote {output_path}")


def _figure(data: list[dict[str, Any]], notes: list[str], debug: bool) -> Any:
    from .figures.layout import report_figure
    from .figures.trajectory import trajectory_figure

    if len(data) == 1:
        return report_figure(data[0], notes, debug=debug)
    return trajectory_figure(data)
