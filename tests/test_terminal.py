"""The terminal is safe: strings from inputs (paths, messages, attributes, cells) reach it with
control characters escaped and rich markup off (``basins.cli.terminal``)."""

from __future__ import annotations

import io
from pathlib import Path

from click.testing import CliRunner
from rich.table import Table

from basins.cli.main import main
from basins.cli.terminal import SafeConsole, safe

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b]8;;file:///etc/passwd\x1b\\link\x1b]8;;\x1b\\\u202e[link=https://x]y[/link]\x9b"


def test_safe_escapes_every_control_character() -> None:
    out = safe(HOSTILE + "\nnext")
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in out)
    assert "\\x1b]0;pwned\\x07" in out and "\\u202e" in out and "\\x0a" in out
    assert safe("a\nb", newlines=True) == "a\nb"


def test_console_prints_no_escape_and_no_markup_from_strings() -> None:
    buf = io.StringIO()
    console = SafeConsole(file=buf, force_terminal=True, width=200)
    console.print(f"[yellow]warning:[/] {HOSTILE}")
    table = Table(title=HOSTILE)
    table.add_column(HOSTILE)
    table.add_row(HOSTILE)
    console.print(table)
    text = buf.getvalue()
    for bad in ("\x1b]", "\x07", "\x1b[2J", "\u202e", "\x9b"):
        assert bad not in text
    assert "[link=https://x]y[/link]" in text  # markup from a string is printed as text
    assert "\x1b[33mwarning:" in text  # basins' own markup still styles


def test_error_line_with_a_hostile_path_is_escaped(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["hessian", str(tmp_path / f"model{HOSTILE}.pt2"), "--data", "x.pt"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "\x1b" not in r.stderr and "\x07" not in r.stderr and "\\x1b]0;pwned" in r.stderr


def test_warnings_are_printed_escaped() -> None:
    import warnings

    from basins.cli.terminal import escape_warnings

    saved, shown = warnings.showwarning, []
    try:
        warnings.showwarning = lambda *args: shown.append(args)  # the display escape_warnings wraps
        escape_warnings()
        warnings.showwarning(UserWarning(f"from a file: {HOSTILE}"), UserWarning, f"model{HOSTILE}.py", 3)
    finally:
        warnings.showwarning = saved
    text = " ".join(str(a) for a in shown[0])
    assert "from a file" in text and "\x1b" not in text and "\\x1b]0;pwned" in text
