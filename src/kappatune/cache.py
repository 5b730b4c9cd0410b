"""Content-keyed, atomic, resumable store of per-tensor spectral metrics.

Entries are keyed by the digest of a tensor's raw bytes (plus the algorithm version and
how the tensor is split into matrices), never by a file name. Each tensor's entry is
written as soon as it is computed, by rename, so an interrupted run keeps its work and
concurrent processes never see half a file. A per-file stat index (size, mtime, inode)
remembers the digests of unchanged files, so a second run reads no weights at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from kappatune.jsonio import atomic_write_json

log = logging.getLogger(__name__)

ALGORITHM_VERSION = 2  # 2: xxh3-128 content digests
_FORMAT = 1


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

    def get(self, key: str) -> list[dict[str, Any]] | None:
        path = self._row_path(key)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("ignoring corrupt cache entry %s (%s); recomputing", path, exc)
            return None
        if (
            not isinstance(payload, dict)
            or payload.get("format") != _FORMAT
            or payload.get("key") != key
            or not isinstance(payload.get("rows"), list)
        ):
            log.warning("ignoring corrupt cache entry %s; recomputing", path)
            return None
        return payload["rows"]

    def put(self, key: str, rows: list[dict[str, Any]]) -> None:
        try:
            atomic_write_json(self._row_path(key), {"format": _FORMAT, "key": key, "rows": rows})
        except OSError as exc:
            log.warning("could not write cache entry for %s: %s", key, exc)

    @staticmethod
    def _stat_of(file: Path) -> list[int]:
        st = file.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def file_digests(self, file: Path) -> dict[str, str]:
        """Digests recorded for ``file`` if it is unchanged since they were recorded."""
        try:
            payload = json.loads(self._stat_path(file).read_text(encoding="utf-8"))
            if payload.get("stat") == self._stat_of(file) and payload.get("path") == str(
                file.resolve()
            ):
                return {str(k): str(v) for k, v in payload["digests"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return {}

    def put_file_digests(self, file: Path, digests: dict[str, str]) -> None:
        if not digests:
            return
        merged = {**self.file_digests(file), **digests}
        try:
            atomic_write_json(
                self._stat_path(file),
                {"path": str(file.resolve()), "stat": self._stat_of(file), "digests": merged},
            )
        except OSError as exc:
            log.warning("could not write cache index for %s: %s", file, exc)
