"""``python -m basins.cli``."""

from .main import main

if __name__ == "__main__":
    main()
