"""matplotlib set-up: the optional import, a fixed deterministic style, and atomic saving."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from basins.errors import InputError

#: output formats, from the file's extension
FORMATS = ("png", "pdf", "svg")

#: a fixed style: the same pixels on every machine with the same matplotlib (fonts bundled with it)
RC: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9.0,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9.0,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.3,
    "savefig.dpi": 120,
    "figure.dpi": 120,
    "svg.hashsalt": "basins",
    "svg.fonttype": "path",
    "pdf.fonttype": 42,
    "path.simplify": False,
}


def require_matplotlib(what: str = "basins plot") -> None:
    """Raise :class:`InputError` (exit 2) naming the extra when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise InputError(f"{what} needs matplotlib, which is not installed: pip install 'basins[plot]'") from exc


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend with :data:`RC` applied."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcdefaults()
    for key, value in RC.items():
        matplotlib.rcParams[key] = value  # type: ignore[index]
    return plt


def figure_format(path: str, option: str = "-o") -> str:
    """The format of ``path`` from its extension; :class:`InputError` for anything but png, pdf, svg."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise InputError(f"{option}: {path} must end in .png, .pdf or .svg (the figure's format), not "
                         f"{'.' + ext if ext else 'no extension'}")
    return ext


def save(fig: Any, path: str, option: str = "-o") -> None:
    """Write ``fig`` to ``path`` atomically (a temporary file beside it, then ``os.replace``): no
    half-written figure is ever left at ``path``. Dates are left out of pdf and svg metadata so that
    the same figure gives the same bytes."""
    fmt = figure_format(path, option)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"{option}: the directory of {path} does not exist")
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None, "Producer": None},
                "svg": {"Date": None}}[fmt]
    fd, tmp = tempfile.mkstemp(prefix=f".basins-{os.getpid()}-", suffix=f".{fmt}.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, metadata=metadata)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # a normal file's mode, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def short(h: Any) -> str:
    """The first 8 hex digits of a hash, or '-'."""
    return str(h)[:8] if h else "-"
