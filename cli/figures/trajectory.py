"""Several reports (checkpoints of a training run) as quantities against training step."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from basins.record import EIGEN_UNITS

from .panels import spans_decades
from .style import pyplot, short


def steps(reports: list[dict[str, Any]]) -> tuple[list[float], str]:
    """The x values and their label: each report's ``step`` when all have one, else the last number
    in each model's file name when all have one, else the report's index."""
    recorded = [r.get("problem", {}).get("step") for r in reports]
    if all(isinstance(s, (int, float)) for s in recorded):
        return [float(s) for s in recorded], "training step"
    parsed = []
    for r in reports:
        name = os.path.basename(os.path.normpath(str(r.get("problem", {}).get("model", ""))))
        found = re.findall(r"\d+", name.split(".", 1)[0])
        parsed.append(float(found[-1]) if found else None)
    if all(p is not None for p in parsed):
        return [float(p) for p in parsed if p is not None], "training step (from the model file names)"
    return [float(i) for i in range(len(reports))], "report (in the order given)"


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _ds0(g: dict[str, Any], name: str) -> float:
    ds = g.get("datasets", {}).get(name)
    if ds is None:
        return math.nan
    v = np.asarray(ds["values"], dtype=float).ravel()
    return float(v[0]) if v.size else math.nan


# each: (title, y label, function report -> {series label: (value, lower error, upper error)})
Series = dict[str, tuple[float, float, float]]


def _lambda_max(r: dict[str, Any]) -> Series:
    g = r["analyses"].get("hessian")
    if g is None or g.get("attrs", {}).get("which") == "bottom":
        return {}
    err = _ds0(g, "error_bounds")
    err = _ds0(g, "residuals") if math.isnan(err) else err
    return {"λ_max ± error bound": (_ds0(g, "eigenvalues"), err, err)}


def _trace(r: dict[str, Any]) -> Series:
    out: Series = {}
    for name in ("hessian", "spectrum"):
        a = r["analyses"].get(name, {}).get("attrs", {})
        tr, se = _num(a.get("trace")), _num(a.get("trace_stderr"))
        if not math.isnan(tr):
            out[f"trace ± s.e. ({name})"] = (tr, se, se)
    return out


def _nullity(r: dict[str, Any]) -> Series:
    g = r["analyses"].get("nullity", {})
    out: Series = {}
    for c in g.get("attrs", {}).get("counts") or []:
        if isinstance(c, dict):
            v = _num(c.get("count"))
            out[f"rtol {c.get('rtol'):g}"] = (v, v - _num(c.get("count_lower")), _num(c.get("count_upper")) - v)
    if not out and "count" in g.get("datasets", {}):  # the ladder's datasets
        cols = [np.asarray(g["datasets"][k]["values"], dtype=float).ravel() if k in g["datasets"] else None
                for k in ("rtol", "count", "count_lower", "count_upper")]
        rtol, count, lo, hi = cols
        assert count is not None
        for i, v in enumerate(count):
            label = f"rtol {rtol[i]:g}" if rtol is not None else f"threshold {i + 1}"
            out[label] = (float(v), float(v - lo[i]) if lo is not None else 0.0, float(hi[i] - v) if hi is not None else 0.0)
    return out


def _volume(r: dict[str, Any]) -> Series:
    a = r["analyses"].get("volume", {}).get("attrs", {})
    out: Series = {}
    for e, v, s in zip(a.get("epsilon") or [], a.get("log_volume") or [], a.get("log_volume_se") or []):
        out[f"ε = {e:g}"] = (_num(v), 1.96 * _num(s), 1.96 * _num(s))
    return out


def _llc(r: dict[str, Any]) -> Series:
    a = r["analyses"].get("llc", {}).get("attrs", {})
    v, ci, se = _num(a.get("llc")), a.get("llc_ci"), _num(a.get("llc_stderr"))
    if math.isnan(v):
        return {}
    if ci:
        return {"λ̂ (95% CI)": (v, v - _num(ci[0]), _num(ci[1]) - v)}
    return {"λ̂ ± 1.96 s.e.": (v, 1.96 * se, 1.96 * se)}


def _evidence(r: dict[str, Any]) -> Series:
    a = r["analyses"].get("evidence", {}).get("attrs", {})
    v, ci = _num(a.get("log_evidence")), a.get("log_evidence_ci") or [math.nan, math.nan]
    if math.isnan(v):
        return {}
    lo, hi = _num(ci[0]) if ci else math.nan, _num(ci[1]) if ci else math.nan
    return {"log evidence": (v, 0.0 if math.isnan(lo) else v - lo, 0.0 if math.isnan(hi) else hi - v)}


QUANTITIES: list[tuple[str, str, Callable[[dict[str, Any]], Series]]] = [
    ("sharpness", f"λ_max ({EIGEN_UNITS})", _lambda_max),
    ("trace of the Hessian", f"trace ({EIGEN_UNITS})", _trace),
    ("flat directions", "count of |λ| ≤ rtol·λ_max", _nullity),
    ("basin volume", "log V (nats)", _volume),
    ("local learning coefficient", "λ̂ (LLC)", _llc),
    ("Laplace evidence", "log p(D) (nats)", _evidence),
]


def trajectory_figure(reports: list[dict[str, Any]]) -> Any:
    """One panel per quantity present in any report, against training step, with error bars.

    Returns the figure, or None when no report has any of the quantities.
    """
    plt = pyplot()
    x, xlabel = steps(reports)
    order = np.argsort(np.asarray(x), kind="stable")
    xs = np.asarray(x)[order]
    panels = []
    for name, ylabel, fn in QUANTITIES:
        per = [fn(reports[i]) for i in order]
        labels = [k for s in per for k in s]
        labels = list(dict.fromkeys(labels))
        if labels:
            panels.append((name, ylabel, labels, per))
    if not panels:
        return None
    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.6 * rows + 0.6), squeeze=False)
    for ax, (name, ylabel, labels, per) in zip(axes.ravel(), panels):
        all_y = []
        for label in labels:
            y = np.asarray([s.get(label, (math.nan, 0, 0))[0] for s in per], dtype=float)
            lo = np.asarray([s.get(label, (0, 0, 0))[1] for s in per], dtype=float)
            hi = np.asarray([s.get(label, (0, 0, 0))[2] for s in per], dtype=float)
            err = np.clip(np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)]), 0, None)
            ax.errorbar(xs, y, yerr=err, fmt="o-", ms=3.5, capsize=2.5, label=label)
            all_y.append(y)
        ys = np.concatenate(all_y)
        if spans_decades(ys) and (ys[np.isfinite(ys)] > 0).all():
            ax.set_yscale("log")
        if spans_decades(xs, 1.5) and (xs > 0).all():
            ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(loc="best")
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    first = reports[0].get("problem", {})
    models = {str(r.get("problem", {}).get("model_sha256")) for r in reports}
    data = {short(r.get("problem", {}).get("data_sha256")) for r in reports}
    fig.suptitle(f"{len(reports)} checkpoints ({len(models)} distinct model{'s' if len(models) != 1 else ''}), "
                 f"data {', '.join(sorted(data))}\nP = {first.get('num_params', 0):,}, "
                 f"n = {first.get('num_examples', 0):,}, loss {first.get('loss')}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94 if len(panels) > 2 else 0.9))
    return fig
