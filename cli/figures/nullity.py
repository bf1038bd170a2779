"""Panel for ``/nullity``: the count of near-zero eigenvalues at each threshold of the ladder.

``#{|λ| ≤ rtol·λ_max + atol}`` against rtol (log axis), with the stored interval of each count
as bars (for ``slq`` an estimate and its interval). P is drawn as a ceiling when the report
knows it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .data import attr, number, values
from .style import empty, set_scale

TITLE = "near-zero Hessian eigenvalues"


def ladder(analysis: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """``(rtol, count, count_lower, count_upper)`` from the datasets, or from the ``counts``
    attribute of reports that have only that; None when there is no ladder."""
    rtol, count = values(analysis, "rtol"), values(analysis, "count")
    if rtol is not None and count is not None and rtol.size:
        lo, hi = values(analysis, "count_lower"), values(analysis, "count_upper")
        return rtol, count, count if lo is None else lo, count if hi is None else hi
    counts = attr(analysis, "counts")
    if not isinstance(counts, list) or not counts:
        return None
    rows = [c for c in counts if isinstance(c, dict) and number(c.get("count")) is not None]
    if not rows:
        return None
    get = lambda key, fallback: np.array([number(c.get(key)) if number(c.get(key)) is not None  # noqa: E731
                                          else number(c.get(fallback)) for c in rows], dtype=float)
    return get("rtol", "rtol"), get("count", "count"), get("count_lower", "count"), get("count_upper", "count")


def draw(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """Counts against rtol with their intervals; P as a dashed ceiling."""
    rows = ladder(analysis)
    if rows is None:
        empty(ax, TITLE, "no threshold ladder stored")
        return
    rtol, count, lo, hi = rows
    order = np.argsort(rtol)
    rtol, count, lo, hi = rtol[order], count[order], lo[order], hi[order]
    method = attr(analysis, "method") or "?"
    err = np.vstack([np.clip(count - lo, 0, None), np.clip(hi - count, 0, None)])
    ax.errorbar(rtol, count, yerr=err, fmt="o-", label=f"count [interval] ({method})")
    P = problem.get("num_params")
    shown = [count, lo, hi]
    if isinstance(P, int):
        ax.axhline(P, color="0.4", ls="--", lw=0.8, label=f"P = {P:,}")
        shown.append(np.array([P], dtype=float))
    if (rtol > 0).all():
        ax.set_xscale("log")
    set_scale(ax, "y", np.concatenate(shown))
    atol = number(attr(analysis, "atol"))
    ax.set_xlabel("rtol (threshold = rtol·λ_max" + (f" + {atol:g})" if atol else ")"))
    ax.set_ylabel("count of |λ| ≤ threshold [eigenvalues]")
    lam = number(attr(analysis, "lambda_max"))
    ax.set_title(TITLE + (f" (λ_max = {lam:.4g})" if lam is not None else ""))
    ax.legend(loc="best")
