"""Look and output of every basins figure: one style, axis scales chosen from the data, titles,
and atomic, deterministic writes.

Deterministic: matplotlib's default style with the DejaVu Sans font it bundles, a fixed size and
dpi, ``svg.hashsalt`` fixed, and no dates in PDF/SVG metadata, so the same data give the same
pixels (tests compare with committed baselines) and the same bytes for a given matplotlib version.
Figures are :class:`matplotlib.figure.Figure` objects made without pyplot: no global backend
state, nothing shown, nothing left open.

Imports matplotlib only inside functions; :func:`require_matplotlib` turns its absence into an
:class:`~basins.errors.InputError` (exit 2).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from basins.errors import InputError

#: output formats by file extension (``-o FIG.png|pdf|svg``)
FORMATS = ("png", "pdf", "svg")
#: inches of one panel (width, height), and the most panels in a row
PANEL_SIZE = (5.0, 3.6)
MAX_COLUMNS = 2
#: raster resolution of PNG output
DPI = 110
MISSING = "needs matplotlib, which is not installed: pip install 'basins[plot]'"

_RC: dict[str, Any] = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "legend.fontsize": 7.5,
    "legend.framealpha": 0.85,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.4,
    "lines.markersize": 4.5,
    "errorbar.capsize": 2.5,
    "svg.hashsalt": "basins",
    "svg.fonttype": "path",
    "pdf.fonttype": 42,
    "savefig.dpi": DPI,
    "figure.dpi": DPI,
}


def require_matplotlib(what: str = "basins plot") -> None:
    """Raise :class:`InputError` ``"<what> needs matplotlib, which is not installed: ..."`` when
    matplotlib cannot be imported (it is the optional extra ``basins[plot]``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise InputError(f"{what} {MISSING}") from exc


def figure_format(path: str, option: str = "-o") -> str:
    """The output format named by ``path``'s extension; :class:`InputError` for any other."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in FORMATS:
        shown = f".{ext}" if ext else "no extension"
        raise InputError(f"{option}: {path!r} has {shown}; a figure is written as one of "
                         + ", ".join("." + f for f in FORMATS))
    return ext


@contextmanager
def figure_style() -> Iterator[None]:
    """matplotlib's defaults plus basins' settings, for the duration of one figure."""
    import matplotlib

    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        params: Any = matplotlib.rcParams  # typed with literal keys; ours are checked by the tests
        params.update(_RC)
        yield


def new_figure(num_panels: int, columns: int = MAX_COLUMNS) -> tuple[Any, list[Any]]:
    """A figure of ``num_panels`` axes on a grid at most ``columns`` wide (fixed panel size,
    constrained layout). Returns ``(figure, axes)``; spare grid cells are removed."""
    from matplotlib.figure import Figure

    n = max(1, num_panels)
    cols = min(n, columns)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows + 0.35), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n]


def save_figure(fig: Any, path: str, dpi: int = DPI) -> None:
    """Write ``fig`` to ``path`` in the format of its extension, atomically: a temporary file in the
    same directory, then ``os.replace``; on any failure the temporary is removed and ``path`` is
    left as it was. PDF/SVG metadata carry no date, so equal figures give equal files."""
    fmt = figure_format(path)
    metadata: dict[str, Any] = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None},
                                "svg": {"Date": None}}[fmt]
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".{fmt}.tmp", dir=folder)
    try:
        from basins.files.report import file_mode

        os.chmod(tmp, file_mode(path))  # mkstemp makes 0600: keep the old figure's mode, else the umask's
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format=fmt, dpi=dpi, metadata=metadata)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------- scales and labels
def finite(values: Any) -> np.ndarray:
    """The finite entries of ``values`` as a flat float64 array."""
    v = np.asarray(values, dtype=float).ravel()
    return v[np.isfinite(v)]


def set_scale(ax: Any, axis: str, values: Any, decades: float = 2.0, linthresh: float | None = None) -> str:
    """Pick the scale of ``ax``'s ``axis`` ("x" or "y") from the values it shows: ``log`` when all
    are > 0 and they span more than ``decades`` decades, ``symlog`` when some are ≤ 0 and the
    nonzero magnitudes span that much (linear within ``linthresh``, default the smallest nonzero
    magnitude), else ``linear``. Returns the scale chosen."""
    v = finite(values)
    setter = ax.set_xscale if axis == "x" else ax.set_yscale
    nonzero = np.abs(v[v != 0])
    if v.size == 0 or nonzero.size == 0:
        return "linear"
    span = math.log10(float(nonzero.max()) / float(nonzero.min()))
    if span <= decades:
        return "linear"
    if (v > 0).all():
        setter("log")
        return "log"
    setter("symlog", linthresh=float(linthresh) if linthresh and linthresh > 0 else float(nonzero.min()))
    return "symlog"


def unit_label(name: str, units: str | None) -> str:
    """``"name [units]"``, or ``name`` alone when there are no units; a long unit text is cut at
    its first parenthesis (``"filter-normalised units (t = 1 moves ...)"`` → ``"filter-normalised units"``)."""
    if units and len(units) > 30 and " (" in units:
        units = units.split(" (", 1)[0]
    return f"{name} [{units}]" if units else name


def short_hash(h: Any, n: int = 8) -> str:
    """The first ``n`` characters of a sha256, or ``-``."""
    return str(h)[:n] if h else "-"


def report_title(problem: dict[str, Any], narrow: bool = False) -> str:
    """``model (P = …, n = …) · model sha256 abcd1234 · data sha256 ef567890`` for one report (on two
    lines when ``narrow``: a figure one panel wide)."""
    model = os.path.basename(str(problem.get("model") or "model"))
    size = []
    if isinstance(problem.get("num_params"), int):
        size.append(f"P = {problem['num_params']:,}")
    if isinstance(problem.get("num_examples"), int):
        size.append(f"n = {problem['num_examples']:,}")
    if problem.get("step") is not None:
        size.append(f"step {problem['step']}")
    head = f"{model} ({', '.join(size)})" if size else model
    return (f"{head}{chr(10) if narrow else '  ·  '}model sha256 {short_hash(problem.get('model_sha256'))}"
            f"  ·  data sha256 {short_hash(problem.get('data_sha256'))}")


def shared(values: Sequence[Any]) -> Any:
    """The one value all of ``values`` share, else None."""
    distinct = {str(v) for v in values}
    return values[0] if len(distinct) == 1 else None


def note(ax: Any, text: str, loc: str = "lower left") -> None:
    """A small grey note inside an axes corner."""
    x, ha = (0.02, "left") if "left" in loc else (0.98, "right")
    y, va = (0.03, "bottom") if "lower" in loc else (0.97, "top")
    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=7, color="0.3",
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.8", "alpha": 0.85})


def empty(ax: Any, title: str, text: str) -> None:
    """A panel that says why it has nothing to draw."""
    ax.set_title(title)
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def block_bars(ax: Any, analysis: dict[str, Any], key: str, title: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A per-block panel's ``(x positions, values of dataset key)``, with the block names as tick
    labels; None (and an :func:`empty` panel) when the group stores no value per block."""
    from .data import attr, values

    names = attr(analysis, "block_names")
    lam = values(analysis, key)
    if not isinstance(names, list) or lam is None or lam.size != len(names) or not names:
        empty(ax, title, "no per-block values stored")
        return None
    x = np.arange(len(names))
    ax.set_xticks(x, [str(n) for n in names], rotation=30, ha="right", fontsize=7)
    return x, lam
