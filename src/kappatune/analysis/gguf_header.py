"""A GGUF header read with every count bounded by the file's size before anything is allocated.

Metadata scalars and strings are kept, arrays are skipped (gguf-py's reader decodes every
array: a 262k-token vocabulary takes ~15 s; the analysis needs only the tensor table, the
architecture and the alignment). Counts of keys, tensors, array elements and string bytes
must fit in what is left of the file, arrays nest at most ``MAX_NESTING`` deep, a tensor has at
most ``MAX_DIMS`` dimensions (GGML's limit), and the tensor table is checked as llama.cpp
checks it: known types, whole blocks per row, element counts within int64, aligned offsets,
data inside the file and no two tensors sharing bytes or a name.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kappatune.errors import KappaTuneError, short

if TYPE_CHECKING:  # gguf is an optional dependency, imported when a GGUF file is read
    from gguf.constants import GGMLQuantizationType

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays; llama.cpp itself reads none
MAX_STRING = 1 << 24
_I64 = 1 << 63
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MIN_VALUE = {**{t: struct.calcsize(f) for t, f in _SCALAR.items()}, _STRING: 8, _ARRAY: 12}
_MIN_KV = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ne: tuple[int, ...]  # GGML order: fastest-varying dimension first
    qtype: GGMLQuantizationType
    offset: int  # absolute in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    meta: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]
    data_start: int


class _Bad(Exception):
    pass


def _fail(message: str) -> NoReturn:
    raise _Bad(message)


class _Reader:
    """Positioned reads from a memory map; every read is checked against the file's end."""

    def __init__(self, buf: mmap.mmap | bytes, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def left(self) -> int:
        return self.size - self.pos

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        n = struct.calcsize(fmt)
        if n > self.size - self.pos:
            _fail("truncated header")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def count(self, what: str, each: int) -> int:
        """A u64 count of items of at least ``each`` bytes that must fit in the rest of the file."""
        (n,) = self.unpack("<Q")
        if n * each > self.size - self.pos:
            _fail(f"{what} {n} does not fit in the {self.size}-byte file")
        return int(n)

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            _fail("truncated header")
        self.pos += n

    def read(self, n: int) -> bytes:
        self.skip(n)
        return bytes(self.buf[self.pos - n : self.pos])

    def string(self, what: str) -> str:
        n = self.count(f"{what} length", 1)
        if n > MAX_STRING:
            _fail(f"{what} of {n} bytes is implausibly long")
        try:
            return self.read(n).decode("utf-8")
        except UnicodeDecodeError:
            _fail(f"{what} is not UTF-8 text")

    def skip_strings(self, n: int) -> None:
        buf, size, pos, length = self.buf, self.size, self.pos, struct.Struct("<Q")
        for _ in range(n):
            if pos + 8 > size:
                _fail("truncated header")
            pos += 8 + length.unpack_from(buf, pos)[0]
        if pos > size:
            _fail("truncated header")
        self.pos = pos

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])[0]
        if vtype == _STRING:
            return self.string("metadata string")
        if vtype != _ARRAY:
            _fail(f"unknown metadata value type {vtype}")
        if depth >= MAX_NESTING:
            _fail(f"metadata arrays nest deeper than {MAX_NESTING} levels")
        (etype,) = self.unpack("<I")
        if etype not in _MIN_VALUE:
            _fail(f"unknown metadata value type {etype}")
        n = self.count("metadata array length", _MIN_VALUE[etype])
        if etype in _SCALAR:
            self.skip(n * _MIN_VALUE[etype])
        elif etype == _STRING:
            self.skip_strings(n)
        else:
            for _ in range(n):
                self.value(etype, depth + 1)
        return None


def _quant_sizes() -> tuple[
    dict[GGMLQuantizationType, tuple[int, int]], type[GGMLQuantizationType]
]:
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise KappaTuneError(
            "reading GGUF files needs the 'gguf' package: pip install gguf"
        ) from None
    return GGML_QUANT_SIZES, GGMLQuantizationType


def _tensor_info(r: _Reader) -> tuple[str, tuple[int, ...], int, int]:
    name = r.string("tensor name")
    (n_dims,) = r.unpack("<I")
    if n_dims > MAX_DIMS:
        _fail(f"tensor {short(name)} has {n_dims} dimensions (GGML allows {MAX_DIMS})")
    ne = tuple(int(x) for x in r.unpack("<" + "Q" * n_dims))
    qtype, offset = r.unpack("<IQ")
    return name, ne, int(qtype), int(offset)


def _alignment(meta: dict[str, Any]) -> int:
    align = meta.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1):
        _fail(f"general.alignment {align!r} is not a power of two")
    return align


def _table(
    infos: list[tuple[str, tuple[int, ...], int, int]], data_start: int, size: int, align: int
) -> tuple[GGUFTensor, ...]:
    sizes, kinds = _quant_sizes()
    out, names = [], set()
    for name, ne, qtype, offset in infos:
        who = f"tensor {short(name)}"
        if name in names:
            _fail(f"{who} appears twice")
        names.add(name)
        try:
            kind = kinds(qtype)
            block, type_size = sizes[kind]
        except (ValueError, KeyError):
            _fail(f"{who} has unknown type {qtype}")
        numel = 1
        for d in ne:
            numel *= d
            if numel >= _I64:
                _fail(f"{who}: element count of shape {list(ne)} overflows int64")
        if (ne[0] if ne else 1) % block:
            _fail(f"{who}: rows of {ne[0] if ne else 1} are not whole {kind.name} blocks")
        if offset % align:
            _fail(f"{who}: data offset {offset} is not a multiple of the alignment {align}")
        nbytes = numel // block * type_size
        if data_start + offset + nbytes > size:
            _fail(f"{who} lies outside the file (truncated download?)")
        out.append(GGUFTensor(name, ne, kind, data_start + offset, nbytes))
    end, previous = 0, ""
    for t in sorted(out, key=lambda t: (t.offset, t.nbytes, t.name)):
        if t.offset < end:
            _fail(f"tensor {short(t.name)} overlaps tensor {short(previous)}")
        if t.nbytes:
            end, previous = t.offset + t.nbytes, t.name
    return tuple(out)


def _parse(r: _Reader) -> GGUFHeader:
    if r.size < 4 or r.read(4) != b"GGUF":
        _fail("bad magic (not a GGUF file)")
    (version,) = r.unpack("<I")
    if version not in (2, 3):
        _fail(f"unsupported GGUF version {version}")
    (n_tensors,) = r.unpack("<Q")
    if n_tensors * _MIN_TENSOR > r.left():
        _fail(f"tensor count {n_tensors} does not fit in the {r.size}-byte file")
    n_kv = r.count("metadata key count", _MIN_KV)
    meta: dict[str, Any] = {}
    keys: set[str] = set()
    for _ in range(n_kv):
        key = r.string("metadata key")
        if key in keys:
            _fail(f"metadata key {short(key)} appears twice")
        keys.add(key)
        (vtype,) = r.unpack("<I")
        value = r.value(vtype)
        if value is not None:
            meta[key] = value
    if n_tensors * _MIN_TENSOR > r.left():
        _fail(f"tensor count {n_tensors} does not fit in the {r.size}-byte file")
    infos = [_tensor_info(r) for _ in range(n_tensors)]
    align = _alignment(meta)
    pos = r.pos
    data_start = pos + (-pos % align)
    return GGUFHeader(meta, _table(infos, data_start, r.size, align), data_start)


def read_header(path: Path) -> GGUFHeader:
    """The metadata scalars and the checked tensor table of a GGUF file."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                _fail("empty file")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Reader(buf, size))
    except OSError as exc:
        raise KappaTuneError(f"cannot read {path}: {exc.strerror or exc}") from None
    except _Bad as exc:
        raise KappaTuneError(f"corrupt GGUF file {path}: {exc}") from None
