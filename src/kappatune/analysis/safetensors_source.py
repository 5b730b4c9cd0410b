"""safetensors files (one or a shard set) as a Source: tensors read with positioned reads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from kappatune.analysis.safetensors_header import read_header
from kappatune.analysis.source_base import TensorEntry, content_digest, read_chunks
from kappatune.errors import KappaTuneError, short


class SafetensorsSource:
    """One or more safetensors files (a shard set); tensors read with positioned reads."""

    def __init__(self, paths: list[Path], description: str | None = None) -> None:
        self._paths = paths
        self.description = description or str(paths[0] if len(paths) == 1 else paths[0].parent)

    def files(self) -> list[Path]:
        return list(self._paths)

    def entries(self) -> list[TensorEntry]:
        out: list[TensorEntry] = []
        seen: dict[str, Path] = {}
        for path in self._paths:
            for t in read_header(path):
                if t.name in seen:
                    raise KappaTuneError(
                        f"tensor {short(t.name)} is in two shards: {seen[t.name].name}"
                        f" and {path.name}"
                    )
                seen[t.name] = path
                locator = (path, t.offset, t.nbytes)
                out.append(TensorEntry(t.name, t.shape, t.dtype, locator, t.unreadable))
        return out

    def read(self, entry: TensorEntry) -> tuple[torch.Tensor, str]:
        path, offset, nbytes = entry.locator
        buf = bytearray(nbytes)
        with path.open("rb") as fh:
            fh.seek(offset)
            if fh.readinto(buf) != nbytes:
                raise KappaTuneError(
                    f"corrupt safetensors file {path}: truncated at {entry.name!r}"
                )
        digest = content_digest(memoryview(buf), entry.dtype, entry.shape)
        return self._decode(entry, buf), digest

    @staticmethod
    def _decode(
        entry: TensorEntry, buf: bytes | bytearray, rows: int | None = None
    ) -> torch.Tensor:
        shape = entry.shape if rows is None else (rows, *entry.shape[1:])
        if not buf:
            return torch.empty(shape, dtype=getattr(torch, entry.dtype))
        t = torch.frombuffer(bytearray(buf) if isinstance(buf, bytes) else buf, dtype=torch.uint8)
        return t.view(getattr(torch, entry.dtype)).reshape(shape)

    def row_chunks(
        self, entry: TensorEntry, rows: int, decode: bool
    ) -> Iterator[tuple[bytes, torch.Tensor | None]]:
        path, offset, nbytes = entry.locator
        row_bytes = nbytes // entry.shape[0]
        for raw in read_chunks(path, offset, nbytes, rows * row_bytes):
            yield raw, self._decode(entry, raw, len(raw) // row_bytes) if decode else None
