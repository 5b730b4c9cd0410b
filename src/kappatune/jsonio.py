"""JSON helpers shared by every versioned file kappatune writes: non-finite floats, atomic writes."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def encode_float(x: float) -> float | str | None:
    """inf -> "inf", -inf -> "-inf", nan -> null (strict JSON has no such numbers)."""
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def fields_json(obj: DataclassInstance, floats: Iterable[str]) -> dict[str, Any]:
    """``asdict(obj)`` with the fields named in ``floats`` written by :func:`encode_float`."""
    d = asdict(obj)
    for f in floats:
        d[f] = encode_float(d[f])
    return d


def decode_float(x: Any) -> float:
    if x is None:
        return math.nan
    return float(x)  # float("inf") / float("-inf") parse the string forms


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def new_file_mode(existing: str | os.PathLike[str] | None = None) -> int:
    """The mode a written file gets: ``existing``'s when it is a file that is being replaced,
    else what ``open()`` would give (0666 less the umask), not mkstemp's 0600."""
    if existing is not None:
        try:
            return stat.S_IMODE(os.stat(existing).st_mode)
        except OSError:
            pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write to a temporary file beside the target, then rename over it.

    The file gets the mode ``open()`` would give it (or keeps the mode of the file it replaces).
    """
    target = Path(path)
    tmp = stage_file(target, data)
    try:
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stage_file(target: Path, data: bytes) -> str:
    """``data`` in a synced temporary file beside ``target`` (with the mode ``target`` will
    have), ready to be renamed over it; the temporary file's path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), new_file_mode(target))
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def json_bytes(obj: Any) -> bytes:
    """The bytes kappatune writes for a JSON document (indented, strict, newline-terminated)."""
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def read_json_object(path: str | os.PathLike[str], what: str, missing: str) -> dict[str, Any]:
    """A JSON object from ``path``; a user-facing error names ``what`` the file should be.

    ``missing`` is the message when the file does not exist.
    """
    from kappatune.errors import KappaTuneError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KappaTuneError(f"{missing}: {path}") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise KappaTuneError(f"cannot read {what} {path}: {exc}") from None
    except RecursionError:
        raise KappaTuneError(f"cannot read {what} {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise KappaTuneError(f"cannot read {what} {path}: not a JSON object")
    return data


def check_schema(
    d: Mapping[str, Any],
    what: str,
    readable: int | Collection[int],
    *,
    kind: str | None = None,
    required: bool = True,
) -> int:
    """The ``schema_version`` of a versioned JSON object, or a user-facing error.

    ``readable`` is the version (or versions) this kappatune reads; ``kind``, when given, must
    equal ``d["kind"]``; ``required=False`` takes a missing version as the newest readable one.
    """
    from kappatune.errors import KappaTuneError

    versions = (readable,) if isinstance(readable, int) else tuple(readable)
    version = d.get("schema_version", None if required else max(versions))
    if version not in versions:
        raise KappaTuneError(
            f"unsupported {what} schema_version {version!r}"
            f" (this kappatune reads {', '.join(map(str, versions))})"
        )
    if kind is not None and d.get("kind") != kind:
        raise KappaTuneError(f"not a kappatune {what} file (kind {d.get('kind')!r}, not {kind!r})")
    return int(version)
