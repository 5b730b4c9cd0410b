"""Text from files (tensor names, sources, reasons) made safe to print on a terminal.

A checkpoint can name a tensor with an escape sequence (``\\x1b[2J`` clears the screen), a
newline (a fake table row) or a NUL. :func:`printable` writes every control or format character
as its Python escape, so what a command prints is what the file holds, visibly; everything else
(any script, any symbol) is left as it is.
"""

from __future__ import annotations

import unicodedata

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    return (
        f"\\x{code:02x}"
        if code <= 0xFF
        else f"\\u{code:04x}"
        if code <= 0xFFFF
        else f"\\U{code:08x}"
    )


def printable(text: str) -> str:
    """``text`` with each control (Cc) or format (Cf) character escaped (``\\x1b``, ``\\n``)."""
    if text.isprintable():
        return text
    return "".join(
        _escape(ch) if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text
    )
