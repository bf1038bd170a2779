"""Options, problem loading, progress and output shared by every command.

:class:`Command` is the one skeleton of an analysis command (load, run the library call, emit).
Streams: stdout carries data only (a rich table, or one JSON object with ``--json``);
logs and progress go to one stderr console. JSON floats keep full precision; non-finite
values become ``null``.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Progress as RichProgress,
)

from basins.progress import Progress, ProgressCallback
from basins.record import Record, json_object, plain

from .signals import check_interrupted
from .terminal import SafeConsole


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a ``torchrun`` launch (reads ``RANK``; imports no torch).

    Agrees with :func:`basins.engine.distributed.is_main_process`. Only the main process prints data,
    logs and progress, and writes reports (:func:`write_report`); errors show on every rank.
    """
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return True
    return os.environ["RANK"].strip() in ("", "0")


def stderr_console(quiet: bool = False) -> Console:
    """The one console for logs and progress (stderr; silent with ``--quiet`` and on ranks other than 0)."""
    return SafeConsole(stderr=True, quiet=quiet or not is_main_process())


def stdout_console() -> Console:
    """The console for data tables (stdout). Width is fixed when stdout is not a terminal. Silent on ranks other than 0."""
    if not is_main_process():
        return SafeConsole(file=io.StringIO(), quiet=True)
    return SafeConsole(file=sys.stdout, soft_wrap=False, width=None if sys.stdout.isatty() else 120)


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["basins.debug"] = True
    return value


def positive_or_auto(auto: Any = "auto") -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """A click callback for an option that takes a positive number or ``auto``: the float, or
    ``auto`` (what the library takes for its own choice: ``"auto"``, or None)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None or value == "auto":
            return auto
        try:
            x = float(value)
        except ValueError:
            raise click.BadParameter(f"a positive number or 'auto', got {value!r}") from None
        if not x > 0 or x == float("inf"):
            raise click.BadParameter(f"a positive number or 'auto', got {value!r}")
        return x

    return parse


class ByteSize(click.ParamType):
    """A size in bytes: ``123``, ``512M``, ``20G``, ``1.5GiB`` (K/M/G/T are powers of 1024)."""

    name = "size"
    _UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1:] if text[-1:] in "KMGT" else ""
        try:
            number = float(text[: len(text) - len(unit)])
        except ValueError:
            self.fail(f"{value!r} is not a size: use e.g. 20G, 512M or a number of bytes", param, ctx)
        if not number > 0 or number != number or number == float("inf"):
            self.fail(f"{value!r} must be a positive size, e.g. 20G", param, ctx)
        return int(number * self._UNITS[unit])


def problem_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The MODEL arguments and the options that define the problem; the command's body runs once
    per checkpoint (:func:`basins.cli.checkpoints.over_checkpoints`) with ``kw["model"]`` one path
    and ``kw["step"]`` its step. Destinations are named like the parameters of
    :func:`basins.problems.open_problem` (``--memory`` → ``memory_bytes``, ``--model-output`` →
    ``output``; ``-o`` is ``output_path``)."""
    from .checkpoints import over_checkpoints

    f = over_checkpoints(f)
    decorators = [
        click.argument("model", nargs=-1, required=True, type=click.Path()),
        click.option("--train-steps", "--steps", "train_steps", metavar="N,N,...",
                     help="The training step of each MODEL, comma-separated (default: the last number in each "
                          "file name, if any; checkpoints then run in order of step). Recorded in the report "
                          "and the JSON."),
        click.option("--data", help="Data: .pt/.npz/.h5 with inputs and targets (or named inputs: input_ids, "
                                    "attention_mask, ..., labels), or module:factory. Default: the bundle's."),
        click.option("--loss", help="mse, cross-entropy, nll, bce, causal-lm, token-cross-entropy or module:function "
                                    "(returning a mean, or (sum, count)). Default: the bundle's, else inferred from "
                                    "the targets and outputs."),
        click.option("--arch", help="module:factory building the model, for a state-dict or .safetensors file."),
        click.option("--base-model", "base_model", metavar="DIR",
                     help="For a peft adapter directory: the base model's local directory (default: the one its "
                          "adapter_config.json names; nothing is downloaded)."),
        click.option("--params", "params", multiple=True, metavar="GLOB",
                     help="Restrict θ to the parameters matching GLOB (repeatable, in order; a leading ! excludes), "
                          "e.g. --params 'transformer.h.0.*' --params '!*.bias'. The others are held fixed."),
        click.option("--include-frozen", is_flag=True,
                     help="Keep parameters with requires_grad=False in θ (default: held fixed, and reported)."),
        click.option("--model-output", "output", metavar="NAME",
                     help="The field (or tuple index) of the model's output to use (default: logits, the only "
                          "tensor, or the first element)."),
        click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled nn.Module (runs code from the file)."),
        click.option("--batch-size", type=click.IntRange(min=1),
                     help="Examples per chunk (default: all at once for data in memory; for a streamed source its "
                          "loader's batch size, at least 256; a fixed-batch .pt2's own size)."),
        click.option("--max-samples", type=click.IntRange(min=1), help="Use only the first N examples (recorded)."),
        click.option("--stream", is_flag=True,
                     help="Read a Dataset/DataLoader/HDF5 data source again on every pass instead of holding it in memory "
                          "(automatic when it would take more than a quarter of RAM)."),
        click.option("--dtype", type=click.Choice(["float32", "float64"]), help="Compute dtype (default: the model's; bfloat16/float16 weights are upcast to float32)."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice (recorded)."),
        click.option("--memory", "memory_bytes", type=ByteSize(), metavar="SIZE",
                     help="Memory the whole run may plan to hold, e.g. 20G or 512M (default 80% of the memory "
                          "available at start). The HVP route, its chunks and the Lanczos basis (in memory, or on "
                          "disk in $BASINS_SCRATCH or the temp dir) are chosen to fit; exit 2 when nothing does."),
        click.option("--hvp", "hvp_route", type=click.Choice(["auto", "graph", "fwd-rev", "rev-rev"]), default="auto",
                     show_default=True, help="Hessian-vector product route (auto: measured fastest)."),
    ]
    for dec in reversed(decorators):
        f = dec(f)
    return f


def output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``-o``, ``--force``, ``--json``, ``--quiet``, ``--debug``."""
    decorators = [
        click.option("-o", "--output", "output_path", type=click.Path(), help="Write/update this HDF5 report (a directory: DIR/{name}.h5)."),
        click.option("--force", is_flag=True, help="Overwrite a report of another problem."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table."),
        click.option("-q", "--quiet", is_flag=True, help="No progress or logs on stderr."),
        click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                     help="Show a traceback on errors."),
    ]
    for dec in reversed(decorators):
        f = dec(f)
    return f


@dataclass
class Loaded:
    """A problem ready to analyse, with what a report records about it."""

    problem: Any  # basins.Problem
    record: dict[str, Any]
    seed: int
    warnings: list[str] = field(default_factory=list)
    #: the work of loading (loss, gradient, determinism check, HVP route choice): ``Counters.as_dict()``
    setup_counts: dict[str, int] = field(default_factory=dict)


def load_problem(opts: dict[str, Any], log: Console) -> Loaded:
    """Load model, data and loss from the common options and build the Problem
    (:func:`basins.problems.open_problem`, the library's one set-up), printing its notes.

    With ``opts["output_path"]`` (``-o``) set, also check that the report can be written (``opts["force"]``),
    so that a wrong ``-o`` fails before the analysis rather than after it.
    """
    from basins.engine import distributed as dist
    from basins.problems import open_problem

    run = opts.get("_run")  # several checkpoints (basins.cli.checkpoints): the data are loaded once
    world, rank = (dist.env_world_size(), int(os.environ.get("RANK", "0") or 0)) if dist.launched() else (1, 0)
    data_key = (opts.get("data"), opts.get("max_samples"), opts.get("seed", 0), world, rank)
    cached = run.data.get(data_key) if run is not None and opts.get("data") is not None else None
    opened = open_problem(
        opts["model"], data=opts.get("data"), loss=opts.get("loss"), arch=opts.get("arch"),
        trust_pickle=opts.get("trust_pickle", False), max_samples=opts.get("max_samples"), seed=opts.get("seed", 0),
        batch_size=opts.get("batch_size"), stream=bool(opts.get("stream")), dtype=opts.get("dtype"),
        device=opts.get("device") or "auto", hvp_route=opts.get("hvp_route", "auto"), params=opts.get("params"),
        include_frozen=bool(opts.get("include_frozen")), output=opts.get("output"), step=opts.get("step"),
        loaded_data=cached[0] if cached is not None else None, loaded_source=cached[1] if cached is not None else None,
        route_cache=run.routes if run is not None else None, base_model=opts.get("base_model"),
        memory_bytes=opts.get("memory_bytes"),
        status=lambda message: log.status(message, spinner="dots"),
    )
    problem, model = opened.problem, opened.model
    if run is not None and opts.get("data") is not None:
        run.data[data_key] = (opened.data, opened.source)
    for note in opened.notes:
        log.print(as_flags(note))
    if opts.get("stream") and not opened.record["data_streamed"]:
        log.print(f"note: --stream applies to a Dataset, DataLoader or .h5 file; {opened.data.source} is read whole")
    if opts.get("batch_size") and model.fixed_batch_size is not None and opts["batch_size"] != model.fixed_batch_size:
        log.print(f"note: --batch-size {opts['batch_size']} is ignored: the model was exported for batches of "
                  f"exactly {model.fixed_batch_size}")
    for msg in opened.warnings:
        log.print(f"[yellow]warning:[/] {as_flags(msg)}")
    if opts.get("output_path"):  # fail before the work, not after it
        check_report_writable(opts["output_path"], opened.record, force=bool(opts.get("force")))
    return Loaded(problem, opened.record, int(opts.get("seed", 0)), list(opened.warnings),
                  setup_counts=opened.setup_counts)


@contextmanager
def progress_bar(log: Console, description: str, total: int | None = None) -> Iterator[ProgressCallback]:
    """A rich progress bar on the stderr console; yields the library's one ``callback``, which
    takes a :class:`basins.progress.Progress` (its ``done``, ``total``, ``unit`` and ``info``)."""
    if log.quiet:  # --quiet, or a rank other than 0
        yield lambda p: None
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[unit]}"), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with RichProgress(*columns, console=log, transient=True, redirect_stdout=False, redirect_stderr=False) as prog:
        task = prog.add_task(description, total=total, info="", unit="")

        def update(p: Progress) -> None:
            kwargs: dict[str, Any] = {"completed": p.done, "info": p.info or p.phase, "unit": p.unit}
            if p.total is not None:
                kwargs["total"] = p.total
            prog.update(task, **kwargs)

        yield update


def print_json(obj: Any) -> None:
    """One JSON object on stdout (full precision, non-finite as null); only on rank 0."""
    if is_main_process():
        click.echo(json.dumps(plain(obj), allow_nan=False))


class LibraryOption(click.Option):
    """An option that a library function below the command's call knows by another name too
    (``library_names``), e.g. ``--max-hvps``, which :func:`basins.linalg.lanczos.lanczos` calls
    ``max_matvecs``: :func:`flag_of` finds it by those names as well."""

    def __init__(self, *args: Any, library_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.library_names = tuple(library_names)


def flag_of(param: str, params: list[click.Parameter]) -> str | None:
    """The flag of the option that sets library parameter ``param``: the option whose destination
    (or one of whose :attr:`LibraryOption.library_names`) is ``param`` (its first long name), else
    the option whose long name spelled as a Python name is ``param`` (``--top-k`` for ``top_k``);
    None if neither."""
    options = [p for p in params if isinstance(p, click.Option)]
    for p in options:
        if p.name == param or param in getattr(p, "library_names", ()):
            return next((o for o in p.opts if o.startswith("--")), p.opts[0])
    for p in options:
        for o in p.opts:
            if o.startswith("--") and o[2:].replace("-", "_") == param:
                return o
    return None


@functools.cache
def _shared_dests() -> frozenset[str]:
    """The destinations of :func:`problem_options` and :func:`output_options`."""
    command = click.command()(output_options(problem_options(lambda **kw: None)))
    return frozenset(str(p.name) for p in command.params)


# a parameter, optionally =value; or a quoted string (a path, a name from the input), left as it is
_HINT = re.compile(r"\b([a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?:=('[^']*'|\"[^\"]*\"|[\w.+-]+))?|'[^'\n]*'|\"[^\"\n]*\"")


def as_flags(text: str, params: list[click.Parameter] | None = None, keep: str | None = None) -> str:
    """``text`` from the library with the parameters it names spelled as this command's flags.

    Library messages name parameters as a Python caller passes them (``include_frozen=True``,
    ``hvp_route='fwd-rev'``, ``raise memory_bytes``). For the options of ``params`` (default:
    the current command's): ``name=True`` becomes ``--flag``, ``name=False`` its ``--no-`` form,
    ``name=value`` becomes ``--flag value``, and a bare name becomes ``--flag`` where the name
    has an underscore (``memory_bytes``; plain words such as ``loss`` are left as they are), except
    ``keep``: the parameter an error is about, whose flag prefixes the message.
    """
    if params is None:
        ctx = click.get_current_context(silent=True)
        params = list(ctx.command.params) if ctx is not None else []
    options = [p for p in params if isinstance(p, click.Option)]

    def spell(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if name is None or name == keep or (value is None and "_" not in name):
            return m.group(0)
        option = next((p for p in options if p.name == name or name in getattr(p, "library_names", ())), None)
        flag = flag_of(name, options) if option is not None else None
        if option is None or flag is None:
            return m.group(0)
        if value is None:
            return flag
        if option.is_flag:
            if value == "True":
                return flag
            off = next((o for o in option.secondary_opts if o.startswith("--")), None)
            return off if value == "False" and off else m.group(0)
        return f"{flag} {value.strip(chr(39) + chr(34))}"

    return _HINT.sub(spell, text)


@contextmanager
def flag_errors(*, by_message: bool = True) -> Iterator[None]:
    """Name the command's flag in a library error about one of its parameters.

    An :class:`~basins.errors.InputError` with ``param`` set is raised again, same type, as
    ``"--probes: <message>"``, the flag of the current command's option for ``param``
    (:func:`flag_of`). Without ``param`` and with ``by_message``, the parameter is read from the
    start of the message (``num_probes must be ≥ 2 ...``, optionally after ``unknown``), as library
    messages written before ``param=`` existed name it there.
    """
    from basins.errors import InputError

    try:
        yield
    except InputError as exc:
        ctx = click.get_current_context(silent=True)
        spelled = spoken(exc, list(ctx.command.params) if ctx is not None else [], by_message=by_message)
        if spelled == str(exc):
            raise
        raise type(exc)(spelled, param=exc.param) from exc


def spoken(exc: Exception, params: list[click.Parameter], *, by_message: bool = False) -> str:
    """The message of a library error as the command whose options are ``params`` speaks: the flag
    of its ``param`` first (:func:`flag_of`; with ``by_message`` and no ``param``, of the parameter
    the message begins with), and the other parameters it names spelled as flags (:func:`as_flags`)."""
    msg = str(exc)
    name = getattr(exc, "param", None)
    options = params
    if name is None and by_message:
        found = re.match(r"(?:unknown )?([A-Za-z_]\w*)\b", msg)
        name = found.group(1) if found else None
        # a word at the start of a message: the command's own options, and shared ones only by a
        # name no sentence begins with (memory_bytes, not loss or data)
        options = [p for p in params if p.name not in _shared_dests() or "_" in str(p.name)]
    flag = flag_of(name, options) if name else None
    spelled = as_flags(msg, params, keep=name)
    return f"{flag}: {spelled}" if flag is not None and not msg.startswith(flag) else spelled


class Command:
    """One run of an analysis command on one checkpoint: the skeleton every command shares.

    ``Command(kw)`` loads the problem from the common options (:func:`load_problem`, timed as the
    set-up) and prints its memory plan (``plan_line=False``: the command prints a fuller one); :meth:`run` makes the library call with a progress bar and the command's flags named
    in its errors (:func:`flag_errors`), timed; :meth:`emit` hands the record on to the report and
    stdout, with the timings and the counts (:func:`count_work`). A command module holds its
    options, these calls, and what it prints about its own result.

    Attributes:
        kw: the command's options (click destinations are named like the library's parameters).
        log: the stderr console. loaded: the problem and its record.
        warnings: what ``--json`` and the report carry as ``warnings`` (the loading's, then
            those added by :meth:`warn`).
        seconds: wall time of the :meth:`run` calls so far; setup_seconds: of the loading.
    """

    def __init__(self, kw: dict[str, Any], *, plan_line: bool = True) -> None:
        self.kw = kw
        self.log = stderr_console(kw["quiet"])
        with Timer() as setup, flag_errors(by_message=False):
            self.loaded = load_problem(kw, self.log)
        self.setup_seconds = setup.seconds
        if "num_steps" in kw and any(arg == "--steps" or arg.startswith("--steps=") for arg in sys.argv[1:]):
            self.note("--steps is the training step of each MODEL; the Lanczos steps per probe are "
                      "--lanczos-steps (they were --steps in basins 0.2 and before)")
        plan = self.loaded.record.get("memory_plan")
        if plan_line and plan:  # the problem's plan (route, pieces); hessian prints its own, with the basis
            self.print_plan(str(plan))
        self.seconds = 0.0
        self.warnings = list(self.loaded.warnings)

    @property
    def problem(self) -> Any:  # basins.Problem
        return self.loaded.problem

    @property
    def seed(self) -> int:
        return self.loaded.seed

    def print_plan(self, line: str) -> None:
        """A memory plan's line on stderr, the parameters it names spelled as this command's flags."""
        self.log.print(as_flags(line), soft_wrap=True, highlight=False, markup=False)

    def options(self, *names: str) -> dict[str, Any]:
        """``{name: kw[name]}``: options passed to the library under their own names."""
        return {name: self.kw[name] for name in names}

    def run(self, description: str, fn: Callable[..., Any], *args: Any, total: int | None = None,
            **kwargs: Any) -> Any:
        """``fn(*args, callback=..., **kwargs)`` under a progress bar (``description``, ``total``
        units), timed into :attr:`seconds`, with the command's flags named in its input errors."""
        with flag_errors(), Timer() as t, progress_bar(self.log, description, total=total) as callback:
            result = fn(*args, callback=callback, **kwargs)
        self.seconds += t.seconds
        return result

    def note(self, *messages: str) -> None:
        """Log ``note: <message>`` lines on stderr."""
        for message in messages:
            self.log.print(f"note: {as_flags(message)}")

    def warn(self, message: str) -> None:
        """A warning: logged on stderr and kept in :attr:`warnings`."""
        self.warnings.append(message)
        self.log.print(f"[yellow]warning:[/] {as_flags(message)}")

    def emit(self, group: str, record: Record, *,
             tables: Callable[[dict[str, Any], dict[str, Any]], list[Any]] | None = None,
             also: dict[str, Record] | None = None) -> None:
        """The one way a command hands its result on: ``record`` to the report (``-o``, group
        ``group``, then the groups in ``also``; :meth:`basins.record.Record.report_attrs`) and to
        stdout, as one JSON object with ``--json`` (:func:`basins.record.json_object`, the object
        ``basins summary --json`` prints for the group) or as ``tables(analysis, problem)``
        otherwise (the group's ``summary_tables``). Every record gets ``wall_seconds`` (the
        :meth:`run` calls) and ``setup_seconds``; the group's record the counts (:func:`count_work`)."""
        check_interrupted()  # an interrupt whose exception was swallowed ends the run here, not after
        kw, loaded = self.kw, self.loaded
        for rec in (record, *(also or {}).values()):
            rec.attrs.update(wall_seconds=self.seconds, setup_seconds=self.setup_seconds)
        count_work(record.attrs, loaded, group)
        if kw.get("output_path"):  # a report group also records the command line (not --json: it is the caller's)
            for name, rec in {group: record, **(also or {})}.items():
                with flag_errors(by_message=False):  # a report of another problem: --force
                    write_report(kw["output_path"], loaded.record, name,
                                 rec.report_attrs(argv=argv(), problem=loaded.record, warnings=self.warnings),
                                 rec.arrays, force=kw.get("force", False))
            self.log.print(f"wrote {' and '.join('/' + g for g in [group, *(also or {})])} to {kw['output_path']}")
        run = kw.get("_run")
        obj = json_object(loaded.record, record, self.warnings, report=kw.get("output_path")) if kw.get("as_json") else None
        if run is not None:  # one of several checkpoints: a JSON list or a table row at the end
            run.collect(group, record.as_analysis(), loaded.record, obj)
        elif obj is not None:
            print_json(obj)
        elif tables is not None:
            console = stdout_console()
            analysis = record.as_analysis()
            analysis["attrs"]["argv"] = argv()
            for table in tables(analysis, loaded.record):
                console.print(table)


def count_work(attrs: dict[str, Any], loaded: Loaded, group: str) -> None:
    """Set the counts of ``attrs`` from ``loaded.problem.counters``, whatever the record said.

    For each counter ``num_X`` of :class:`basins.engine.problem.Counters` (HVPs, full-data loss
    evaluations and gradients, GGN products): ``num_X`` is everything the problem computed for this
    run (set-up, planning, the analysis and its checks), ``num_setup_X`` the set-up's share
    (:attr:`Loaded.setup_counts`: loss, gradient, determinism check, HVP route choice), added once
    here for every command; ``num_<group>_hvps`` is the HVPs after the set-up."""
    total = loaded.problem.counters.as_dict()
    for name, n in total.items():
        attrs[name] = int(n)
        attrs[f"num_setup_{name[len('num_'):]}"] = int(loaded.setup_counts.get(name, 0))
    attrs[f"num_{group}_hvps"] = attrs["num_hvps"] - attrs["num_setup_hvps"]


def write_report(path: str, record: dict[str, Any], group: str, attrs: dict[str, Any],
                 arrays: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """:func:`basins.files.report.write_analysis`, by rank 0 only; the other ranks wait for it.

    Same arguments as ``write_analysis`` (``force=``). When rank 0 fails
    to write, it raises the error (shown once) and the other ranks exit quietly with the same code.
    """
    from basins.files.report import write_analysis

    check_interrupted()  # an interrupt whose exception was swallowed must not rewrite the report
    _on_main_process(lambda: write_analysis(path, record, group, attrs, arrays, **kwargs))


def check_report_writable(path: str, record: dict[str, Any], *, force: bool = False) -> None:
    """:func:`basins.files.report.check_writable` (fail before the work), by rank 0 only, like :func:`write_report`.

    Under torchrun on several machines only rank 0's filesystem needs the report's directory.
    """
    from basins.files.report import check_writable

    _on_main_process(lambda: check_writable(path, record, force=force))


def _on_main_process(fn: Callable[[], object]) -> None:
    """Run ``fn`` on rank 0; the other ranks wait, and exit quietly with rank 0's code if it raised."""
    from basins.engine import distributed as dist
    from basins.errors import InputError

    code = 0
    if is_main_process():
        try:
            fn()
        except BaseException as exc:
            code = 2 if isinstance(exc, InputError) else 1
            dist.broadcast_object(code)
            raise
    code = int(dist.broadcast_object(code))
    if code:
        raise click.exceptions.Exit(code)


def argv() -> str:
    """The command line as run, for reports."""
    return " ".join(["basins", *sys.argv[1:]])


class Timer:
    """Wall time of a block: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def attr_value(attrs: dict[str, Any], key: str) -> Any:
    """``attrs[key]`` (None if absent). Report attributes are decoded once, by
    :func:`basins.files.report.read_report`; this stays for the figure panels that call it."""
    return attrs.get(key)


def column(analysis: dict[str, Any], name: str) -> list[Any]:
    """Dataset ``name`` of a report group as a list (``[]`` if absent). For renderers."""
    ds = analysis.get("datasets", {}).get(name)
    if ds is None:
        return []
    v = ds["values"]
    return list(v.tolist() if hasattr(v, "tolist") else v)


def fmt(x: float | None, digits: int = 6) -> str:
    """A number for a table: ``-`` for None/non-finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def ladder_options(rule: str, what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--rtol`` (repeatable, dest ``rtols``) and ``--atol``: the ladder of thresholds of a count
    (``rule`` says what is counted; ``what`` names the threshold in the help)."""
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True,
                         help=f"Absolute part of the {what} (loss / parameter²).")(f)
        return click.option("--rtol", "rtols", type=click.FloatRange(min=0), multiple=True,
                            help=f"{rule}. Repeatable [default: 1e-6, 1e-4, 1e-2].")(f)
    return decorate


def key_value_table(title: str, first: str = "quantity") -> Any:
    """A two-column table (``first``, value) without a header, for a group's settings and results."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(first, style="bold")
    table.add_column("value")
    return table


def largest_block_row(analysis: dict[str, Any], values: str, count_label: str, label: str,
                      value_name: str, digits: int) -> dict[str, str]:
    """The one-row view of a per-block group for ``basins summary`` of several reports: the number
    of blocks, and the block with the largest dataset ``values`` (``{}`` when there are none)."""
    names = list(analysis.get("attrs", {}).get("block_names") or [])
    values_ = column(analysis, values)
    if not names or not values_:
        return {}
    i = max(range(len(values_)), key=lambda j: values_[j])
    return {count_label: str(len(names)), label: f"{names[i]} ({value_name}{fmt(values_[i], digits)})"}
