"""Output files of a command: checked before the work, written all together or not at all.

:func:`check_file` and :func:`check_dir` run before a command starts its work and raise a
one-line :class:`KappaTuneError` for a location that cannot be written (a directory where a
file is wanted, a parent that is a file, a folder without write permission).
:func:`write_all` stages every output as a temporary file beside its target, and only when
all of them are written renames them into place; a failure leaves no output behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kappatune.errors import KappaTuneError
from kappatune.jsonio import stage_file


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_folder(folder: Path, flag: str, path: Path) -> None:
    """``folder`` (or its nearest existing ancestor, created on writing) must take new files."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise KappaTuneError(f"{flag} {path}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise KappaTuneError(f"{flag} {path}: cannot write into {base} (permission denied)")


def check_file(path: Path | None, flag: str, suffixes: Sequence[str] = ()) -> None:
    """Raise unless ``path`` (when given) can be written as a file by :func:`write_all`."""
    if path is None:
        return
    if path.is_dir():
        raise KappaTuneError(f"{flag} {path} is a directory; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise KappaTuneError(f"{flag} {path} should end in {' or '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise KappaTuneError(f"{flag} {path}: cannot replace it (permission denied)")
    _check_folder(path.parent, flag, path)


def check_dir(path: Path, flag: str) -> None:
    """Raise unless ``path`` is, or can be created as, a directory that takes new files."""
    if path.exists() and not path.is_dir():
        raise KappaTuneError(f"{flag} {path} exists and is not a directory")
    _check_folder(path, flag, path)


def write_all(files: Sequence[tuple[Path, bytes]]) -> None:
    """Write every (path, bytes) pair, or none: stage each beside its target, then rename."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            staged.append((stage_file(path, data), path))
        while staged:
            tmp, path = staged[0]
            os.replace(tmp, path)
            staged.pop(0)
    except OSError as exc:
        raise KappaTuneError(
            f"cannot write {exc.filename or 'an output'}: {exc.strerror or exc}"
        ) from None
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
