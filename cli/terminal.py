"""Printing strings that come from input files without letting them drive the terminal.

A model's assert message, a checkpoint's file name, a report attribute or a parameter name can
carry escape sequences (set the window title, clear the screen, write an OSC 8 link) or rich
markup (``[link=...]``). Everything the command line prints goes through here:

* :func:`safe` escapes control characters (C0 except, where asked, the newline; DEL; C1; the
  Unicode line separators and bidirectional overrides) as ``\\xNN``/``\\uNNNN``;
* :class:`SafeConsole` is a ``rich`` console with markup, emoji and highlighting off that passes
  every string it renders (``print``, table cells, titles) through :func:`safe`. The only markup
  it honours is the fixed set written in this package's code (:data:`_CODE_MARKUP`), matched
  as whole prefixes or cells, never parsed out of a string;
* :func:`echo` / :func:`echo_error` print one line with click, escaped (an error message is
  always one line: its newlines are escaped too);
* :func:`escape_warnings` makes Python's warnings (a library's, torch's) print escaped too.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import click
from rich.console import Console
from rich.text import Text

__all__ = ["safe", "SafeConsole", "echo", "echo_error", "escape_warnings"]

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_NL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

#: markup written by basins' own code: recognised as a whole prefix or a whole cell, nowhere else
_CODE_MARKUP_PREFIXES = ("[yellow]warning:[/] ", "[yellow]note:[/] ")
_CODE_MARKUP_CELLS = frozenset({"[red]yes: negative curvature[/]"})


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: object, *, newlines: bool = False) -> str:
    """``str(text)`` with control characters escaped; ``newlines`` keeps ``\\n`` as is."""
    return (_CONTROL_KEEP_NL if newlines else _CONTROL).sub(_escape, str(text))


class SafeConsole(Console):
    """A console that never sends a control character or markup from a string to the terminal."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.update(markup=False, emoji=False, highlight=False)
        super().__init__(**kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:  # type: ignore[override]
        kwargs.update(markup=False, emoji=False, highlight=False)
        text = safe(text, newlines=True)
        if text in _CODE_MARKUP_CELLS:
            return Text.from_markup(text)
        for prefix in _CODE_MARKUP_PREFIXES:
            if text.startswith(prefix):
                head = Text.from_markup(prefix)
                head.append_text(super().render_str(text[len(prefix):], **kwargs))
                return head
        return super().render_str(text, **kwargs)


def echo(line: object, *, err: bool = False) -> None:
    """Print ``line`` (escaped, newlines kept) with click."""
    click.echo(safe(line, newlines=True), err=err)


def echo_error(line: object) -> None:
    """Print one line to stderr, every control character (newlines too) escaped."""
    click.echo(safe(line), err=True)


def escape_warnings() -> None:
    """Route Python's warning display through :func:`safe` (a warning can quote a file's content)."""
    if getattr(warnings.showwarning, "_basins_safe", False):
        return
    shown = warnings.showwarning

    def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                    line: str | None = None) -> None:
        shown(safe(message, newlines=True), category, safe(filename), lineno, file, safe(line or "", newlines=True))

    showwarning._basins_safe = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning
