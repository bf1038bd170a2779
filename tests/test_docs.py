"""The README stays a short entry point: the two commands, a tour and tables; the reference is `--help`."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_is_at_most_2500_words() -> None:
    words = len(README.read_text(encoding="utf-8").split())  # as `wc -w` counts them
    assert 500 < words <= 2500, words


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    first, second = text.index("basins example"), text.index("<!-- test-command -->")
    assert first < second < text.index("## A short tour")
