"""``basins volume MODEL --samples N``: basin volume and wall shape by random probing.

Also the renderers ``basins summary`` uses for a report's ``/volume`` and ``/walls`` groups:
:func:`summary_tables` and :func:`summary_row`.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import click
from rich.console import RenderableType
from rich.table import Table

from .common import (
    Timer,
    argv,
    fmt,
    is_main_process,
    jsonable,
    load_problem,
    output_options,
    print_json,
    problem_json,
    problem_options,
    progress_bar,
    stderr_console,
    stdout_console,
    write_report,
)

RADIUS_UNITS = "parameter units (Euclidean norm of θ − θ*)"
_RAY_ORDER = "ray 2j is +u_j, ray 2j+1 is −u_j (u_j regenerated from pair_seeds[j])"
_STATUS = "0 crossed, 1 censored (no crossing below max_radius), 2 collapsed (C ≥ ε at min_radius), 3 unconverged"


@click.command()
@problem_options
@click.option("--samples", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Rays per family (antithetic pairs ±u; an odd N is rounded up).")
@click.option("--epsilon", "epsilons", type=click.FloatRange(min=0, min_open=True), multiple=True,
              help="Loss rise ε defining the basin, in loss units; repeat for a ladder. [default: 1e-3 1e-2 1e-1]")
@click.option("--radius-rtol", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              help="Relative tolerance of each radius. [default: min(1e-3, 0.1/P), so P·δ ≤ 0.1 nats]")
@click.option("--max-radius", type=click.FloatRange(min=0, min_open=True),
              help="Rays with no crossing below this are censored. [default: 10·max(‖θ*‖, 1)]")
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True),
              help="Std of the Gaussian prior N(0, σ²I) for the prior mass. [default: RMS of θ*]")
@click.option("--directions", "normalisation", type=click.Choice(["isotropic", "filter"]), default="isotropic",
              show_default=True, help="Unit Gaussian directions, or filter-normalised (Li et al. 2018; no volume).")
@click.option("--family", "families", type=click.Choice(["isotropic", "top", "floor"]), multiple=True,
              help="Ray family; repeatable: isotropic, top (span of the top-k Hessian eigenvectors), "
                   "floor (deflated against them). [default: isotropic]")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Eigenvectors spanning the top family / deflated by floor.")
@click.option("--walls", is_flag=True, help="Measure wall profiles, exponents, anharmonicity and asymmetry.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Draw the median wall profile with quantile bands to this PNG (needs matplotlib; implies --walls).")
@click.option("--compare-quadratic", is_flag=True,
              help="Add the quadratic (Hessian) baseline volume: exact spectrum for small P, else Lanczos top-k.")
@click.option("--null-rtol", type=click.FloatRange(min=0), default=1e-6, show_default=True,
              help="Quadratic baseline: eigenvalues with |λ| ≤ rtol·λ_max are null.")
@click.option("--exact-max-params", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Largest P for the dense Hessian (quadratic baseline, top/floor eigenvectors).")
@click.option("--loss-route", type=click.Choice(["auto", "vmap", "loop"]), default="auto", show_default=True,
              help="Batched loss: vmap, a loop, or the faster of both measured.")
@click.option("--chunk", type=click.IntRange(min=1), help="Points per vmap call (bounds memory).")
@output_options
def volume(**kw: Any) -> None:
    """Basin volume at a ladder of loss rises ε, and wall shape, by random rays from θ*.

    Along each random direction u the radius r(u) is where L(θ* + r u) − L(θ*) first
    reaches ε. log V = log V_ball(P) + logmeanexp(P log r). In high dimension a few rays
    dominate: the effective sample size (ESS) is reported, a bootstrap CI only when
    ESS ≥ 30, and otherwise the estimate is marked as a lower bound (with the Jensen bound
    mean(P log r) beside it). All logs are natural.

    \b
    Examples:
      basins volume model.pt --samples 1000
      basins volume model.pt --samples 1000 --walls -o report.h5 --plot walls.png
      basins volume model.pt --epsilon 0.01 --family top --family floor --json | jq .families
    """
    from basins.analyses.volume.probe import DEFAULT_EPSILONS, probe_problem

    log = stderr_console(kw["quiet"])
    if kw["plot"]:
        if importlib.util.find_spec("matplotlib") is None:
            from basins.errors import InputError

            raise InputError("--plot needs matplotlib, which is not installed: pip install 'basins[plot]'")
        kw["walls"] = True
    with Timer() as setup:
        loaded = load_problem(kw, log)
    problem = loaded.problem
    num_pairs = (kw["samples"] + 1) // 2
    if kw["samples"] % 2:
        log.print(f"note: {kw['samples']} rays rounded up to {2 * num_pairs} (antithetic pairs ±u)")
    families = list(dict.fromkeys(kw["families"])) or ["isotropic"]
    epsilons = sorted(set(kw["epsilons"])) or list(DEFAULT_EPSILONS)
    total = 2 * num_pairs * len(families)

    with Timer() as t, progress_bar(log, "probing rays", total=total) as on_progress:
        result = probe_problem(
            problem, num_pairs, epsilons, families=families, normalisation=kw["normalisation"], top_k=kw["top_k"],
            seed=loaded.seed, radius_rtol=kw["radius_rtol"], max_radius=kw["max_radius"], sigma=kw["sigma"],
            walls=kw["walls"], compare_quadratic=kw["compare_quadratic"], null_rtol=kw["null_rtol"],
            exact_max_params=kw["exact_max_params"], loss_route=kw["loss_route"], chunk=kw["chunk"],
            callback=on_progress,
        )
    log.print(f"{result.num_loss_evals:,} loss evaluations, {result.num_hvps:,} HVPs in {t.seconds:.1f} s "
              f"(batched loss: {result.loss_route['route'] if result.loss_route else '-'}"
              f"{'' if not result.loss_route or result.loss_route['chunk'] is None else ' ×' + str(result.loss_route['chunk'])})")
    warnings = list(loaded.warnings)
    prim = result.primary
    for j, e in enumerate(result.epsilons):
        cens = int((prim.status[:, j] == 1).sum())
        if cens:
            msg = (f"ε = {e:g}: {cens} of {prim.num_rays} rays found no crossing below max radius "
                   f"{result.max_radius:.3g} (censored): the volume is a lower bound")
            warnings.append(msg)
            log.print(f"[yellow]warning:[/] {msg}")
    for note in result.notes:
        log.print(f"note: {note}")

    out = result_json(result)
    settings = {
        "samples": 2 * num_pairs, "ray_families": families, "directions": kw["normalisation"], "top_k": kw["top_k"],
        "walls_enabled": bool(kw["walls"]), "compare_quadratic": kw["compare_quadratic"],
        "null_rtol": kw["null_rtol"], "exact_max_params": kw["exact_max_params"],
    }
    if kw["output"]:
        _write(kw["output"], loaded.record, result, out, settings, t.seconds, setup.seconds, kw["force"])
        log.print(f"wrote /volume{' and /walls' if kw['walls'] else ''} to {kw['output']}")
    if kw["plot"] and is_main_process():
        plot_walls(kw["plot"], result)
        log.print(f"wrote {kw['plot']}")
    if kw["as_json"]:
        print_json({**problem_json(loaded), "warnings": warnings, **out, "wall_seconds": t.seconds,
                    "setup_seconds": setup.seconds, "report": kw["output"]})
    else:
        console = stdout_console()
        analysis = {"attrs": {**jsonable(out), **settings, "analysis": "volume", "wall_seconds": t.seconds}}
        for table in summary_tables(analysis, loaded.record):
            console.print(table)
        if result.families and any(f.walls is not None for f in result.families.values()):
            for table in summary_tables({"attrs": {"analysis": "walls", **jsonable(_walls_attrs(result))}},
                                        loaded.record):
                console.print(table)


# ---------------------------------------------------------------------- JSON
def _est(v: Any, name: str) -> Any:
    return None if v is None else getattr(v, name)


def family_json(fr: Any, epsilons: list[float]) -> dict[str, Any]:
    """The per-family keys of ``--json`` (one list entry per ε where a key depends on ε)."""
    import numpy as np

    from basins.analyses.volume.estimators import quantile_summary

    E = len(epsilons)
    vols, prior = fr.volume, fr.prior_mass
    def slopes(vals: list[Any], ok: list[bool]) -> list[float | None]:
        return [(vals[j + 1] - vals[j]) / math.log(epsilons[j + 1] / epsilons[j])
                if ok[j] and ok[j + 1] and vals[j] is not None and vals[j + 1] is not None else None
                for j in range(E - 1)]

    logv = [_est(v, "log_value") for v in vols]
    slope = slopes(logv, [v is not None and not v.is_lower_bound for v in vols])
    typical = slopes([_est(v, "jensen_bound") for v in vols], [v is not None for v in vols])
    return {
        "family": fr.family, "directions": fr.normalisation, "dimension": fr.dimension,
        "num_rays": fr.num_rays, "num_pairs": fr.num_rays // 2,
        "log_volume": logv, "log_volume_se": [_est(v, "se") for v in vols],
        "ess": [_est(v, "ess") for v in vols], "max_weight_share": [_est(v, "max_weight_share") for v in vols],
        "is_lower_bound": [_est(v, "is_lower_bound") for v in vols],
        "ci_lower": [_est(v, "ci_lower") for v in vols], "ci_upper": [_est(v, "ci_upper") for v in vols],
        "ci_level": next((v.level for v in vols if v is not None), None),
        "jensen_bound": [_est(v, "jensen_bound") for v in vols],
        "jensen_bound_se": [_est(v, "jensen_se") for v in vols],
        "radius_error_nats": [_est(v, "radius_error") for v in vols],
        "volume_slope": slope,
        "typical_slope": typical,
        "log_prior_mass": [_est(v, "log_value") for v in prior],
        "log_prior_mass_se": [_est(v, "se") for v in prior],
        "prior_ess": [_est(v, "ess") for v in prior],
        "prior_is_lower_bound": [_est(v, "is_lower_bound") for v in prior],
        "prior_ci_lower": [_est(v, "ci_lower") for v in prior],
        "prior_ci_upper": [_est(v, "ci_upper") for v in prior],
        "radii": [quantile_summary(np.where(fr.status[:, j] == 0, fr.radii[:, j], np.nan)) for j in range(E)],
        "censored": [int((fr.status[:, j] == 1).sum()) for j in range(E)],
        "collapsed": [int((fr.status[:, j] == 2).sum()) for j in range(E)],
        "unconverged": [int((fr.status[:, j] == 3).sum()) for j in range(E)],
        "reentered": [int(fr.reentered[:, j].sum()) for j in range(E)],
        "evals_per_ray": [float(fr.num_evals[:, j].mean()) for j in range(E)],
        "walls": None if fr.walls is None else fr.walls.summary,
    }


def result_json(result: Any) -> dict[str, Any]:
    """``--json`` keys of a :class:`basins.analyses.volume.probe.ProbeResult` (top level: the primary family)."""
    fams = {name: family_json(fr, result.epsilons) for name, fr in result.families.items()}
    prim = fams[result.primary.family]
    q = result.quadratic
    return {
        "num_params": result.num_params, **prim, "epsilon": result.epsilons,
        "num_loss_evals": result.num_loss_evals, "num_hvps": result.num_hvps,
        "num_search_evals": int(sum(int(fr.num_evals.sum()) for fr in result.families.values())),
        "radius_rtol": result.radius_rtol, "max_radius": result.max_radius, "sigma": result.sigma,
        "seed": result.seed, "walls_epsilon": result.walls_epsilon,
        "families": fams,
        "quadratic": None if q is None else {
            "log_volume": q.log_volume, "dimension": q.dimension, "num_null": q.num_null,
            "num_negative": q.num_negative, "threshold": q.threshold, "null_rtol": q.null_rtol,
            "method": q.method, "complete": q.complete, "note": q.note,
        },
        "notes": result.notes, "loss_route": result.loss_route,
    }


# ---------------------------------------------------------------------- report
def _walls_attrs(result: Any) -> dict[str, Any]:
    return {
        "walls_epsilon": result.walls_epsilon, "t": result.wall_t, "floor_fraction": 0.01,
        "family_walls": {n: fr.walls.summary for n, fr in result.families.items() if fr.walls is not None},
    }


def _write(path: str, record: dict[str, Any], result: Any, out: dict[str, Any], settings: dict[str, Any],
           seconds: float, setup_seconds: float, force: bool) -> None:
    import numpy as np

    from basins.files.report import Array

    common = {"argv": argv(), "wall_seconds": seconds, "setup_seconds": setup_seconds, **settings}
    attrs = {"analysis": "volume", **jsonable(out), **common}
    arrays: dict[str, Array] = {"epsilon": Array(np.asarray(result.epsilons), "the ε ladder: loss rise defining the basin", "loss units")}
    for name, fr in result.families.items():
        arrays.update({
            f"{name}/radii": Array(fr.radii, f"(rays, ε) radius where C = L − L(θ*) first reaches ε; {_RAY_ORDER}; "
                                             "max_radius when censored", RADIUS_UNITS),
            f"{name}/pair_seeds": Array(fr.pair_seeds, "per pair j: torch.Generator().manual_seed(seed) → randn float64 → "
                                                       "family projection → unit norm (basins.analyses.volume.directions.DirectionSampler)", None),
            f"{name}/status": Array(fr.status, f"(rays, ε) {_STATUS}", None),
            f"{name}/log_error": Array(fr.log_error, "(rays, ε) half-width of the final bracket in log r", "nats"),
            f"{name}/reentered": Array(fr.reentered, "(rays, ε) a point beyond the crossing had C < ε", None),
            f"{name}/num_evals": Array(fr.num_evals, "(rays, ε) loss evaluations spent by the radius search", None),
            f"{name}/dots": Array(fr.dots, "per ray u·θ* (for the prior mass)", "parameter units"),
        })
    if result.eigenvalues is not None:
        arrays["eigenvalues"] = Array(np.asarray(result.eigenvalues), "Hessian eigenvalues used (descending)",
                                      "loss / parameter²")
    write_report(path, record, "volume", attrs, arrays, force=force)
    if not any(fr.walls is not None for fr in result.families.values()):
        return
    wattrs = {"analysis": "walls", **jsonable(_walls_attrs(result)), **common}
    warrays: dict[str, Array] = {}
    for name, fr in result.families.items():
        w = fr.walls
        if w is None:
            continue
        jw = result.epsilons.index(w.epsilon)
        warrays.update({
            f"{name}/t": Array(w.t, "grid of t = radius / r(u) at the walls' ε", None),
            f"{name}/profile": Array(w.profile, f"(rays, t) C(t·r(u)) = L − L(θ*); {_RAY_ORDER}", "loss units"),
            f"{name}/profile_quantiles": Array(w.profile_quantiles, "(5, t) quantiles 0.05, 0.25, 0.5, 0.75, 0.95 of C/ε", None),
            f"{name}/exponent": Array(w.exponent, "per ray dlog C/dlog t at the crossing (2 = quadratic)", None),
            f"{name}/floor_ratio": Array(w.floor_ratio, "per ray r_floor/r, C(r_floor) = 1% of ε (NaN: not reached)", None),
            f"{name}/asymmetry": Array(w.asymmetry, "(pairs, ε) log(r₊/r₋)", "nats"),
            f"{name}/radii": Array(fr.radii[:, jw], "per ray r(u) at the walls' ε", RADIUS_UNITS),
            f"{name}/pair_seeds": Array(fr.pair_seeds, "per pair seed (see /volume)", None),
        })
        if w.anharmonicity is not None:
            warrays[f"{name}/anharmonicity"] = Array(w.anharmonicity, "(rays, ε) log(r / sqrt(2ε/uᵀHu))", "nats")
        if fr.curvature is not None:
            warrays[f"{name}/curvature"] = Array(fr.curvature, "per pair uᵀHu", "loss / parameter²")
    write_report(path, record, "walls", wattrs, warrays, force=force)


# ---------------------------------------------------------------------- plot
def plot_walls(path: str, result: Any) -> None:
    """Median wall profile C/ε against t with 5–95% and 25–75% bands, one line per family (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, fr in result.families.items():
        w = fr.walls
        if w is None:
            continue
        q = w.profile_quantiles
        line = ax.plot(w.t, q[2], label=f"{name} (median)")[0]
        ax.fill_between(w.t, q[0], q[4], alpha=0.15, color=line.get_color(), linewidth=0)
        ax.fill_between(w.t, q[1], q[3], alpha=0.3, color=line.get_color(), linewidth=0)
    tt = result.families[result.primary.family].walls.t
    for p, style in ((2, ":"), (4, "--")):
        ax.plot(tt, tt**p, style, color="gray", linewidth=0.8, label=f"t^{p}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.5)
    ax.set_xlabel("t = radius / r(u)")
    ax.set_ylabel(f"C / ε   (ε = {result.walls_epsilon:g})")
    ax.set_title("basin walls: L(θ* + t·r(u)·u) − L(θ*)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- summary renderers
def _num(x: Any, digits: int = 6) -> str:
    return fmt(float(x), digits) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _volume_cell(a: dict[str, Any], j: int, prefix: str = "") -> str:
    def at(key: str) -> Any:
        v = a.get(key)
        return v[j] if isinstance(v, list) and j < len(v) else None

    keys = ("log_volume", "ci_lower", "ci_upper", "is_lower_bound") if not prefix else \
        ("log_prior_mass", "prior_ci_lower", "prior_ci_upper", "prior_is_lower_bound")
    val, lo, hi, lower = (at(k) for k in keys)
    if val is None:
        return "-"
    if lower:
        return f"≥ {fmt(val, 6)} (lower bound)"
    if lo is not None and hi is not None:
        return f"{fmt(val, 6)} [{fmt(lo, 4)}, {fmt(hi, 4)}]"
    return fmt(val, 6)


def _volume_tables(a: dict[str, Any]) -> list[RenderableType]:
    eps = a.get("epsilon") or []
    fam, dim = a.get("family", "isotropic"), a.get("dimension")
    t = Table(title=f"basin volume by random probing ({fam} rays, d = {dim}, {a.get('num_rays')} rays; natural log)",
              title_justify="left")
    for col in ("ε", "log V [95% CI]", "ESS", "max share", "Jensen bound", "log prior mass", "median r",
                "censored", "evals/ray"):
        t.add_column(col, justify="right")
    for j, e in enumerate(eps):
        def at(key: str, j: int = j) -> Any:
            v = a.get(key)
            return v[j] if isinstance(v, list) and j < len(v) else None

        radii = at("radii") or {}
        jb, jse = at("jensen_bound"), at("jensen_bound_se")
        t.add_row(fmt(e, 3), _volume_cell(a, j), _num(at("ess"), 4), _num(at("max_weight_share"), 3),
                  "-" if jb is None else f"{fmt(jb, 6)} ± {fmt(jse, 2)}", _volume_cell(a, j, "prior"),
                  _num(radii.get("q50"), 4), str(at("censored") if at("censored") is not None else "-"),
                  _num(at("evals_per_ray"), 3))
    out: list[RenderableType] = [t]
    slope = a.get("volume_slope") or []
    key = Table(title="probing settings and cost", show_header=False, title_justify="left")
    key.add_column("quantity", style="bold")
    key.add_column("value")
    half = f"  (d/2 = {_num((dim or 0) / 2, 6)} for a regular basin)"
    if slope:
        key.add_row("dlog V / dlog ε", ", ".join(_num(s, 4) for s in slope) + half +
                    ("" if all(s is not None for s in slope) else "; - where V is only a lower bound"))
    typical = a.get("typical_slope") or []
    if typical:
        key.add_row("d mean(d·log r) / dlog ε", ", ".join(_num(s, 4) for s in typical) + half)
    q = a.get("quadratic")
    if isinstance(q, dict):
        key.add_row("quadratic baseline log V", ", ".join(_num(v, 6) for v in q.get("log_volume", [])) +
                    f"  (d = {q.get('dimension')}, N₀ = {q.get('num_null')}, negative {q.get('num_negative')}, {q.get('method')})")
    for label, name in (("radius rtol", "radius_rtol"), ("max radius", "max_radius"), ("prior σ", "sigma"),
                        ("seed", "seed"), ("loss evaluations", "num_loss_evals"), ("HVPs", "num_hvps"),
                        ("wall seconds", "wall_seconds")):
        if a.get(name) is not None:
            key.add_row(label, _num(a[name]) if isinstance(a[name], float) else str(a[name]))
    fams = a.get("families")
    if isinstance(fams, dict) and len(fams) > 1:
        for name, f in fams.items():
            if name == fam:
                continue
            vals = ", ".join(("≥ " if lb else "") + _num(v, 6) for v, lb in
                             zip(f.get("log_volume") or [], f.get("is_lower_bound") or []))
            key.add_row(f"{name} family log V (d = {f.get('dimension')})", vals or "-")
    for note in a.get("notes") or []:
        key.add_row("note", str(note))
    if a.get("argv"):
        key.add_row("argv", str(a["argv"]))
    out.append(key)
    return out


def _walls_tables(a: dict[str, Any]) -> list[RenderableType]:
    fams = a.get("family_walls") or {}
    t = Table(title=f"basin walls at ε = {_num(a.get('walls_epsilon'), 3)} (quantiles across rays: 5% / median / 95%)",
              title_justify="left")
    for col in ("family", "exponent p", "floor r/r(u)", "anharmonicity log(r/r_quad)", "asymmetry log(r₊/r₋)",
                "floor not reached", "re-entered"):
        t.add_column(col, justify="right")

    def q3(s: Any) -> str:
        return "-" if not isinstance(s, dict) else f"{_num(s.get('q05'), 3)} / {_num(s.get('q50'), 3)} / {_num(s.get('q95'), 3)}"

    for name, s in fams.items():
        if not isinstance(s, dict):
            continue
        anh, asym, jj = s.get("anharmonicity"), s.get("asymmetry"), _walls_index(s)
        t.add_row(name, q3(s.get("exponent")), q3(s.get("floor_ratio")),
                  q3(anh[jj]) if isinstance(anh, list) else "- (no HVPs)",
                  q3(asym[jj]) if isinstance(asym, list) else "-", str(s.get("floor_not_reached", "-")),
                  str(s.get("reentered", "-")))
    return [t]


def _walls_index(s: dict[str, Any]) -> int:
    j = s.get("epsilon_index")
    return int(j) if isinstance(j, int) else 0


def summary_tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
    """Rich tables for a ``/volume`` group (or a ``/walls`` group: ``attrs["analysis"] == "walls"``)."""
    a = analysis.get("attrs", {})
    if a.get("analysis") == "walls" or ("walls_epsilon" in a and "log_volume" not in a):
        return _walls_tables(a)
    return _volume_tables(a)


def summary_row(analysis: dict[str, Any]) -> dict[str, str]:
    """One-row view of a ``/volume`` (or ``/walls``) group for ``basins summary`` of several reports."""
    a = analysis.get("attrs", {})
    if a.get("analysis") == "walls":
        fams: dict[str, Any] = a.get("family_walls") or {}
        s: Any = next(iter(fams.values()), {})
        ex = (s.get("exponent") or {}).get("q50") if isinstance(s, dict) else None
        return {"wall exponent (median)": _num(ex, 3)}
    eps = a.get("epsilon") or []
    if not eps:
        return {"": "✓"}
    j = (len(eps) - 1) // 2
    ess = a.get("ess") or []
    return {
        f"log V (ε={fmt(eps[j], 2)})": _volume_cell(a, j),
        "ESS": _num(ess[j] if j < len(ess) else None, 3),
        "loss evals": str(a.get("num_loss_evals", "-")),
    }
