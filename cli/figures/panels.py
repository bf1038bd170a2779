"""One panel per analysis group: ``PANELS[group](ax, analysis)`` draws the group on ``ax``.

``analysis`` is a report group as :func:`basins.files.report.read_report` returns it
(``{"attrs", "datasets": {name: {"values", "units", ...}}, "groups"}``). Axes carry units (the
datasets' own), log scales where the data span decades (symlog where values can be ≤ 0), and
legends. Groups without a panel (``/evidence``, ``/hessian_blocks``) are listed in the figure's
caption instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from basins.record import EIGEN_UNITS


def values(analysis: dict[str, Any], name: str) -> np.ndarray | None:
    """Dataset ``name`` as a float array (None where absent)."""
    ds = analysis.get("datasets", {}).get(name)
    if ds is None:
        return None
    return np.asarray(ds["values"], dtype=float)


def units(analysis: dict[str, Any], name: str, default: str | None = None) -> str | None:
    ds = analysis.get("datasets", {}).get(name)
    return (ds or {}).get("units") or default


def _label(text: str, unit: str | None) -> str:
    return f"{text} ({unit})" if unit and unit != text else text


def _axis_unit(attrs: dict[str, Any]) -> str | None:
    """A short unit for landscape axes."""
    d = attrs.get("directions")
    return {"random": "filter-normalised", "top": "parameter distance"}.get(str(d), None)


def spans_decades(v: Any, decades: float = 2.0) -> bool:
    """Whether the positive finite values of ``v`` span more than ``decades`` decades."""
    a = np.asarray(v, dtype=float).ravel()
    a = a[np.isfinite(a) & (a > 0)]
    return a.size > 1 and math.log10(float(a.max()) / float(a.min())) > decades


def value_scale(ax: Any, v: Any, axis: str = "y") -> None:
    """log when every value is positive and they span decades; symlog when they span decades
    and some are ≤ 0; else linear."""
    a = np.asarray(v, dtype=float).ravel()
    a = a[np.isfinite(a)]
    if a.size < 2:
        return
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    nonzero = np.abs(a[a != 0])
    if (a > 0).all() and spans_decades(a):
        setter("log")
    elif nonzero.size > 1 and (a <= 0).any() and math.log10(float(nonzero.max()) / float(nonzero.min())) > 2:
        setter("symlog", linthresh=float(np.quantile(nonzero, 0.1)))


def hessian(ax: Any, a: dict[str, Any]) -> None:
    """Ritz values against their index, with error-bound bars (the residuals where no bound is stored)."""
    unit = units(a, "eigenvalues", EIGEN_UNITS)
    drawn = []
    for prefix, label, marker in (("", "top", "o"), ("bottom_", "bottom", "s")):
        lam = values(a, prefix + "eigenvalues")
        if lam is None:
            continue
        if prefix == "" and a.get("attrs", {}).get("which") == "bottom":
            label, marker = "bottom", "s"
        err = values(a, prefix + "error_bounds")
        err = values(a, prefix + "residuals") if err is None else err
        idx = np.arange(1, lam.size + 1)
        ax.errorbar(idx, lam, yerr=err, fmt=marker, ms=3.5, capsize=2.5, label=f"{label} (± error bound)")
        drawn.append(lam)
    if drawn:
        value_scale(ax, np.concatenate(drawn))
    ax.set_xlabel("index (1 = most extreme)")
    ax.set_ylabel(_label("eigenvalue λ", unit))
    tr = a.get("attrs", {}).get("trace")
    title = "Hessian eigenvalues (Lanczos)"
    if isinstance(tr, (int, float)) and math.isfinite(tr):
        se = a["attrs"].get("trace_stderr")
        title += f"; trace {tr:.4g}" + (f" ± {se:.2g}" if isinstance(se, (int, float)) else "")
    ax.set_title(title)
    ax.legend(loc="best")


def spectrum(ax: Any, a: dict[str, Any]) -> None:
    """The smoothed spectral density with its pointwise band across probes."""
    grid, dens = values(a, "grid"), values(a, "density")
    if grid is None or dens is None:
        return
    lo, hi = values(a, "density_lower"), values(a, "density_upper")
    attrs = a.get("attrs", {})
    if lo is not None and hi is not None:
        cover = attrs.get("coverage")
        band = f"{cover:.0%} band across probes" if isinstance(cover, (int, float)) else "band across probes"
        ax.fill_between(grid, np.maximum(lo, 0), hi, alpha=0.3, lw=0, label=band)
    ax.plot(grid, dens, label="density (mean over probes)")
    top = float(np.nanmax(hi if hi is not None else dens))
    if top > 0:
        ax.set_yscale("log")
        ax.set_ylim(top * 1e-8, top * 2)
    log_grid = attrs.get("scale") == "log"
    ax.set_xlabel("log10 |λ|  (λ in " + EIGEN_UNITS + ")" if log_grid else _label("λ", units(a, "grid", EIGEN_UNITS)))
    ax.set_ylabel("density per decade" if log_grid else _label("density", units(a, "density")))
    ax.set_title(f"spectral density (SLQ, {attrs.get('num_probes', '?')} probes × {attrs.get('num_steps', '?')} steps)")
    ax.legend(loc="best")


def _ladder(ax: Any, x: Any, y: Any, lo: Any, hi: Any, label: str) -> None:
    y = np.asarray(y, dtype=float)
    yerr = None
    if lo is not None and hi is not None:
        yerr = np.vstack([np.clip(y - np.asarray(lo, dtype=float), 0, None), np.clip(np.asarray(hi, dtype=float) - y, 0, None)])
    ax.errorbar(x, y, yerr=yerr, fmt="o-", ms=3.5, capsize=2.5, label=label)


def nullity(ax: Any, a: dict[str, Any]) -> None:
    """The count of near-zero eigenvalues against the threshold, with its interval."""
    t, c = values(a, "threshold"), values(a, "count")
    if t is None or c is None:
        return
    _ladder(ax, t, c, values(a, "count_lower"), values(a, "count_upper"), f"#{{|λ| ≤ t}} ({a.get('attrs', {}).get('method')})")
    if (t > 0).all():
        ax.set_xscale("log")
    ax.set_xlabel(_label("threshold t = rtol·λ_max + atol", units(a, "threshold", EIGEN_UNITS)))
    ax.set_ylabel("flat directions (count of eigenvalues)")
    ax.set_title("nullity ladder")
    ax.legend(loc="best")


def features(ax: Any, a: dict[str, Any]) -> None:
    """The feature Gram spectrum (descending), with the rank ladder's thresholds."""
    ev = values(a, "eigenvalues")
    if ev is None:
        return
    pos = ev[np.isfinite(ev) & (ev > 0)]
    ax.plot(np.arange(1, pos.size + 1), pos, label="Gram eigenvalues")
    for r in a.get("attrs", {}).get("ranks") or []:
        if isinstance(r, dict) and isinstance(r.get("threshold"), (int, float)) and r["threshold"] > 0:
            ax.axhline(r["threshold"], ls="--", lw=0.8, color="gray")
            ax.annotate(f"rank {r.get('rank')} at rtol {r.get('rtol'):g}", (1, r["threshold"]), fontsize=7,
                        va="bottom", color="dimgray")
    if pos.size > 1:
        ax.set_yscale("log")
    if pos.size > 50:
        ax.set_xscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel(_label("eigenvalue", units(a, "eigenvalues", EIGEN_UNITS)))
    ax.set_title("feature (Gauss–Newton) spectrum")
    ax.legend(loc="best")


def volume(ax: Any, a: dict[str, Any]) -> None:
    """log V(ε) against ε with error bars; a lower bound is drawn as an upward triangle."""
    attrs = a.get("attrs", {})
    eps = values(a, "epsilon")
    eps = np.asarray(attrs.get("epsilon", []), dtype=float) if eps is None else eps
    logv = np.asarray(attrs.get("log_volume") or [], dtype=float)
    if eps.size == 0 or logv.size != eps.size:
        return
    lo = np.asarray([math.nan if v is None else v for v in attrs.get("ci_lower") or [None] * eps.size], dtype=float)
    hi = np.asarray([math.nan if v is None else v for v in attrs.get("ci_upper") or [None] * eps.size], dtype=float)
    se = np.asarray([math.nan if v is None else v for v in attrs.get("log_volume_se") or [None] * eps.size], dtype=float)
    lo = np.where(np.isfinite(lo), lo, logv - 1.96 * np.nan_to_num(se))
    hi = np.where(np.isfinite(hi), hi, logv + 1.96 * np.nan_to_num(se))
    bound = np.asarray(attrs.get("is_lower_bound") or [False] * eps.size, dtype=bool)
    level = attrs.get("ci_level", 0.95)
    ax.errorbar(eps[~bound], logv[~bound], yerr=[logv[~bound] - lo[~bound], hi[~bound] - logv[~bound]], fmt="o-",
                ms=3.5, capsize=2.5, label=f"log V ({level:.0%} interval)")
    if bound.any():
        ax.plot(eps[bound], logv[bound], "^", ms=6, label="lower bound")
    ax.set_xscale("log")
    ax.set_xlabel(_label("loss rise ε", units(a, "epsilon", "loss units")))
    ax.set_ylabel("log volume (nats, parameter units)")
    ax.set_title(f"basin volume ({attrs.get('family', '')}, {attrs.get('num_rays', '?')} rays)")
    ax.legend(loc="best")


def walls(ax: Any, a: dict[str, Any]) -> None:
    """Median wall profile C/ε against t with 5–95% and 25–75% bands, one line per family (log-log)."""
    eps = a.get("attrs", {}).get("walls_epsilon")
    drawn = False
    for name, g in sorted(a.get("groups", {}).items()):
        t, q = values(g, "t"), values(g, "profile_quantiles")
        if t is None or q is None or q.shape[0] != 5:
            continue
        line = ax.plot(t, q[2], label=f"{name} (median)")[0]
        ax.fill_between(t, q[0], q[4], alpha=0.15, color=line.get_color(), lw=0)
        ax.fill_between(t, q[1], q[3], alpha=0.3, color=line.get_color(), lw=0)
        drawn = True
    if not drawn:
        return
    tt = np.asarray(values(next(iter(a["groups"].values())), "t"))
    for p, style in ((2, ":"), (4, "--")):
        ax.plot(tt, tt**p, style, color="gray", lw=0.8, label=f"t^{p}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t = distance / wall radius r(u)")
    ax.set_ylabel(f"C / ε   (ε = {eps:g})" if isinstance(eps, (int, float)) else "C / ε")
    ax.set_title("basin walls: L(θ* + t·r(u)·u) − L(θ*)")
    ax.legend(loc="best")


def llc(ax: Any, a: dict[str, Any]) -> None:
    """Minibatch loss per chain against SGLD step, burn-in shaded, with λ̂ ± s.e. in the title."""
    trace = values(a, "loss_trace")
    if trace is None or trace.ndim != 2:
        return
    attrs = a.get("attrs", {})
    burn = int(attrs.get("num_burnin") or 0)
    steps = np.arange(trace.shape[1])
    for i, row in enumerate(trace):
        ax.plot(steps, row, lw=0.8, label=f"chain {i}" if trace.shape[0] <= 8 else None)
    if burn:
        ax.axvspan(0, burn, color="gray", alpha=0.15, lw=0, label="burn-in")
    ax.set_xlabel("SGLD step")
    ax.set_ylabel(_label("minibatch loss L_B(w)", units(a, "loss_trace", "loss")))
    est, se = attrs.get("llc"), attrs.get("llc_stderr")
    title = "LLC chains"
    if isinstance(est, (int, float)):
        title += f": λ̂ = {est:.4g}" + (f" ± {se:.2g}" if isinstance(se, (int, float)) else "")
    ax.set_title(title)
    if trace.shape[0] <= 8 or burn:
        ax.legend(loc="best", ncol=2)


def landscape(ax: Any, a: dict[str, Any], fig: Any = None) -> None:
    """A curve (1-D slice, line between checkpoints) or filled contours (2-D slice)."""
    attrs = a.get("attrs", {})
    loss = values(a, "loss")
    if loss is None:
        return
    axis_unit = _axis_unit(attrs)
    if attrs.get("kind") == "2d":
        x, y = values(a, "x"), values(a, "y")
        if x is None or y is None:
            return
        z = np.log10(np.clip(loss, 1e-300, None)) if spans_decades(loss) and (loss > 0).all() else loss
        cs = ax.contourf(x, y, z.T, levels=20, cmap="viridis")
        ax.contour(x, y, z.T, levels=10, colors="k", linewidths=0.4)
        ax.plot([0], [0], "w*", ms=9, mec="k", label="θ*")
        if fig is not None:
            fig.colorbar(cs, ax=ax, label="log10 loss" if z is not loss else "loss")
        ax.set_xlabel(_label("direction 1", axis_unit))
        ax.set_ylabel(_label("direction 2", axis_unit))
        ax.set_title(f"loss on a 2-D slice ({attrs.get('directions')} directions)")
        ax.legend(loc="upper right")
        return
    t = values(a, "t")
    if t is None:
        return
    ax.plot(t, loss, "o-", ms=2.5, label="L")
    if attrs.get("kind") == "line":
        bt, b = attrs.get("barrier_t"), attrs.get("barrier")
        ends = max(attrs.get("loss_a") or -math.inf, attrs.get("loss_b") or -math.inf)
        if isinstance(bt, (int, float)) and isinstance(b, (int, float)):
            ax.plot([bt], [ends + b], "rv", ms=7, label=f"barrier {b:.3g} at t = {bt:.3f}")
            ax.axhline(ends, ls="--", lw=0.8, color="gray", label="max(L(θa), L(θb))")
        ax.set_xlabel("t: θ(t) = (1 − t)·θa + t·θb")
        ax.set_title("loss on the line between two checkpoints")
    else:
        ax.axvline(0, ls=":", lw=0.8, color="gray")
        ax.set_xlabel(_label(f"t along the {attrs.get('directions')} direction", axis_unit))
        ax.set_title(f"loss on a 1-D slice ({attrs.get('directions')} direction)")
    value_scale(ax, loss)
    ax.set_ylabel(_label("loss", units(a, "loss")))
    ax.legend(loc="best")


#: group name -> panel; the order is the figure's
PANELS: dict[str, Callable[..., None]] = {
    "hessian": hessian, "spectrum": spectrum, "nullity": nullity, "features": features,
    "volume": volume, "walls": walls, "llc": llc, "landscape": landscape,
}
