"""Deterministic synthetic analysis dicts, one per panel kind, for the figure tests.

Fixed numbers (closed forms, no random generator), in the shape
:func:`basins.files.report.read_report` gives a report group; :func:`flat` turns a report-shaped
``/walls`` or ``/volume`` group (families as subgroups) into the shape
:meth:`basins.record.Record.as_analysis` gives (``family/name`` keys).
"""

from __future__ import annotations

from typing import Any

import numpy as np

EIG = "loss / parameter²"
PROBLEM: dict[str, Any] = {
    "model": "runs/ckpt_000300.pt", "model_sha256": "0123456789abcdef" * 4, "data_sha256": "fedcba9876543210" * 4,
    "num_params": 120, "num_examples": 64, "loss": "cross-entropy", "loss_at_optimum": 0.05, "step": None,
}


def ds(values: Any, units: str | None = None, description: str = "") -> dict[str, Any]:
    return {"values": np.asarray(values), "description": description, "units": units}


def group(attrs: dict[str, Any], datasets: dict[str, Any] | None = None,
          groups: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"attrs": attrs, "datasets": datasets or {}, "groups": groups or {}}


def hessian() -> dict[str, Any]:
    top = np.array([12.5, 7.25, 3.5, 1.75, 0.875])
    bottom = np.array([-0.02, -0.004, 1e-5, 3e-4, 2e-3])
    return group({"which": "both", "trace": 41.5, "trace_stderr": 0.75, "trace_method": "hutch++"}, {
        "eigenvalues": ds(top, EIG), "error_bounds": ds([1e-4, 2e-4, 5e-4, 1e-3, 2e-3], EIG),
        "residuals": ds([1e-5, 2e-5, 5e-5, 1e-4, 2e-4], EIG), "converged": ds([True, True, True, True, False]),
        "bottom_eigenvalues": ds(bottom, EIG), "bottom_error_bounds": ds([1e-3, 1e-3, 2e-3, 2e-3, 3e-3], EIG),
        "bottom_residuals": ds([1e-4] * 5, EIG), "bottom_converged": ds([True] * 5),
    })


def spectrum() -> dict[str, Any]:
    grid = np.linspace(-1.0, 13.0, 281)
    dens = 0.8 * np.exp(-0.5 * (grid / 0.15) ** 2) / (0.15 * np.sqrt(2 * np.pi)) + \
        0.2 * np.exp(-0.5 * ((grid - 10.0) / 0.6) ** 2) / (0.6 * np.sqrt(2 * np.pi))
    return group({"num_probes": 10, "num_steps": 80, "scale": "linear", "coverage": 0.95, "trace": 40.0,
                  "trace_stderr": 2.5}, {
        "grid": ds(grid, EIG), "density": ds(dens, f"1 / ({EIG})"),
        "density_lower": ds(dens * 0.6, f"1 / ({EIG})"), "density_upper": ds(dens * 1.5, f"1 / ({EIG})"),
    })


def nullity() -> dict[str, Any]:
    rtol = [1e-8, 1e-6, 1e-4, 1e-2]
    return group({"method": "slq", "lambda_max": 12.5, "atol": 0.0}, {
        "rtol": ds(rtol), "threshold": ds([12.5 * r for r in rtol], EIG),
        "count": ds([2.0, 14.5, 60.0, 96.0], "eigenvalues"), "count_lower": ds([0.0, 9.0, 52.0, 90.0], "eigenvalues"),
        "count_upper": ds([6.0, 20.0, 66.0, 101.0], "eigenvalues"),
    })


def features() -> dict[str, Any]:
    mu = 10.0 ** -np.linspace(0.0, 14.0, 64) * 8.0
    mu[-2:] = [0.0, -1e-15]
    return group({"rank": 40, "cutoff": 8.0 * 10 ** (-14.0 * 40 / 63) * 0.9, "participation_ratio": 3.25}, {
        "eigenvalues": ds(mu, EIG)})


def volume() -> dict[str, Any]:
    eps = [1e-3, 1e-2, 1e-1]
    iso = {"family": "isotropic", "dimension": 120, "log_volume": [-210.5, -150.25, -95.0],
           "ci_lower": [-214.0, -152.0, None], "ci_upper": [-207.5, -148.0, None],
           "is_lower_bound": [False, False, True], "jensen_bound": [-230.0, -170.0, -112.0],
           "jensen_bound_se": [4.0, 3.0, 3.5]}
    top = {"family": "top", "dimension": 10, "log_volume": [-30.0, -18.5, -7.0], "ci_lower": [-31.0, -19.5, -8.0],
           "ci_upper": [-29.0, -17.5, -6.0], "is_lower_bound": [False, False, False]}
    return group({"analysis": "volume", "family": "isotropic", "epsilon": eps, "num_rays": 200, **iso,
                  "families": {"isotropic": iso, "top": top},
                  "quadratic": {"log_volume": [-205.0, -136.0, -67.0], "dimension": 100}},
                 {"epsilon": ds(eps, "loss units")})


def walls() -> dict[str, Any]:
    t = 2.0 ** np.arange(-6, 4)
    fams = {}
    for name, p in (("isotropic", 2.0), ("top", 2.6)):
        median = t ** p
        q = np.vstack([median * 0.3, median * 0.6, median, median * 1.6, median * 3.0])
        fams[name] = group({}, {"t": ds(t), "profile_quantiles": ds(q)})
    return group({"analysis": "walls", "walls_epsilon": 0.01, "floor_fraction": 0.01, "t": t.tolist()}, groups=fams)


def llc() -> dict[str, Any]:
    draws = np.arange(60)
    traces = np.vstack([30.0 + 4.0 * np.sin(draws / (3.0 + c)) + 0.05 * c * draws for c in range(3)])
    return group({"llc": float(traces.mean()), "llc_stderr": 0.8}, {"llc_trace": ds(traces),
                                                                    "loss_trace": ds(traces / 100.0, "loss")})


def landscape_1d() -> dict[str, Any]:
    t = np.linspace(-1.0, 1.0, 41)
    return group({"kind": "1d", "directions": "top", "extent": 1.0, "num_points": 41, "loss_at_optimum": 0.05},
                 {"t": ds(t, "parameter units"), "loss": ds(0.05 + 2.0 * t ** 2 + 0.5 * t ** 3, "loss")})


def landscape_2d() -> dict[str, Any]:
    x = np.linspace(-1.0, 1.0, 21)
    y = np.linspace(-0.5, 0.5, 11)
    loss = 0.05 + 3.0 * x[:, None] ** 2 + 0.5 * y[None, :] ** 2 + x[:, None] * y[None, :]
    return group({"kind": "2d", "directions": "random", "extent": 1.0, "num_points": 21, "loss_at_optimum": 0.05},
                 {"x": ds(x, "filter-normalised units"), "y": ds(y, "filter-normalised units"), "loss": ds(loss, "loss")})


def landscape_line() -> dict[str, Any]:
    t = np.linspace(0.0, 1.0, 26)
    loss = 0.05 + 0.02 * t + 0.6 * np.sin(np.pi * t) ** 2
    i = int(np.argmax(loss))
    return group({"kind": "line", "directions": "line", "extent": 1.0, "num_points": 26, "loss_at_optimum": 0.05,
                  "barrier": float(loss[i] - 0.07), "barrier_t": float(t[i]), "loss_a": 0.05, "loss_b": 0.07,
                  "epsilon": 0.01, "same_basin": False, "other_model": "runs/ckpt_000400.pt"},
                 {"t": ds(t), "loss": ds(loss, "loss")})


def extra() -> dict[str, dict[str, Any]]:
    return {
        "hessian_blocks": group({"block_names": ["0.weight", "0.bias", "2.weight", "2.bias"]}, {
            "lambda_max": ds([9.5, 0.75, 4.25, 0.125], EIG), "lambda_max_residual": ds([0.1, 0.02, 0.05, 0.01], EIG)}),
        "evidence": group({"method": "exact", "log_likelihood": -40.0, "log_prior": -12.5, "log_occam": -18.25,
                           "log_evidence": -58.25, "log_evidence_ci": [-60.0, -56.5]}),
    }


#: panel kind → report analyses (group → analysis); one baseline image each
CASES: dict[str, Any] = {
    "hessian": lambda: {"hessian": hessian()},
    "spectrum": lambda: {"spectrum": spectrum()},
    "nullity": lambda: {"nullity": nullity()},
    "features": lambda: {"features": features()},
    "volume": lambda: {"volume": volume()},
    "walls": lambda: {"walls": walls()},
    "llc": lambda: {"llc": llc()},
    "landscape_1d": lambda: {"landscape": landscape_1d()},
    "landscape_2d": lambda: {"landscape": landscape_2d()},
    "landscape_line": lambda: {"landscape": landscape_line()},
    "extra": extra,
}


def flat(analysis: dict[str, Any]) -> dict[str, Any]:
    """A report-shaped group with subgroups as a record-shaped one (``family/name`` dataset keys)."""
    datasets = dict(analysis.get("datasets", {}))
    for name, sub in analysis.get("groups", {}).items():
        for key, item in sub["datasets"].items():
            datasets[f"{name}/{key}"] = item
    return {"attrs": dict(analysis["attrs"]), "datasets": datasets}


def trajectory_reports() -> list[dict[str, Any]]:
    """Three checkpoints with every quantity the trajectory figure draws, given out of order."""
    out = []
    for step, lam, tr, counts, lv, lb, llc_v, ev in (
        (1000, 12.5, 41.5, [2.0, 14.0, 60.0], [-210.0, -150.0], [False, True], 31.0, -58.0),
        (0, 0.9, 3.0, [0.0, 1.0, 5.0], [-20.0, -12.0], [False, False], 58.0, -95.0),
        (100, 4.5, 18.0, [1.0, 6.0, 31.0], [-120.0, -80.0], [False, False], 44.5, -70.0),
    ):
        h = group({"which": "top", "trace": tr, "trace_stderr": 0.05 * tr, "trace_method": "hutch++"}, {
            "eigenvalues": ds([lam, lam / 2], EIG), "error_bounds": ds([0.01 * lam, 0.01], EIG)})
        n = group({"method": "exact"}, {"rtol": ds([1e-6, 1e-4, 1e-2]), "count": ds(counts),
                                         "count_lower": ds(counts), "count_upper": ds([c + 1 for c in counts])})
        v = group({"family": "isotropic", "epsilon": [1e-3, 1e-2], "families": {"isotropic": {
            "log_volume": lv, "ci_lower": [lv[0] - 3, None], "ci_upper": [lv[0] + 2, None], "is_lower_bound": lb}}})
        ll = group({"llc": llc_v, "llc_stderr": 1.5})
        e = group({"method": "exact", "log_evidence": ev, "log_evidence_ci": [ev, ev]})
        out.append({"path": f"r{step}.h5", "attrs": {}, "problem": {**PROBLEM, "step": step, "model": f"ckpt_{step}.pt",
                                                                      "model_sha256": f"{step:08d}" * 8},
                    "analyses": {"hessian": h, "nullity": n, "volume": v, "llc": ll, "evidence": e}})
    return out
