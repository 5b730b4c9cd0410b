"""Content-keyed, atomic, resumable store of per-tensor spectral metrics.

Entries are keyed by the digest of a tensor's raw bytes (plus the algorithm version and
how the tensor is split into matrices), never by a file name. Each tensor's entry is
written as soon as it is computed, by rename, so an interrupted run keeps its work and
concurrent processes never see half a file. A per-file stat index remembers the digests of
unchanged files, so a second run reads no weights at all: a file counts as unchanged while its
device, inode, size, modification time and status-change time (ctime) are all the same, and
the index carries a checksum of what it records. Every entry read back is checked against the
row schema and the tensor it is used for (see ``rows_problem``); anything that does not fit
is ignored with a warning and recomputed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kappatune.analysis.metrics import METRIC_FIELDS
from kappatune.jsonio import atomic_write_json

log = logging.getLogger(__name__)

ALGORITHM_VERSION = 3  # 2: xxh3-128 content digests; 3: rows carry Spectrum's SNR
_FORMAT = 1
_INDEX_FORMAT = 2  # 2: device, inode, size, mtime, ctime; checksum over the record
_DIGEST = re.compile(r"[0-9a-f]{32}")
_FLOATS = METRIC_FIELDS
_ROW_KEYS = (*_FLOATS, "expert", "shape", "numel", "method")
Matrix = tuple[int | None, tuple[int, int]]  # (expert index or None, matrix shape)
RowCheck = Callable[[list[Any]], str | None]


MAX_ENTRY_BYTES = 16 * 2**20  # an entry holds a matrix's rows (one per expert): kilobytes


def read_regular(path: Path, limit: int = MAX_ENTRY_BYTES) -> str:
    """The text of ``path`` when it is a regular file of at most ``limit`` bytes: a symbolic
    link, a device (``/dev/zero``), a FIFO or an oversized file raises OSError, unread."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{path} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise OSError(f"{path} is larger than {limit} bytes")
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def default_cache_dir() -> Path:
    env = os.environ.get("KAPPATUNE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kappatune"


class SpectrumCache:
    """Directory-backed cache; constructing it does no I/O."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def _row_path(self, key: str) -> Path:
        return self.root / "spectra" / key[:2] / f"{key}.json"

    def _stat_path(self, file: Path) -> Path:
        h = hashlib.blake2b(str(file.resolve()).encode(), digest_size=16).hexdigest()
        return self.root / "files" / f"{h}.json"

    @staticmethod
    def key(digest: str, layout: str, *, kappa_only: bool = False) -> str:
        """Rows of the kappa-only route (other metrics null) live under their own key."""
        return f"{digest}-v{ALGORITHM_VERSION}-{layout}" + ("-kappa" if kappa_only else "")

    def get(self, key: str, check: RowCheck | None = None) -> list[dict[str, Any]] | None:
        """The rows stored under ``key``, or None; rows that ``check`` faults are ignored."""
        path = self._row_path(key)
        try:
            payload = json.loads(read_regular(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
            log.warning("ignoring corrupt cache entry %s (%s); recomputing", path, reason)
            return None
        if (
            not isinstance(payload, dict)
            or payload.get("format") != _FORMAT
            or payload.get("key") != key
            or not isinstance(payload.get("rows"), list)
        ):
            log.warning("ignoring corrupt cache entry %s; recomputing", path)
            return None
        problem = check(payload["rows"]) if check is not None else None
        if problem:
            log.warning("ignoring corrupt cache entry %s (%s); recomputing", path, problem)
            return None
        return payload["rows"]

    def put(self, key: str, rows: list[dict[str, Any]]) -> None:
        try:
            atomic_write_json(self._row_path(key), {"format": _FORMAT, "key": key, "rows": rows})
        except OSError as exc:
            log.warning("could not write cache entry for %s: %s", key, exc)

    @staticmethod
    def stat_key(file: Path) -> tuple[int, ...]:
        """What the stat shortcut compares: device, inode, size, mtime and ctime (ns)."""
        st = file.stat()
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @staticmethod
    def _seal(path: str, stat: Sequence[int], digests: dict[str, str]) -> str:
        record = json.dumps([path, list(stat), digests], sort_keys=True)
        return hashlib.blake2b(record.encode(), digest_size=16).hexdigest()

    def file_digests(self, file: Path, stat: Sequence[int] | None = None) -> dict[str, str]:
        """Digests recorded for ``file`` when it had ``stat`` (default: its current stat key)."""
        digests = self._recorded(file, stat)
        if digests is None:
            log.warning(
                "ignoring cache index %s for %s: it fails its checksum", self._stat_path(file), file
            )
            return {}
        return digests

    def _recorded(self, file: Path, stat: Sequence[int] | None) -> dict[str, str] | None:
        """The recorded digests ({} if none apply), or None if the record fails its checksum."""
        try:
            payload = json.loads(read_regular(self._stat_path(file)))
            current = list(stat if stat is not None else self.stat_key(file))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return {}
        if (
            not isinstance(payload, dict)
            or payload.get("format") != _INDEX_FORMAT
            or payload.get("path") != str(file.resolve())
            or payload.get("stat") != current
        ):
            return {}  # another file, an older format, or the file changed since
        digests = payload.get("digests")
        if (
            not isinstance(digests, dict)
            or not all(isinstance(v, str) and _DIGEST.fullmatch(v) for v in digests.values())
            or payload.get("seal") != self._seal(payload["path"], current, digests)
        ):
            return None
        return dict(digests)

    def put_file_digests(
        self, file: Path, digests: dict[str, str], stat: Sequence[int] | None = None
    ) -> None:
        """Record ``digests`` for ``file``, unless it changed since it had ``stat``."""
        if not digests:
            return
        try:
            current = list(self.stat_key(file))
        except OSError:
            return
        if stat is not None and list(stat) != current:
            log.warning("%s changed during the analysis; its digests are not recorded", file)
            return
        merged = {**(self._recorded(file, current) or {}), **digests}
        path = str(file.resolve())
        record = {
            "format": _INDEX_FORMAT,
            "path": path,
            "stat": current,
            "digests": merged,
            "seal": self._seal(path, current, merged),
        }
        try:
            atomic_write_json(self._stat_path(file), record)
        except OSError as exc:
            log.warning("could not write cache index for %s: %s", file, exc)


def _number(value: Any) -> float | None:
    """A metric as stored (number, "inf", "-inf" or null for nan); None if malformed."""
    if value is None:
        return math.nan
    if value in ("inf", "-inf"):
        return float(value)
    if type(value) in (int, float) and math.isfinite(value):
        return float(value)
    return None


def _row_problem(row: Any, expert: int | None, shape: tuple[int, int]) -> str | None:
    if not isinstance(row, dict):
        return "a row is not an object"
    missing = [k for k in _ROW_KEYS if k not in row]
    if missing:
        return f"a row lacks {', '.join(missing)}"
    got = row["expert"]
    if not (got is None if expert is None else type(got) is int and got == expert):
        return f"expert {got!r} where {expert!r} was expected"
    if not (isinstance(row["shape"], list) and all(type(d) is int for d in row["shape"])):
        return "a row's shape is not a list of integers"
    if tuple(row["shape"]) != shape or row["numel"] != shape[0] * shape[1]:
        return f"shape {row['shape']} where {list(shape)} was expected"
    if type(row["numel"]) is not int or not isinstance(row["method"], str):
        return "a row's numel or method has the wrong type"
    values = {k: _number(row[k]) for k in _FLOATS}
    if any(v is None for v in values.values()):
        return "a metric is not a number"
    kappa, smax, smin = values["kappa"], values["sigma_max"], values["sigma_min"]
    assert kappa is not None and smax is not None and smin is not None
    if not (math.isfinite(smax) and 0.0 <= smin <= smax):
        return "singular values out of order"
    expected = math.inf if smin == 0.0 else smax / smin
    if not math.isclose(kappa, expected, rel_tol=1e-9):
        return "kappa differs from sigma_max / sigma_min"
    return None


def rows_problem(rows: list[Any], matrices: Sequence[Matrix]) -> str | None:
    """Why ``rows`` are not the cached metrics of exactly ``matrices``, or None if they are."""
    if len(rows) != len(matrices):
        return f"{len(rows)} rows for {len(matrices)} matrices"
    for row, (expert, shape) in zip(rows, matrices, strict=True):
        problem = _row_problem(row, expert, shape)
        if problem:
            return problem
    return None
