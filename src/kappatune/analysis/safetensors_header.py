"""A safetensors header checked against every rule of the format before any weight is read.

The rules are those the ``safetensors`` library enforces (``Metadata::validate`` and
``read_metadata``): the header length is at most 100 MB and lies within the file; the header
is a UTF-8 JSON object; ``__metadata__`` maps strings to strings; every tensor names a known
dtype, a shape of non-negative integers and two integer data offsets; the element count times
the dtype's width neither overflows 64 bits nor differs from the offsets' span; the tensors,
sorted by offset, cover the data section exactly (contiguous, non-overlapping, nothing after
the last). Duplicate keys, which the format leaves ambiguous, are refused as well.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from kappatune.errors import KappaTuneError, clip, short

MAX_HEADER = 100_000_000  # the safetensors library's limit
_U64 = 1 << 64

# safetensors dtype -> (bits per element, torch dtype name or None when torch cannot decode it)
_DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "U16": (16, "uint16"),
    "I16": (16, "int16"),
    "U32": (32, "uint32"),
    "I32": (32, "int32"),
    "U64": (64, "uint64"),
    "I64": (64, "int64"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "F32": (32, "float32"),
    "F64": (64, "float64"),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "C64": (64, None),
}


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor of a checked header; ``offset`` is absolute in the file."""

    name: str
    dtype: str  # torch dtype name, or the safetensors name when torch cannot decode it
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    unreadable: str | None  # why the tensor cannot be decoded here, if it cannot


def torch_dtype_name(st_dtype: str) -> str | None:
    """The torch name of a safetensors dtype, if this torch can decode it."""
    name = _DTYPES[st_dtype][1]
    return (
        name if name is not None and isinstance(getattr(torch, name, None), torch.dtype) else None
    )


class _Bad(Exception):
    pass


def _fail(message: str) -> NoReturn:
    raise _Bad(message)


def _u64(x: Any) -> bool:
    return type(x) is int and 0 <= x < _U64


def _text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        _fail("header holds a lone surrogate escape (not valid Unicode)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        _text(key)
        if isinstance(value, str):
            _text(value)
        if key in out:
            _fail(f"header names {short(key)} twice")
        out[key] = value
    return out


def _no_constants(token: str) -> NoReturn:
    _fail(f"header holds {token}, which is not JSON")


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _fail("header is not UTF-8 text")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError:
        _fail("header nests too deeply")
    except ValueError:
        _fail("header is not valid JSON")
    if not isinstance(header, dict):
        _fail("header is not a JSON object")
    return header


def _check_metadata(meta: Any) -> None:
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        _fail("__metadata__ must map strings to strings")


def _checked_numel(shape: list[int]) -> int | None:
    """Product of the dimensions, None once it leaves 64 bits (as safetensors' checked_mul)."""
    numel = 1
    for d in shape:
        numel *= d
        if numel >= _U64:
            return None
    return numel


def _tensor(name: str, info: Any) -> tuple[HeaderTensor, int, int]:
    """The tensor with offsets relative to the data section, and those offsets."""
    who = f"tensor {short(name)}"
    if not isinstance(info, dict):
        _fail(f"{who}: entry is not a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            _fail(f"{who}: entry has no {key!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        _fail(f"{who}: unknown dtype {clip(repr(dtype), 24)}")
    if not isinstance(shape, list) or not all(_u64(d) for d in shape):
        _fail(f"{who}: shape {clip(str(shape))} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_u64(x) for x in offsets)):
        _fail(f"{who}: data_offsets {clip(str(offsets))} are not two non-negative integers")
    begin, end = offsets
    if end < begin:
        _fail(f"{who}: data_offsets [{begin}, {end}] end before they begin")
    numel = _checked_numel(shape)
    bits = None if numel is None else numel * _DTYPES[dtype][0]
    if bits is None or bits // 8 >= _U64:
        _fail(f"{who}: element count of shape {clip(str(shape))} overflows 64 bits")
    if bits % 8:
        _fail(f"{who}: {dtype} x shape {clip(str(shape))} is not a whole number of bytes")
    if end - begin != bits // 8:
        _fail(
            f"{who}: data_offsets span {end - begin} bytes but {dtype} x shape"
            f" {clip(str(shape))} needs {bits // 8}"
        )
    decoded = torch_dtype_name(dtype)
    unreadable = None if decoded else f"unsupported dtype {dtype} (torch cannot decode it here)"
    return (
        HeaderTensor(name, decoded or dtype, tuple(shape), begin, end - begin, unreadable),
        begin,
        end,
    )


def _check_layout(spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Sorted by offset the tensors must tile the data section: no gap, overlap or tail."""
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            _fail(
                f"tensor {short(name)}: data_offsets [{begin}, {end}] overlap those of"
                f" tensor {short(str(previous))}"
            )
        if begin > position:
            _fail(f"tensor {short(name)}: {begin - position} bytes of gap before its data")
        position, previous = end, name
        if end > data_size:
            _fail(
                f"tensor {short(name)} lies outside the file (its data ends {end - data_size}"
                " bytes past the end; truncated download?)"
            )
    if position < data_size:
        _fail(f"{data_size - position} bytes after the last tensor belong to no tensor")


def read_header(path: Path) -> list[HeaderTensor]:
    """The tensors of a safetensors file in header order, every format rule checked."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            head = fh.read(8)
            if len(head) < 8:
                raise KappaTuneError(
                    f"corrupt safetensors file {path}: {size} bytes, shorter than the"
                    " 8-byte header length"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                limit = "the format's 100 MB limit" if n > MAX_HEADER else f"the {size}-byte file"
                raise KappaTuneError(
                    f"corrupt safetensors file {path}: header length {n} exceeds {limit}"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise KappaTuneError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = _parse(raw)
        _check_metadata(header.get("__metadata__"))
        tensors, spans = [], []
        for name, info in header.items():
            if name != "__metadata__":
                t, begin, end = _tensor(name, info)
                tensors.append(t)
                spans.append((begin, end, name))
        _check_layout(spans, size - 8 - n)
    except _Bad as exc:
        raise KappaTuneError(f"corrupt safetensors file {path}: {exc}") from None
    start = 8 + n
    return [
        HeaderTensor(t.name, t.dtype, t.shape, start + t.offset, t.nbytes, t.unreadable)
        for t in tensors
    ]
