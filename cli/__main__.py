"""``python -m basins.cli`` and the ``basins`` console script (:func:`run`).

Signal handlers go in before anything heavy is imported (:mod:`basins.cli.signals`), so an
interrupt at any moment exits with 128 + its number. Importing :mod:`basins.cli.main` (as
tests do) installs none.

Under ``torchrun``, a process ends with ``os._exit`` once its output is flushed and its process
group destroyed: the C++ destructors of gloo's threads at interpreter exit otherwise abort a
rank now and then ("terminate called without an active exception", exit −6) after its work
is done and its report written.
"""

import os
import sys

from .signals import install

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
    distributed = sys.modules.get("basins.engine.distributed")  # never import here: an interrupt may
    if distributed is not None:  # have left torch half-imported
        try:
            launched = distributed.is_initialized()
        except Exception:  # noqa: BLE001 - a half-imported module: no process group to end
            launched = False
        if launched:
            sys.stdout.flush()
            sys.stderr.flush()
            distributed.teardown()
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
