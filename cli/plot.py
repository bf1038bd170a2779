"""``basins plot REPORT... -o FIG``: one report's analyses as panels, or several reports against step."""

from __future__ import annotations

from typing import Any

import click

from .common import _set_debug, stderr_console


@click.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The figure: .png, .pdf or .svg (written atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No logs on stderr.")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
              callback=_set_debug,
              help="Show a traceback on errors.")
def plot(reports: tuple[str, ...], output: str, quiet: bool) -> None:
    """Draw a report's analyses, or several reports against training step.

    One REPORT: a panel per analysis group present: the Hessian eigenvalues with their error
    bounds, the spectral density with its band, the nullity ladder, the feature spectrum, the
    volume ladder with its intervals, the wall profile, the LLC chains, the landscape curve or
    contours. Several REPORTs (checkpoints): λ_max, the trace, the nullity at each rtol, log
    volume at each ε, the LLC and the log evidence against the step recorded in each report (or
    the number in the model's file name), with error bars.

    \b
    Examples:
      basins plot report.h5 -o report.png
      basins hessian ckpts/ --data d.pt -o runs/ && basins plot runs/*.h5 -o trajectory.pdf
    """
    from basins.errors import InputError
    from basins.files.report import read_report

    from .figures.layout import report_figure
    from .figures.style import figure_format, require_matplotlib, save
    from .figures.trajectory import trajectory_figure

    figure_format(output)
    require_matplotlib()
    log = stderr_console(quiet)
    data: list[dict[str, Any]] = [read_report(path) for path in reports]
    fig = report_figure(data[0]) if len(data) == 1 else trajectory_figure(data)
    if fig is None:
        groups = sorted({g for d in data for g in d.get("analyses", {})})
        raise InputError(f"nothing to draw: {'the report holds' if len(data) == 1 else 'the reports hold'} "
                         f"{', '.join('/' + g for g in groups) or 'no analysis'}; run hessian, spectrum, nullity, "
                         "features, volume, llc, evidence or landscape with -o first")
    save(fig, output)
    log.print(f"wrote {output}")
