"""One exception type for everything the user can fix (bad paths, options, data), and the
helpers that put untrusted text (names, values, messages) into its one-line message."""

from __future__ import annotations


class KappaTuneError(ValueError):
    """A problem with the user's input. The CLI prints its message as one line, exit code 2."""


def clip(text: str, limit: int = 48) -> str:
    """``text`` cut to ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(name: str, limit: int = 80) -> str:
    """A name as its repr (control characters stay on one line), shortened."""
    return clip(repr(name), limit)


def shown(name: str, limit: int = 80) -> str:
    """A file name as it is when printable, else as its repr; shortened."""
    return clip(name, limit) if name.isprintable() else short(name, limit)


def one_line(text: str, limit: int = 200) -> str:
    """A message flattened to one shortened line."""
    return clip(" ".join(text.split()), limit)
