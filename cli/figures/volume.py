"""Panel for ``/volume``: the probed log-volume of the basin against the loss rise ε.

One series per ray family: log V with its bootstrap CI as bars where the report has one; where
the effective sample size was too small the estimate is a lower bound, drawn as an upward
triangle. The Jensen bound mean(d·log r) + log V_ball(d) (with its s.e.) and the quadratic
(Hessian) baseline are drawn where stored. Natural logs throughout (nats).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .data import attr, number
from .style import empty, set_scale

TITLE = "basin volume by random probing"


def _column(a: dict[str, Any], key: str, size: int) -> np.ndarray:
    v = a.get(key)
    if not isinstance(v, list):
        return np.full(size, np.nan)
    out = [number(x) for x in v[:size]] + [None] * max(0, size - len(v))
    return np.array([np.nan if x is None else x for x in out], dtype=float)


def families(analysis: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per ray family its summary keys (``log_volume``, ``ci_lower``, ``ci_upper``,
    ``is_lower_bound``, ``jensen_bound``, ...): the ``families`` attribute, else the primary
    family's top-level attributes."""
    fams = attr(analysis, "families")
    if isinstance(fams, dict) and fams:
        return {str(k): v for k, v in fams.items() if isinstance(v, dict)}
    a = {k: attr(analysis, k) for k in analysis.get("attrs", {})}
    return {str(a.get("family") or "isotropic"): a}


def draw(ax: Any, analysis: dict[str, Any], problem: dict[str, Any]) -> None:
    """log V (± CI, ▲ = lower bound) against ε per family; Jensen bound and quadratic baseline."""
    eps_raw = attr(analysis, "epsilon")
    eps = np.array([number(e) if number(e) is not None else np.nan for e in eps_raw], dtype=float) \
        if isinstance(eps_raw, list) else np.array([])
    if eps.size == 0:
        empty(ax, TITLE, "no ε ladder stored")
        return
    n = eps.size
    shown: list[np.ndarray] = []
    for i, (name, f) in enumerate(families(analysis).items()):
        color = f"C{i}"
        lv, lo, hi = _column(f, "log_volume", n), _column(f, "ci_lower", n), _column(f, "ci_upper", n)
        lower = np.array([bool(x) for x in (f.get("is_lower_bound") or [False] * n)][:n] + [False] * max(
            0, n - len(f.get("is_lower_bound") or [False] * n)))
        d = f.get("dimension")
        tag = f"{name}" + (f", d = {d:,}" if isinstance(d, int) else "")
        ok = np.isfinite(lv) & ~lower
        if ok.any():
            err = np.vstack([np.where(np.isfinite(lo), lv - lo, 0), np.where(np.isfinite(hi), hi - lv, 0)])[:, ok]
            ax.errorbar(eps[ok], lv[ok], yerr=np.clip(err, 0, None), fmt="o", color=color,
                        label=f"log V [95% CI] ({tag})")
        lb = np.isfinite(lv) & lower
        if lb.any():
            ax.plot(eps[lb], lv[lb], "^", color=color, label=f"log V ≥ (lower bound: small ESS) ({tag})")
        ax.plot(eps[np.isfinite(lv)], lv[np.isfinite(lv)], "-", color=color, lw=0.8, alpha=0.6)
        jb, jse = _column(f, "jensen_bound", n), _column(f, "jensen_bound_se", n)
        if np.isfinite(jb).any():
            m = np.isfinite(jb)
            ax.errorbar(eps[m], jb[m], yerr=np.where(np.isfinite(jse), jse, 0)[m], fmt="x--", color=color,
                        lw=0.8, alpha=0.7, label=f"Jensen bound ± s.e. ({name})")
            shown.append(jb[m])
        shown += [lv, lo, hi]
    q = attr(analysis, "quadratic")
    if isinstance(q, dict) and isinstance(q.get("log_volume"), list):
        qv = _column(q, "log_volume", n)
        if np.isfinite(qv).any():
            ax.plot(eps, qv, ":", color="0.3", label=f"quadratic baseline (d = {q.get('dimension')})")
            shown.append(qv)
    if (eps > 0).all():
        ax.set_xscale("log")
    set_scale(ax, "y", np.concatenate(shown) if shown else [])
    ax.set_xlabel("loss rise ε [loss units]")
    ax.set_ylabel("log V [nats; V in parameter units^d]")
    ax.set_title(TITLE + (f" ({attr(analysis, 'num_rays')} rays)" if attr(analysis, "num_rays") else ""))
    ax.legend(loc="best", fontsize=6.5)
