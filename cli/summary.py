"""``basins summary REPORT...``: show reports as rich tables, one JSON document, or CSV.

JSON: per report ``{group: object}``, where each object is the ``--json`` object of the command
that wrote the group, rebuilt from the report (:func:`group_json`: the same
:func:`basins.record.json_object` of the same :class:`~basins.record.Record`), so it equals what
that command printed, key for key; ``--json`` of several reports is a list of these, in the order
given (by step for checkpoints). CSV: the eigenvalue table of each ``/hessian`` group, one row per
eigenvalue with every per-eigenvalue key (:func:`basins.cli.hessian.csv_rows` of the same object).

Renderers: an analysis group ``/<name>`` is drawn by the ``summary_tables`` (one report) and
``summary_row`` (several reports) of the ``basins.cli`` module that :data:`RENDERERS` names for
it (``/walls`` by ``basins.cli.volume``); any other group is drawn generically (attributes as
key/value rows, datasets with shape, description and units).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console, RenderableType
from rich.table import Table

from basins.record import plain

from .common import _set_debug, fmt, key_value_table, print_json, stderr_console, stdout_console
from .terminal import SafeConsole, safe

_CSV_COLUMNS = ("report", "end", "index", "eigenvalue", "residual", "error_bound", "converged")


@click.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document: per report an object {group: the --json object of the command that "
                   "wrote it}; a list of them for several reports.")
@click.option("--csv", "as_csv", is_flag=True,
              help="The eigenvalue table of the /hessian groups as CSV (columns: " + ", ".join(_CSV_COLUMNS) + ").")
@click.option("-q", "--quiet", is_flag=True, help="No notes on stderr.")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show a traceback on errors.")
def summary(reports: tuple[str, ...], as_json: bool, as_csv: bool, quiet: bool) -> None:
    """Show what REPORT(s) hold: the problem, then each analysis with its error bars and cost.

    With one report: a problem table, then tables for each analysis. With several: one
    table, one row per report (model, P, n, L(θ*), ‖∇L‖, λ_max, trace, ...), so a loop over
    checkpoints ends with one comparison (in order of training step when every report has
    one). A report holding two or more of nullity, volume, llc and evidence also gets the four
    basin-size views side by side, with a note where the LLC and the nullity disagree.

    \b
    Machine formats (same on a terminal or a pipe):
      --json   one report: an object {group: the --json object of the command that
               wrote it}, key for key (the problem's keys, warnings, report path and
               the analysis's keys); several reports: a JSON list of such objects.
               Arrays are lists; NaN/inf are null.
      --csv    the eigenvalue table, one row per eigenvalue of every report's /hessian
               group: report, end (top|bottom), index (1 = most extreme), eigenvalue,
               residual, error_bound, converged.
    Several reports come in the order given, or by training step when every report
    has one.

    \b
    Examples:
      basins summary report.h5
      basins summary runs/*.h5
      basins summary report.h5 --json | jq .hessian.lambda_max
    """
    from basins.errors import InputError
    from basins.files.report import read_report

    if as_json and as_csv:
        raise click.UsageError("--json and --csv are exclusive: pick one")
    log = stderr_console(quiet)
    data = [read_report(path) for path in reports]
    if len(data) > 1 and all(d["problem"].get("step") is not None for d in data):  # checkpoints: training order
        data.sort(key=lambda d: d["problem"]["step"])
    if as_json:
        docs = [_json_report(d) for d in data]
        print_json(docs[0] if len(docs) == 1 else docs)
    elif as_csv:
        rows = _csv(data, log)
        if not rows:
            raise InputError(
                f"no /hessian group in {', '.join(reports)}: --csv writes the eigenvalue table; "
                "run `basins hessian MODEL -o REPORT` first, or use --json"
            )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(_CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(safe(buf.getvalue(), newlines=True), nl=False)
    else:
        _print(_report_tables(data[0], log) if len(data) == 1 else [_rows_table(data, log)])


def _print(items: list[RenderableType]) -> None:
    """Print on stdout; in a pipe, wide enough that no table wraps (a pipe has no width)."""
    console = stdout_console()
    if not console.is_terminal:
        wide = console.options.update_width(1000)
        widest = max((console.measure(item, options=wide).maximum for item in items), default=0)
        console = SafeConsole(file=console.file, soft_wrap=False, width=min(max(120, widest), 1000))
    for item in items:
        console.print(item)


# ---------------------------------------------------------------------- JSON
def group_json(d: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``--json`` object of the command that wrote group ``name`` of report ``d``
    (:func:`basins.record.json_object` of the record read back, with the problem and warnings of
    that run; ``/problem`` for a group written before groups kept their own)."""
    from basins.record import Record, json_object

    g = d["analyses"][name]
    a = g.get("attrs", {})
    problem = a["problem"] if isinstance(a.get("problem"), dict) else d["problem"]
    warnings = a["warnings"] if isinstance(a.get("warnings"), list) else []
    return json_object(problem, Record.from_analysis(g), warnings, report=d["path"])


def _json_report(d: dict[str, Any]) -> dict[str, Any]:
    return {name: group_json(d, name) for name in d["analyses"]}


# ---------------------------------------------------------------------- renderer lookup
#: Report group → the ``basins.cli`` module whose ``summary_tables`` / ``summary_row`` /
#: ``csv_rows`` draw it (imported when a report has that group). A new analysis adds its line;
#: a group not listed here is drawn generically.
RENDERERS: dict[str, str] = {
    "hessian": "hessian",
    "hessian_blocks": "hessian_blocks",  # written by ``basins hessian --per-block``
    "spectrum": "spectrum",
    "nullity": "nullity",
    "features": "features",
    "volume": "volume",
    "walls": "volume",  # written by ``basins volume --walls``
    "llc": "llc",
    "llc_blocks": "llc_blocks",  # written by ``basins llc --per-block``
    "evidence": "evidence",
    "landscape": "landscape",
}


def _renderer(group: str, attr: str, log: Console) -> Callable[..., Any] | None:
    """``basins.cli.<RENDERERS[group]>.<attr>`` if the group is listed and the module exports
    ``attr``; else None (the group is drawn generically)."""
    name = RENDERERS.get(group)
    if name is None:
        return None
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except Exception as exc:  # a broken renderer module must not hide the report
        log.print(f"[yellow]note:[/] cannot import basins.cli.{name} ({type(exc).__name__}: {exc}); "
                  f"showing /{group} generically")
        return None
    fn = getattr(module, attr, None)
    return fn if callable(fn) else None


def _call(fn: Callable[..., Any] | None, group: str, log: Console, *args: Any) -> Any:
    if fn is None:
        return None
    try:
        return fn(*args)
    except Exception as exc:
        if click.get_current_context().meta.get("basins.debug"):
            raise
        log.print(f"[yellow]note:[/] basins.cli.{group}.{fn.__name__} failed ({type(exc).__name__}: {exc}); "
                  f"showing /{group} generically")
        return None


# ---------------------------------------------------------------------- one report
def _value(v: Any, width: int = 80) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return fmt(v) if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        if len(v) <= 8 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return "[" + ", ".join(_value(x) for x in v) + "]"
        text = json.dumps(plain(v))
        return text if len(text) <= width else f"[{len(v)} items]"
    if isinstance(v, dict):
        text = json.dumps(plain(v))
        return text if len(text) <= width else f"{{{len(v)} keys}}"
    return str(v)


def _short_hash(h: Any) -> str:
    return str(h)[:12] if h else "-"


def problem_table(d: dict[str, Any]) -> Table:
    """Key/value table of a report's /problem group and file attributes."""
    p, a = d["problem"], d["attrs"]
    t = key_value_table(f"{d['path']}: problem")
    rows = [
        ("model", p.get("model")), ("model sha256", _short_hash(p.get("model_sha256"))),
        ("data", p.get("data")), ("data sha256", _short_hash(p.get("data_sha256"))),
        ("P (parameters)", f"{p['num_params']:,}" if isinstance(p.get("num_params"), int) else p.get("num_params")),
        ("n (examples)", f"{p['num_examples']:,}" if isinstance(p.get("num_examples"), int) else p.get("num_examples")),
        ("loss", p.get("loss")), ("L(θ*)", p.get("loss_at_optimum")), ("‖∇L(θ*)‖", p.get("grad_norm")),
        ("dtype", p.get("dtype")), ("device", p.get("device")), ("seed", p.get("seed")),
    ]
    if p.get("source_dtype"):
        rows.append(("stored as", f"{p['source_dtype']} (upcast to {p.get('dtype')})"))
    if p.get("base_model"):
        rows.append(("base model", p.get("base_model")))
    if p.get("max_samples") is not None:
        rows.append(("max samples", p.get("max_samples")))
    if p.get("data_streamed"):
        rows.append(("data streamed", "read again on every pass" if p.get("data_read_every_pass")
                     else "held in memory after the first pass"))
    if int(p.get("world_size") or 1) > 1:
        rows.append(("processes", f"{p['world_size']} ({p.get('dist_backend')}), examples per rank "
                                  + " + ".join(str(int(k)) for k in p.get("rank_examples", []))))
    rows += [("basins", a.get("basins_version")), ("written", a.get("modified") or a.get("created"))]
    for k, v in rows:
        t.add_row(k, _value(v))
    return t


def generic_tables(name: str, g: dict[str, Any]) -> list[RenderableType]:
    """Any analysis group: its attributes as key/value rows, its datasets with shape/description/units."""
    out: list[RenderableType] = []
    attrs = key_value_table(f"/{name}", "attribute")
    for k, v in g.get("attrs", {}).items():
        if k not in ("problem", "json_only"):  # the run's problem (the problem table) and --json-only keys
            attrs.add_row(k, _value(v))
    out.append(attrs)
    if g.get("datasets"):
        ds = Table(title=f"/{name} datasets", title_justify="left")
        for col in ("name", "shape", "dtype", "description", "units"):
            ds.add_column(col)
        for dname, item in g["datasets"].items():
            v = item["values"]
            shape = "×".join(map(str, getattr(v, "shape", ()))) or "scalar"
            ds.add_row(dname, shape, str(getattr(v, "dtype", "")), item.get("description") or "",
                       item.get("units") or "-")
        out.append(ds)
    for sub, sg in g.get("groups", {}).items():
        out += generic_tables(f"{name}/{sub}", sg)
    return out


def _report_tables(d: dict[str, Any], log: Console) -> list[RenderableType]:
    items: list[RenderableType] = [problem_table(d)]
    if not d["analyses"]:
        log.print(f"note: {d['path']} holds no analyses yet")
    for name, g in d["analyses"].items():
        tables = _call(_renderer(name, "summary_tables", log), name, log, g, d["problem"])
        items += list(tables) if tables is not None else generic_tables(name, g)
    views = basin_views(d, log)
    if views is not None:
        items.append(views)
    return items


def basin_views(d: dict[str, Any], log: Console) -> Table | None:
    """The four basin-size views of one report side by side (nullity, probed log-volume, LLC,
    log evidence), when at least two are present, with a note where they disagree: an LLC
    well below P/2 says the basin is singular, which a nullity count of 0 contradicts."""
    an = d["analyses"]
    present = [g for g in ("nullity", "volume", "llc", "evidence") if g in an]
    if len(present) < 2:
        return None
    t = Table(title="basin size, four views", title_justify="left")
    for col in ("view", "value", "reads as"):
        t.add_column(col)
    P = d["problem"].get("num_params")
    flat = None
    if "nullity" in an:
        row = _call(_renderer("nullity", "summary_row", log), "nullity", log, an["nullity"]) or {}
        cells = [f"{k} {v}" for k, v in row.items() if k.startswith("flat@")]
        counts = an["nullity"].get("attrs", {}).get("counts")
        if (isinstance(counts, list) and counts and isinstance(counts[-1], dict)
                and isinstance(counts[-1].get("count"), (int, float))):
            flat = float(counts[-1]["count"])
        t.add_row("nullity", "; ".join(cells) or "-", "flat directions (Hessian)")
    if "volume" in an:
        row = _call(_renderer("volume", "summary_row", log), "volume", log, an["volume"]) or {}
        cells = [f"{k} {v}" for k, v in row.items() if k.startswith("log V")]
        t.add_row("probed log-volume", "; ".join(cells) or "-", "nats, larger = broader")
    lam = None
    if "llc" in an:
        a = an["llc"].get("attrs", {})
        lam = a.get("llc") if isinstance(a.get("llc"), (int, float)) else None
        half = f" vs P/2 = {P / 2:g}" if isinstance(P, int) else ""
        t.add_row("LLC λ̂", (_call(_renderer("llc", "summary_row", log), "llc", log, an["llc"]) or {}).get("LLC", "-")
                  + half, "effective dimension/2, smaller = more degenerate")
    if "evidence" in an:
        t.add_row("log evidence", (_call(_renderer("evidence", "summary_row", log), "evidence", log, an["evidence"])
                                   or {}).get("log evidence", "-"), "nats, Occam factor included")
    if isinstance(P, int) and lam is not None and flat is not None:
        reg = lam >= 0.9 * P / 2
        if reg and flat > 0.1 * P:
            t.caption = f"disagree: LLC ≈ P/2 (regular) but nullity counts {flat:g} flat directions"
        elif not reg and flat == 0:
            t.caption = "disagree: LLC < 0.9·P/2 (singular) but nullity counts no flat direction"
        else:
            t.caption = "LLC and nullity agree on whether the basin is degenerate"
    return t


# ---------------------------------------------------------------------- several reports
def _generic_row(name: str, g: dict[str, Any]) -> dict[str, str]:
    a = g.get("attrs", {})
    for key, unit in (("num_hvps", "HVPs"), ("num_loss_evals", "loss evals")):
        if isinstance(a.get(key), int) and not isinstance(a.get(key), bool):
            return {"": f"{a[key]} {unit}"}
    return {"": "✓"}


def row_cells(group: str, analysis: dict[str, Any], log: Console | None = None) -> dict[str, str]:
    """The one-row view of a group (its module's ``summary_row``, else generic), as text cells."""
    log = log or SafeConsole(stderr=True)
    row = _call(_renderer(group, "summary_row", log), group, log, analysis)
    return {str(k): str(v) for k, v in (row if isinstance(row, dict) else _generic_row(group, analysis)).items()}


def _rows_table(data: list[dict[str, Any]], log: Console) -> Table:
    steps = any(d["problem"].get("step") is not None for d in data)  # reports of checkpoints: a step column
    base = []
    analysis_cells: list[dict[tuple[str, str], str]] = []
    for d in data:
        p = d["problem"]
        base.append({
            "report": d["path"], **({"step": str(p["step"]) if p.get("step") is not None else "-"} if steps else {}),
            "model": str(p.get("model", "-")),
            "P": f"{p['num_params']:,}" if isinstance(p.get("num_params"), int) else "-",
            "n": f"{p['num_examples']:,}" if isinstance(p.get("num_examples"), int) else "-",
            "loss": str(p.get("loss", "-")), "L(θ*)": _value(p.get("loss_at_optimum")),
            "‖∇L‖": fmt(p["grad_norm"], 3) if isinstance(p.get("grad_norm"), float) else "-",
        })
        cells: dict[tuple[str, str], str] = {}
        for name, g in d["analyses"].items():
            for key, v in row_cells(name, g, log).items():
                cells[(name, key)] = v
        analysis_cells.append(cells)
    keys: list[tuple[str, str]] = []
    for cells in analysis_cells:
        keys += [k for k in cells if k not in keys]
    owners: dict[str, set[str]] = {}
    for group, k in keys:
        owners.setdefault(k, set()).add(group)
    label = {(g, k): (k if k and len(owners[k]) == 1 else f"{g} {k}".strip()) for g, k in keys}
    t = Table(title="reports", title_justify="left")
    for col in base[0]:
        t.add_column(col, justify="right" if col in ("step", "P", "n", "L(θ*)", "‖∇L‖") else "left")
    for column in keys:
        t.add_column(label[column], justify="right")
    for b, cells in zip(base, analysis_cells):
        t.add_row(*b.values(), *(cells.get(column, "-") for column in keys))
    return t


# ---------------------------------------------------------------------- CSV
def _csv(data: list[dict[str, Any]], log: Console) -> list[dict[str, Any]]:
    rows_fn = _renderer("hessian", "csv_rows", log)
    if rows_fn is None:
        return []
    rows = []
    for d in data:
        if "hessian" not in d["analyses"]:
            log.print(f"note: {d['path']} has no /hessian group; no CSV rows from it")
            continue
        for r in rows_fn(group_json(d, "hessian")):
            rows.append({"report": d["path"], **{k: _csv_cell(r.get(k)) for k in _CSV_COLUMNS[1:]}})
    return rows


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return str(v)
