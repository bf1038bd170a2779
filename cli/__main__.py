"""``python -m basins.cli`` and the ``basins`` console script (:func:`run`).

Signal handlers go in before anything heavy is imported (:mod:`basins.cli.signals`), so an
interrupt at any moment exits with 128 + its number. Importing :mod:`basins.cli.main` (as
tests do) installs none.

A run ends with ``os._exit`` once its output is flushed (and, under ``torchrun``, its process
group destroyed), with the handled signals ignored from the moment the command returned: the
interpreter's own teardown (with torch loaded, hundreds of milliseconds) restores the default
signal actions, so a signal arriving then killed a finished run (exit −15), and the C++
destructors of gloo's threads aborted a torchrun rank now and then ("terminate called without
an active exception", exit −6) after its work was done and its report written.
"""

import os
import sys

from .signals import ignore_signals, install, received

install()

from .main import main  # noqa: E402


def run() -> None:
    """The console-script entry point."""
    try:
        main(prog_name="basins")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    else:  # pragma: no cover - click's standalone mode always exits
        code = 0
    ignore_signals()  # the work is done and the report written: a late signal changes nothing
    if received() is not None:  # an interrupt whose exception something swallowed still ends the run as interrupted
        code = 128 + received()  # type: ignore[operator]
    distributed = sys.modules.get("basins.engine.distributed")  # never import here: an interrupt may
    if distributed is not None:  # have left torch half-imported
        try:
            if distributed.is_initialized():
                distributed.teardown()
        except Exception:  # noqa: BLE001 - a half-imported module: no process group to end
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
