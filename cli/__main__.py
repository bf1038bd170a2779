"""``python -m basins.cli`` and the ``basins`` console script (:func:`run`).

Signal handlers go in before anything heavy is imported (:mod:`basins.cli.signals`), so an
interrupt at any moment exits with 128 + its number. Importing :mod:`basins.cli.main` (as
tests do) installs none.
"""

from .signals import install

install()

from .main import main  # noqa: E402


def run() -> None:
    """The console-script entry point."""
    main(prog_name="basins")


if __name__ == "__main__":
    main(prog_name="basins")
