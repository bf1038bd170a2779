"""Renderers of a report's ``/hessian_blocks`` group (``basins hessian --per-block``) for ``basins summary``
and the command itself: one row per block (block, P, λ_max ± residual, trace ± s.e.)."""

from __future__ import annotations

from typing import Any

from rich.console import RenderableType
from rich.table import Table

from basins.record import EIGEN_UNITS

from .common import column, fmt, largest_block_row


def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """The per-block table."""
    a = analysis.get("attrs", {})
    names = list(a.get("block_names") or [])
    t = Table(title=f"Hessian per block ({EIGEN_UNITS}); blocks: {a.get('blocks')}", title_justify="left")
    for col, just in (("block", "left"), ("P", "right"), ("λ_max ± residual", "right"), ("trace ± s.e.", "right"),
                      ("HVPs", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    cols = [column(analysis, n) for n in ("block_num_params", "lambda_max", "lambda_max_residual", "trace",
                                         "trace_stderr", "block_num_hvps")]
    for name, p, lam, r, tr, se, h in zip(names, *cols):
        t.add_row(str(name), f"{int(p):,}", f"{fmt(lam)} ± {float(r):.1e}", f"{fmt(tr)} ± {float(se):.1e}", str(h))
    return [t]


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view for ``basins summary`` of several reports: the block with the largest λ_max."""
    return largest_block_row(analysis, "lambda_max", "blocks", "stiffest block", "λ_max ", 5)
