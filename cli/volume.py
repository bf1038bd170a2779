"""``basins volume MODEL --samples N``: basin volume and wall shape by random probing.

Also the renderers ``basins summary`` uses for a report's ``/volume`` and ``/walls`` groups:
:func:`summary_tables` and :func:`summary_row`.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import RenderableType
from rich.table import Table

from .common import Command, fmt, is_main_process, key_value_table, output_options, problem_options


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
@click.option("--prior-sigma", "sigma", type=click.FloatRange(min=0, min_open=True),
              help="Std of the Gaussian prior N(0, σ²I) for the prior mass. [default: RMS of θ*]")
@click.option("--normalisation", "normalisation", type=click.Choice(["isotropic", "filter"]), default="isotropic",
              show_default=True, help="Unit Gaussian directions, or filter-normalised (Li et al. 2018; no volume).")
@click.option("--family", "families", type=click.Choice(["isotropic", "top", "floor"]), multiple=True,
              help="Ray family; repeatable: isotropic, top (span of the top-k Hessian eigenvectors), "
                   "floor (deflated against them). [default: isotropic]")
@click.option("--top-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Eigenvectors spanning the top family / deflated by floor.")
@click.option("--walls", is_flag=True, help="Measure wall profiles, exponents, anharmonicity and asymmetry.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw the median wall profile with quantile bands to this .png/.pdf/.svg (needs matplotlib; implies --walls).")
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

    Along each random unit direction u (antithetic pairs ±u, each regenerated from a recorded
    seed) the radius r(u) is where L(θ* + r u) − L(θ*) first reaches ε (loss units), to
    relative tolerance --radius-rtol (default min(1e-3, 0.1/P), so the radius error moves
    log V by ≤ 0.1 nats). All rays advance together through batched loss evaluations.
    log V = log V_ball(P) + logmeanexp(P log r) (natural logs; V in parameter units^P), and the
    mass under a N(0, σ²I) prior. In high dimension a few rays dominate: the effective sample
    size (ESS, over antithetic pairs) is reported, a bootstrap CI only when ESS ≥ 30, and
    otherwise the estimate is marked is_lower_bound (with the Jensen bound mean(P log r)
    beside it). Rays with no crossing below --max-radius are censored and counted.

    --walls adds, per ray, the local exponent dlog C/dlog t at the crossing (2 = quadratic
    wall), the floor radius (C = 1% of ε), the anharmonicity log(r/sqrt(2ε/uᵀHu)) and the
    asymmetry log(r₊/r₋), with quantiles across rays. --compare-quadratic gives the volume of
    the ellipsoid over the eigenvalues above the null threshold, in its own dimension P − N₀,
    with N₀ and the count of negative eigenvalues beside it. The top and floor families give
    the volume of a section through θ* (dimension k or P − k), not of the basin.

    Cost: loss evaluations only for the radii (a few per ray and ε, counted in
    num_loss_evals); --walls adds the wall grid's loss evaluations and one HVP per ray pair;
    the top/floor families and --compare-quadratic add the top eigenpairs (the dense Hessian,
    P HVPs, when P ≤ --exact-max-params, else Lanczos for --top-k pairs).

    References: Li et al. 2018 (filter normalisation); Scherlis & Belrose 2024 (prior mass
    of a basin); Dowell & Jarratt, BIT 11, 1971 (the Illinois root finder along rays).

    \b
    Examples:
      basins volume model.pt --samples 1000
      basins volume model.pt --samples 1000 --walls -o report.h5 --plot walls.png
      basins volume model.pt --epsilon 0.01 --family top --family floor --json | jq .families
    """
    from basins.analyses.volume.probe import DEFAULT_EPSILONS, probe_problem

    if kw["plot_path"]:
        from .figures.style import figure_format, require_matplotlib

        figure_format(kw["plot_path"], "--plot")
        require_matplotlib("--plot")
        kw["walls"] = True
    c = Command(kw)
    num_pairs = (kw["samples"] + 1) // 2
    if kw["samples"] % 2:
        c.note(f"{kw['samples']} rays rounded up to {2 * num_pairs} (antithetic pairs ±u)")
    families = list(dict.fromkeys(kw["families"])) or ["isotropic"]
    result = c.run("probing rays", probe_problem, c.problem, num_pairs, sorted(set(kw["epsilons"])) or
                   list(DEFAULT_EPSILONS), total=2 * num_pairs * len(families), families=families, top_k=kw["k"],
                   seed=c.seed, **c.options("normalisation", "radius_rtol", "max_radius", "sigma", "walls",
                                            "compare_quadratic", "null_rtol", "exact_max_params", "loss_route", "chunk"))
    route = result.loss_route
    c.log.print(f"{result.num_loss_evals:,} loss evaluations, {result.num_hvps:,} HVPs in {c.seconds:.1f} s "
                f"(batched loss: {route['route'] if route else '-'}"
                f"{'' if not route or route['chunk'] is None else ' ×' + str(route['chunk'])})")
    for e, cens in zip(result.epsilons, result.num_censored()):
        if cens:
            c.warn(f"ε = {e:g}: {cens} of {result.primary.num_rays} rays found no crossing below max radius "
                   f"{result.max_radius:.3g} (censored): the volume is a lower bound")
    c.note(*result.notes)
    walls = result.walls_record()

    def tables(analysis: dict[str, Any], problem: dict[str, Any]) -> list[RenderableType]:
        out = summary_tables(analysis, problem)
        return out + summary_tables(walls.as_analysis(), problem) if walls is not None else out

    if kw["plot_path"] and is_main_process() and walls is not None:
        plot_walls(kw["plot_path"], walls.as_analysis())
        c.log.print(f"wrote {kw['plot_path']}")
    c.emit("volume", result.record(), tables=tables, also={"walls": walls} if walls is not None else None)


# ---------------------------------------------------------------------- plot
def plot_walls(path: str, walls: dict[str, Any]) -> None:
    """Draw a ``/walls`` analysis (``walls_record().as_analysis()`` or a report group): median wall
    profile C/ε against t with 5–95% and 25–75% bands per family, log-log, with the panel
    ``basins plot`` uses (:mod:`basins.cli.figures.walls`)."""
    from .figures.layout import single_panel
    from .figures.style import figure_style, save_figure

    with figure_style():
        save_figure(single_panel("walls", walls, {}), path)


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
    key = key_value_table("probing settings and cost")
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
