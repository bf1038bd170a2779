"""``basins --help``, ``--version`` and every command's ``--help`` import neither torch (it takes seconds) nor matplotlib."""

from __future__ import annotations

import subprocess
import sys

import pytest

from basins.cli.main import COMMANDS

_PROBE = (
    "import sys\n"
    "from basins.cli.main import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('torch' in sys.modules or 'matplotlib' in sys.modules, file=sys.stderr)\n"
)


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([name, "--help"] for name in COMMANDS)])
def test_help_and_version_import_no_torch(args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "nothing printed"
    assert r.stderr.strip().splitlines()[-1] == "False", f"basins {' '.join(args)} imported torch or matplotlib"
