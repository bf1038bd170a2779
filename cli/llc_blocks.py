"""Renderers of a report's ``/llc_blocks`` group (``basins llc --per-block``): one row per block
(block, P, weight-refined λ̂ ± se, 95% interval, converged)."""

from __future__ import annotations

from typing import Any

from rich.console import RenderableType
from rich.table import Table

from .common import column, fmt, largest_block_row


def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """The per-block LLC table."""
    a = analysis.get("attrs", {})
    t = Table(title=f"weight-refined LLC per block (Wang et al. 2024); blocks: {a.get('blocks')}",
              title_justify="left")
    for col in ("block", "P", "λ̂ ± se", "95% interval", "converged"):
        t.add_column(col, justify="left" if col == "block" else "right")
    cols = [column(analysis, n) for n in ("block_num_params", "llc", "llc_stderr", "llc_ci_low", "llc_ci_high",
                                         "converged")]
    for name, p, v, se, lo, hi, ok in zip(list(a.get("block_names") or []), *cols):
        t.add_row(str(name), f"{int(p):,}", f"{fmt(v, 4)} ± {fmt(se, 2)}", f"[{fmt(lo, 4)}, {fmt(hi, 4)}]",
                  "yes" if ok else "no")
    return [t]



def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view: the number of blocks and the block with the largest λ̂."""
    return largest_block_row(analysis, "llc", "LLC blocks", "largest block LLC", "", 4)
