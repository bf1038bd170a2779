"""The figure of several reports (checkpoints of one training run): each quantity against
training step, with the error bar its report stores.

Quantities (a panel each, when at least one report has it): λ_max ± error bound (``/hessian``),
trace ± s.e. (``/hessian``, else the SLQ trace of ``/spectrum``), nullity at each rtol with its
interval (``/nullity``), log-volume at each ε with its CI, lower bounds as ▲ (``/volume``),
LLC ± s.e. (``/llc``) and log evidence with its interval (``/evidence``).

The x axis is the ``step`` attribute of each report's ``/problem`` group when every report has
one, else the last run of digits in each problem's ``model`` file name when every name has one,
else the report's position in the list; the axis label says which.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from basins.errors import InputError
from basins.record import EIGEN_UNITS

from ..checkpoints import step_from_name
from . import nullity as nullity_panel
from . import volume as volume_panel
from .data import attr, number, values
from .style import new_figure, set_scale, shared, short_hash

NAN = float("nan")


@dataclass
class Series:
    """One line: y with its interval [lo, hi] (NaN: none) per report; ``lower`` marks lower bounds."""

    label: str
    y: list[float] = field(default_factory=list)
    lo: list[float] = field(default_factory=list)
    hi: list[float] = field(default_factory=list)
    lower: list[bool] = field(default_factory=list)

    def add(self, y: float | None, lo: float | None = None, hi: float | None = None, lower: bool = False) -> None:
        self.y.append(NAN if y is None else y)
        self.lo.append(NAN if lo is None else lo)
        self.hi.append(NAN if hi is None else hi)
        self.lower.append(lower)


@dataclass
class Quantity:
    """A panel: title, y label, its series (label → Series, padded to one entry per report)."""

    title: str
    ylabel: str
    series: dict[str, Series] = field(default_factory=dict)

    def at(self, label: str, index: int) -> Series:
        s = self.series.setdefault(label, Series(label))
        while len(s.y) < index:
            s.add(None)
        return s


def steps(reports: list[dict[str, Any]]) -> tuple[np.ndarray, str]:
    """The x value of each report and the axis label (see the module docstring)."""
    problems = [r.get("problem", {}) for r in reports]
    given = [p.get("step") for p in problems]
    if all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in given):
        return np.asarray(given, dtype=float), "training step"
    named = [step_from_name(str(p.get("model"))) if p.get("model") else None for p in problems]
    if all(s is not None for s in named):
        return np.asarray(named, dtype=float), "step (digits in the model file name)"
    return np.arange(len(reports), dtype=float), "report (position in the list)"


def _pm(y: float | None, err: float | None) -> tuple[float | None, float | None, float | None]:
    if y is None or err is None:
        return y, None, None
    return y, y - abs(err), y + abs(err)


def collect(reports: list[dict[str, Any]]) -> list[Quantity]:
    """The quantities of every report, one entry per report in every series (NaN where absent)."""
    q = {k: Quantity(*v) for k, v in {
        "lambda_max": ("λ_max ± error bound", f"λ_max [{EIGEN_UNITS}]"),
        "trace": ("Hessian trace ± s.e.", f"trace [{EIGEN_UNITS}]"),
        "nullity": ("near-zero eigenvalues [interval]", "count of |λ| ≤ rtol·λ_max [eigenvalues]"),
        "volume": ("probed log-volume [95% CI], ▲ lower bound", "log V [nats]"),
        "llc": ("local learning coefficient ± s.e.", "LLC λ̂ [dimensionless]"),
        "evidence": ("Laplace log evidence [interval]", "log p(D) [nats]"),
    }.items()}
    for i, r in enumerate(reports):
        an = r.get("analyses", {})
        h = an.get("hessian")
        if h is not None:
            lam = values(h, "eigenvalues")
            if lam is not None and lam.size and attr(h, "which") != "bottom":
                b = values(h, "error_bounds")
                if b is None:
                    b = values(h, "residuals")
                q["lambda_max"].at("Lanczos", i).add(*_pm(number(lam[0]), None if b is None else number(b[0])))
            if number(attr(h, "trace")) is not None:
                q["trace"].at(f"{attr(h, 'trace_method') or 'Hutchinson'} (/hessian)", i).add(
                    *_pm(number(attr(h, "trace")), number(attr(h, "trace_stderr"))))
        s = an.get("spectrum")
        if s is not None and number(attr(s, "trace")) is not None and (h is None or number(attr(h, "trace")) is None):
            q["trace"].at("SLQ (/spectrum)", i).add(*_pm(number(attr(s, "trace")), number(attr(s, "trace_stderr"))))
        n = an.get("nullity")
        rows = None if n is None else nullity_panel.ladder(n)
        if rows is not None:
            for rtol, c, lo, hi in zip(*rows):
                q["nullity"].at(f"rtol = {rtol:g}", i).add(float(c), float(lo), float(hi))
        v = an.get("volume")
        if v is not None:
            eps = attr(v, "epsilon") or []
            fams = volume_panel.families(v)
            fam = fams.get(str(attr(v, "family"))) or next(iter(fams.values()), {})
            for j, e in enumerate(eps):
                def col(key: str, j: int = j, fam: dict[str, Any] = fam) -> float | None:
                    x = fam.get(key)
                    return number(x[j]) if isinstance(x, list) and j < len(x) else None

                lb = fam.get("is_lower_bound")
                q["volume"].at(f"ε = {e:g}", i).add(col("log_volume"), col("ci_lower"), col("ci_upper"),
                                                    bool(lb[j]) if isinstance(lb, list) and j < len(lb) else False)
        ll = an.get("llc")
        if ll is not None and number(attr(ll, "llc")) is not None:
            q["llc"].at("SGLD", i).add(*_pm(number(attr(ll, "llc")), number(attr(ll, "llc_stderr"))))
        ev = an.get("evidence")
        if ev is not None and number(attr(ev, "log_evidence")) is not None:
            ci = attr(ev, "log_evidence_ci")
            lo, hi = (number(ci[0]), number(ci[1])) if isinstance(ci, list) and len(ci) == 2 else (None, None)
            q["evidence"].at(str(attr(ev, "method") or "Laplace"), i).add(number(attr(ev, "log_evidence")), lo, hi)
    for quantity in q.values():
        for s in quantity.series.values():
            while len(s.y) < len(reports):
                s.add(None)
    return [x for x in q.values() if any(np.isfinite(s.y).any() for s in x.series.values())]


def _draw(ax: Any, x: np.ndarray, quantity: Quantity, xlabel: str) -> None:
    order = np.argsort(x, kind="stable")
    shown: list[np.ndarray] = []
    for k, s in enumerate(quantity.series.values()):
        y, lo, hi = (np.asarray(a, dtype=float)[order] for a in (s.y, s.lo, s.hi))
        lower = np.asarray(s.lower, dtype=bool)[order]
        xs = x[order]
        ok = np.isfinite(y)
        color = f"C{k % 10}"
        ax.plot(xs[ok], y[ok], "-", color=color, lw=0.9, alpha=0.7)
        point = ok & ~lower
        err = np.vstack([np.where(np.isfinite(lo), y - lo, 0), np.where(np.isfinite(hi), hi - y, 0)])
        ax.errorbar(xs[point], y[point], yerr=np.clip(err[:, point], 0, None), fmt="o", color=color, label=s.label)
        if (ok & lower).any():
            ax.plot(xs[ok & lower], y[ok & lower], "^", color=color,
                    label=None if point.any() else f"{s.label} (lower bound)")
        shown += [y, lo, hi]
    set_scale(ax, "y", np.concatenate(shown))
    set_scale(ax, "x", x, decades=2.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(quantity.ylabel)
    ax.set_title(quantity.title)
    if len(quantity.series) > 1 or next(iter(quantity.series)) not in ("Lanczos", "SGLD"):
        ax.legend(loc="best")


def trajectory_title(reports: list[dict[str, Any]]) -> str:
    """``N reports · models a.pt … c.pt · model sha256 1234abcd … · data sha256 …``."""
    problems = [r.get("problem", {}) for r in reports]
    names = [os.path.basename(str(p.get("model") or "?")) for p in problems]
    models = names[0] if shared(names) is not None else f"{names[0]} … {names[-1]}"
    mh = [short_hash(p.get("model_sha256")) for p in problems]
    dh = [short_hash(p.get("data_sha256")) for p in problems]
    model_hash = mh[0] if shared(mh) is not None else f"{mh[0]} … {mh[-1]}"
    data_hash = dh[0] if shared(dh) is not None else "differs between reports"
    return f"{len(reports)} reports: {models}  ·  model sha256 {model_hash}  ·  data sha256 {data_hash}"


def trajectory_figure(reports: list[dict[str, Any]]) -> Any:
    """The figure of several reports, ordered by the x value of :func:`steps` (the title names the
    first and last in that order).

    Raises:
        InputError: no report holds a quantity drawn against step.
    """
    x, xlabel = steps(reports)
    order = np.argsort(x, kind="stable")
    reports, x = [reports[i] for i in order], x[order]
    quantities = collect(reports)
    if not quantities:
        raise InputError("no report holds a quantity to draw against step (λ_max or trace from /hessian, "
                         "/nullity, /volume, /llc or /evidence)")
    fig, axes = new_figure(len(quantities))
    for ax, quantity in zip(axes, quantities):
        _draw(ax, x, quantity, xlabel)
    fig.suptitle(trajectory_title(reports), fontsize=10)
    return fig
