"""The ``basins`` command group: lazily loaded subcommands and the exit-code contract.

Exit codes: 0 success; 2 bad usage or input (missing file, wrong format, shape
mismatch, non-finite data); 1 failure at run time (non-finite loss, no convergence under
``--strict``, internal errors); 130 interrupted by SIGINT, 143 by SIGTERM, 129 by SIGHUP (a report
being written is left as it was; see :mod:`basins.cli.signals`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from basins import __version__
from basins.errors import BasinsError, InputError

from .signals import Interrupted, received
from .terminal import echo_error, escape_warnings

#: name -> (module within basins.cli, attribute, one-line help shown by ``basins --help``)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "example": ("example", "example", "Write a small trained example bundle."),
    "hessian": ("hessian", "hessian", "Top/bottom Hessian eigenvalues by Lanczos, and the trace."),
    "spectrum": ("spectrum", "spectrum", "Hessian spectral density by stochastic Lanczos quadrature."),
    "nullity": ("nullity", "nullity", "Count near-zero Hessian eigenvalues (flat directions)."),
    "features": ("features", "features", "Feature Gram (NTK) spectrum and rank of the output Jacobian."),
    "volume": ("volume", "volume", "Basin volume and wall shape by random probing."),
    "llc": ("llc", "llc", "Local learning coefficient by SGLD (singular learning theory)."),
    "evidence": ("evidence", "evidence", "Laplace log evidence (Occam factor) around the minimum."),
    "landscape": ("landscape", "landscape", "Loss along 1-D/2-D slices, or between two checkpoints."),
    "summary": ("summary", "summary", "Show one or more reports as tables, JSON or CSV."),
    "plot": ("plot", "plot", "Draw a report's analyses, or several reports against training step."),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when it runs (torch is slow to import),
    and maps library errors to exit codes with a one-line message."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _, _) in COMMANDS.items() if _module_exists(mod)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _module_exists(COMMANDS[cmd_name][0]):
            return None
        module_name, attr, _ = COMMANDS[cmd_name]
        module = importlib.import_module(f"{__package__}.{module_name}")
        command: click.Command = getattr(module, attr)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (KeyboardInterrupt, Interrupted) as exc:
            code = exc.code if isinstance(exc, Interrupted) else 130
            echo_error("interrupted; any report being written was left as it was")
            sys.exit(code)
        except (BasinsError, Exception) as exc:
            signum = received()
            if signum is not None:  # the interrupt's unwinding surfaced as another error: still an interrupt
                echo_error("interrupted; any report being written was left as it was")
                sys.exit(128 + signum)
            if not isinstance(exc, BasinsError):
                if _debug(ctx):
                    raise
                first = str(exc).splitlines()[0] if str(exc) else ""
                echo_error(f"internal error: {type(exc).__name__}: {first} (rerun with --debug for a traceback)")
                sys.exit(1)
            if _debug(ctx):
                raise
            kind = "error" if isinstance(exc, InputError) else "failed"
            echo_error(f"{kind}: {self._in_flags(ctx, exc)}")
            sys.exit(2 if isinstance(exc, InputError) else 1)


    def _in_flags(self, ctx: click.Context, exc: BasinsError) -> str:
        """The message of a library error as the command line speaks: the flag of its ``param``
        first, and the parameters it names spelled as the invoked command's flags."""
        from .common import spoken

        name = ctx.invoked_subcommand
        command = self.get_command(ctx, name) if name else None
        return spoken(exc, list(command.params) if command is not None else [])


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(f"{__package__}.{module}") is not None


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.meta.get("basins.debug")) or os.environ.get("BASINS_DEBUG", "") not in ("", "0")


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["basins.debug"] = True
    return value


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="basins")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Show a traceback on errors.")
def main() -> None:
    """Geometry of the loss basin of a trained PyTorch model.

    \b
    Quick start:
      basins example                          # writes basins-example/model.pt
      basins hessian basins-example/model.pt -o r.h5
      basins summary r.h5
    """
    escape_warnings()
