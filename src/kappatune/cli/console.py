"""The commands' rich console: tables keep their width when the output is a file or a pipe."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


def wide_console(min_width: int = 140, stderr: bool = False) -> Console:
    """A console without markup highlighting, at least ``min_width`` columns off a terminal."""
    from rich.console import Console

    console = Console(highlight=False, stderr=stderr)
    if not console.is_terminal:
        console.width = max(console.width, min_width)
    return console
