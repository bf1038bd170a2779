"""Several checkpoints in one run: ``basins hessian ckpts/*.pt2 --data d.pt``.

Every analysis command takes one or more MODEL arguments (files, quoted globs, or a directory of
checkpoints). :func:`over_checkpoints` wraps the command's one-checkpoint body and calls it once
per checkpoint, in one process, with a :class:`Run` in ``kw["_run"]`` that carries what the
checkpoints share:

* the data, loaded and checked once (:meth:`Run.data_for`);
* the HVP route chosen for the first checkpoint, reused while the parameter shapes are the same
  (``--hvp auto`` times the routes once, not once per checkpoint);
* the previous checkpoint's Ritz vectors, to warm-start Lanczos (:attr:`Run.warm` for
  ``hessian``; :func:`basins.analyses.eigen.warm_starts` for the top eigenpairs of ``volume``,
  ``nullity`` and ``evidence``);
* the outputs: a JSON list (one object per checkpoint, with ``model`` and ``step``), or one
  table row per checkpoint (the group's ``summary_row``, as ``basins summary`` shows several
  reports).

A checkpoint that fails is reported (one line, and an object with ``error`` in the JSON list)
and the others still run; the exit code is then 1 (2 when every checkpoint failed on bad input).

Steps: ``--steps 0,100,200`` (or ``--train-steps``; the Lanczos steps of ``spectrum``, ``nullity`` and
``evidence`` are ``--lanczos-steps``) gives each checkpoint's training step, in the order given;
otherwise the last run of digits in the file (or directory) name is the step
(``ckpt_000300.pt`` → 300), and when every name has one the checkpoints run in order of step
(``ckpt_20.pt`` before ``ckpt_100.pt``, whatever order the shell's glob gave).
"""

from __future__ import annotations

import functools
import glob
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from basins.errors import BasinsError, InputError

from .signals import received
from .terminal import echo_error

#: file names a directory of checkpoints contributes (and subdirectories with a config.json)
MODEL_SUFFIXES = (".pt", ".pt2", ".pth", ".ckpt", ".bin", ".safetensors")
#: per-checkpoint output options: with several checkpoints each needs a directory or a template
_PATH_OPTIONS = {"output_path": "-o", "plot_path": "--plot"}


def step_from_name(path: str) -> int | None:
    """The training step in a checkpoint's name: its last run of digits (``ckpt-000300.pt`` → 300)."""
    name = os.path.basename(os.path.normpath(path))
    stem = name.split(".", 1)[0] if not os.path.isdir(path) else name
    found = re.findall(r"\d+", stem)
    return int(found[-1]) if found else None


def _is_hf_dir(path: str) -> bool:
    """A model directory: Hugging Face (``config.json``) or a peft adapter (``adapter_config.json``)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in ("config.json", "adapter_config.json"))


def _by_step(paths: list[str]) -> list[str]:
    """Natural order: by step where the names have one, then by name."""
    return sorted(paths, key=lambda p: (step_from_name(p) is None, step_from_name(p) or 0, p))


def expand_models(specs: tuple[str, ...] | list[str] | str) -> tuple[list[str], bool]:
    """The checkpoint paths named by MODEL arguments, and whether there are several.

    A directory that is not a Hugging Face model (no ``config.json``) stands for its checkpoints:
    files ending in one of :data:`MODEL_SUFFIXES` and subdirectories holding a ``config.json``
    (a ``transformers`` Trainer's ``checkpoint-N/``), ordered by step. A quoted glob is expanded
    here (ordered by step). Other arguments are kept in the order given.

    Raises:
        InputError: a directory with no checkpoints, or a glob that matches nothing.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for spec in specs:
        if os.path.isdir(spec) and not _is_hf_dir(spec):
            found = [os.path.join(spec, n) for n in os.listdir(spec) if not n.startswith(".")]
            found = [p for p in found if (os.path.isfile(p) and p.endswith(MODEL_SUFFIXES)) or _is_hf_dir(p)]
            if not found:
                raise InputError(f"{spec} is a directory with no checkpoints in it (files ending in "
                                 f"{', '.join(MODEL_SUFFIXES)}, or model directories with a config.json)")
            out += _by_step(found)
        elif not os.path.exists(spec) and any(c in spec for c in "*?["):
            found = glob.glob(spec)
            if not found:
                raise InputError(f"no file matches {spec}")
            out += _by_step(found)
        else:
            out.append(spec)
    return out, len(out) > 1 or len(specs) > 1 or any(os.path.isdir(s) and not _is_hf_dir(s) for s in specs)


def parse_steps(text: str | None, models: list[str]) -> list[int | None]:
    """``--steps`` (comma-separated integers, one per checkpoint) or the steps in the names."""
    if text is None:
        return [step_from_name(m) for m in models]
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise InputError(f"--train-steps: {text!r} is not a comma-separated list of integers") from None
    if len(steps) != len(models):
        raise InputError(f"--train-steps: {len(steps)} steps for {len(models)} checkpoints; give one per checkpoint")
    return list(steps)


def _name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    return base if os.path.isdir(path) else base.split(".", 1)[0]


def output_paths(option: str, value: str | None, models: list[str], steps: list[int | None]) -> list[str | None]:
    """One path per checkpoint for an output option (``-o``, ``--plot``) given once.

    ``value`` is a template with ``{name}`` (the file name without extension), ``{step}`` or
    ``{index}`` (0, 1, ...), or a directory (existing, or ending in ``/``), which means
    ``DIR/{name}.h5`` (``.png`` for a plot).

    Raises:
        InputError: several checkpoints and neither a template nor a directory, or two
            checkpoints that would write the same file.
    """
    if value is None:
        return [None] * len(models)
    suffix = ".h5" if option == "-o" else os.path.splitext(value)[1] or ".png"
    if "{" in value:
        template = value
    elif value.endswith(os.sep) or os.path.isdir(value):
        os.makedirs(value, exist_ok=True)
        template = os.path.join(value, "{name}" + suffix)
    elif len(models) > 1:
        raise InputError(f"{option}: {len(models)} checkpoints cannot all write {value}: give a directory "
                         f"(runs/) or a template with {{name}}, {{step}} or {{index}} (runs/{{name}}{suffix})")
    else:
        return [value]
    try:
        paths = [template.format(name=_name(m), step="" if s is None else s, index=i)
                 for i, (m, s) in enumerate(zip(models, steps))]
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"{option}: bad template {value!r} ({exc}); the fields are {{name}}, {{step}} and "
                         "{index}") from None
    same = {p for p in paths if paths.count(p) > 1}
    if same:
        raise InputError(f"{option}: several checkpoints would write {sorted(same)[0]}; use {{index}} or {{step}} "
                         "in the template")
    return list(paths)


@dataclass
class Run:
    """What the checkpoints of one run share (module docstring)."""

    data: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    #: (parameter shapes, requested route) -> the route ``auto`` chose for the first checkpoint
    routes: dict[tuple[Any, ...], str] = field(default_factory=dict)
    #: name (e.g. "hessian:top") -> the previous checkpoint's Ritz vectors, (P, m) on the CPU
    warm: dict[str, Any] = field(default_factory=dict)
    json: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    model: str = ""
    step: int | None = None

    def collect(self, group: str, analysis: dict[str, Any], problem: dict[str, Any],
                json_obj: dict[str, Any] | None) -> None:
        """Keep one checkpoint's result (called by :func:`basins.cli.common.emit`)."""
        if json_obj is not None:
            self.json.append({"model": self.model, "step": self.step, **json_obj})
        self.rows.append({"model": self.model, "step": self.step, "group": group, "analysis": analysis,
                          "problem": problem})


def over_checkpoints(body: Callable[..., None]) -> Callable[..., None]:
    """Run a one-checkpoint command body over every MODEL argument (module docstring)."""

    @functools.wraps(body)
    def command(**kw: Any) -> None:
        from .common import is_main_process, print_json, stderr_console

        models, several = expand_models(kw["model"])
        data = kw.get("data")
        if data and os.path.isfile(data) and len(models) > 1:  # a run's folder often holds its data file too
            models = [m for m in models if not (os.path.isfile(m) and os.path.samefile(m, data))]
        steps = parse_steps(kw.get("train_steps"), models)
        if kw.get("train_steps") is None and all(s is not None for s in steps):  # training order, not the shell's
            order = sorted(range(len(models)), key=lambda i: (steps[i], i))
            models, steps = [models[i] for i in order], [steps[i] for i in order]
        if not several:  # (-o DIR and --plot DIR name the file after the model, as with several)
            paths = {opt: output_paths(flag, kw.get(opt), models, steps)[0] for opt, flag in _PATH_OPTIONS.items()
                     if opt in kw}
            body(**{**kw, **paths, "model": models[0], "step": steps[0]})
            return
        outputs = {opt: output_paths(flag, kw.get(opt), models, steps) for opt, flag in _PATH_OPTIONS.items()
                   if opt in kw}
        log = stderr_console(kw.get("quiet", False))
        run = Run()
        store: Any = None  # basins.analyses.eigen.WarmStarts, made once torch is imported
        failures: list[tuple[str, BaseException]] = []
        for i, (model, step) in enumerate(zip(models, steps)):
            log.rule(f"checkpoint {i + 1}/{len(models)}: {model}" + (f" (step {step})" if step is not None else ""),
                     style="dim")
            run.model, run.step = model, step
            one = {**kw, "model": model, "step": step, "_run": run}
            one.update({opt: paths[i] for opt, paths in outputs.items()})
            try:
                if store is None:
                    from basins.analyses.eigen import WarmStarts

                    store = WarmStarts()
                from basins.analyses.eigen import warm_starts

                with warm_starts(store):  # Lanczos runs of the next checkpoint start from this one's
                    body(**one)
                if store.warm:
                    log.print(f"{store.warm} Lanczos run(s) warm-started from the previous checkpoint")
            except click.exceptions.Exit as exc:  # rank 0 failed writing: its message is shown already
                if exc.exit_code == 0:
                    continue
                failures.append((model, exc))
                run.json.append({"model": model, "step": step, "error": f"exit {exc.exit_code}"})
            except (BasinsError, Exception) as exc:  # noqa: BLE001 - one checkpoint's failure is reported
                if _debug() or received() is not None:  # an interrupt ends the whole run
                    raise
                failures.append((model, exc))
                kind = "error" if isinstance(exc, InputError) else "failed"
                text = str(exc) if isinstance(exc, BasinsError) else f"internal error: {type(exc).__name__}: {exc}"
                echo_error(f"{kind}: {model}: {text}")
                run.json.append({"model": model, "step": step, "error": text,
                                 "exit_code": 2 if isinstance(exc, InputError) else 1})
        if kw.get("as_json"):
            print_json(run.json)
        elif run.rows and is_main_process():
            from .common import stdout_console

            stdout_console().print(checkpoint_table(run.rows))
        if failures:
            names = ", ".join(m for m, _ in failures[:5]) + (", ..." if len(failures) > 5 else "")
            echo_error(f"failed: {len(failures)} of {len(models)} checkpoints ({names})")
            all_input = len(failures) == len(models) and all(isinstance(e, InputError) for _, e in failures)
            raise click.exceptions.Exit(2 if all_input else 1)

    return command


def _debug() -> bool:
    """``--debug`` or ``BASINS_DEBUG`` (the command group's rule; click shares ``meta`` along the context chain)."""
    from .main import _debug as debug

    return debug(click.get_current_context())


def checkpoint_table(rows: list[dict[str, Any]]) -> Any:
    """One row per checkpoint: step, model, L(θ*), ‖∇L‖ and the group's ``summary_row`` cells."""
    from rich.table import Table

    from .common import fmt
    from .summary import row_cells

    cells = [row_cells(r["group"], r["analysis"]) for r in rows]
    keys: list[str] = []
    for c in cells:
        keys += [k for k in c if k not in keys]
    t = Table(title=f"{rows[0]['group']} over {len(rows)} checkpoints", title_justify="left")
    for col in ("step", "model", "L(θ*)", "‖∇L‖", *keys):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r, c in zip(rows, cells):
        p = r["problem"]
        t.add_row("-" if r["step"] is None else str(r["step"]), r["model"], fmt(p.get("loss_at_optimum")),
                  fmt(p.get("grad_norm"), 3), *(c.get(k, "-") for k in keys))
    return t
