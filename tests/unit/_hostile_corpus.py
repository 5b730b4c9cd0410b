"""Builders of hostile and careless checkpoint files, and the corpus in ``tests/hostile``.

Each corpus item is a file (bytes) or a directory (name -> bytes) that ``kappatune analyze``
must refuse with one line and exit code 2. Regenerate the committed corpus and its README with
``python -m tests.unit._hostile_corpus`` from the repository root (a test checks they agree).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

CORPUS_DIR = Path(__file__).resolve().parents[1] / "hostile"

# --------------------------------------------------------------------------- safetensors


def st_file(header: Any, data: bytes = b"", n: int | None = None) -> bytes:
    """A safetensors file: header (an object to JSON-encode, or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def st_tensor(dtype: str, shape: Any, offsets: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _f32_4x4(offsets: Any = (0, 64)) -> dict[str, Any]:
    return st_tensor("F32", [4, 4], list(offsets))


_EYE4 = struct.pack("<16f", *[1.0 if i % 5 == 0 else 0.0 for i in range(16)])

# --------------------------------------------------------------------------- GGUF


def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw)) + raw


def gkv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def gtensor(name: str, ne: tuple[int, ...], qtype: int = 0, offset: int = 0) -> bytes:
    return gstr(name) + u32(len(ne)) + b"".join(u64(d) for d in ne) + u32(qtype) + u64(offset)


def gguf_file(
    kvs: list[bytes],
    tensors: list[bytes],
    data: bytes = b"",
    n_kv: int | None = None,
    n_tensors: int | None = None,
    version: int = 3,
    align: int = 32,
) -> bytes:
    head = b"GGUF" + u32(version)
    head += u64(len(tensors) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % align) + data


_ARCH = gkv("general.architecture", 8, gstr("llama"))
_Q8_0, _F32, _STRING, _ARRAY = 8, 0, 8, 9


def nested_arrays(depth: int) -> bytes:
    """A metadata value of ``depth`` arrays, each holding the next."""
    return b"".join(u32(_ARRAY) + u64(1) for _ in range(depth)) + u32(4) + u64(0)


# --------------------------------------------------------------------------- torch files


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, ("echo KT_HOSTILE_CODE_RAN",))


def _truncated_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in (("archive/data.pkl", b"\x80\x02}q\x00."), ("archive/version", b"3\n")):
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()[:-40]


def _index(weight_map: Any) -> bytes:
    return json.dumps({"weight_map": weight_map}).encode()


_SHARD = st_file({"w": _f32_4x4()}, _EYE4)

# --------------------------------------------------------------------------- the corpus

Item = tuple[str, "bytes | dict[str, bytes]"]

CORPUS: dict[str, Item] = {
    # safetensors: the header
    "st-empty.safetensors": ("0 bytes", b""),
    "st-short.safetensors": ("5 bytes, shorter than the header length", b"\x08\x00\x00\x00\x00"),
    "st-header-past-end.safetensors": (
        "header length 1000 in a 20-byte file",
        st_file(b"{}", n=1000) + b"\0" * 10,
    ),
    "st-header-too-large.safetensors": (
        "header length 2**40 (the format caps it at 100 MB)",
        st_file(b"{}", n=1 << 40),
    ),
    "st-header-not-utf8.safetensors": ("header bytes are not UTF-8", st_file(b'{"\xff\xfe": 1}')),
    "st-header-not-json.safetensors": ("header is not JSON", st_file(b"{nope")),
    "st-header-list.safetensors": ("header is a JSON list", st_file(b"[]")),
    "st-header-nan.safetensors": (
        "NaN in the header (not JSON)",
        st_file(b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'),
    ),
    "st-header-deep.safetensors": (
        "header nested 5000 levels deep",
        st_file(b"[" * 5000 + b"]" * 5000),
    ),
    "st-duplicate-name.safetensors": (
        "the same tensor name twice",
        st_file(
            b'{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},'
            b' "w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}',
            _EYE4,
        ),
    ),
    "st-metadata-not-strings.safetensors": (
        "__metadata__ maps a key to a number",
        st_file({"__metadata__": {"format": 1}, "w": _f32_4x4()}, _EYE4),
    ),
    "st-entry-not-object.safetensors": ("a tensor entry is a string", st_file({"w": "F32"})),
    "st-missing-dtype.safetensors": (
        "a tensor entry without dtype",
        st_file({"w": {"shape": [4, 4], "data_offsets": [0, 64]}}, _EYE4),
    ),
    "st-unknown-dtype.safetensors": (
        "dtype X9",
        st_file({"w": st_tensor("X9", [4, 4], [0, 64])}, _EYE4),
    ),
    "st-negative-dims.safetensors": (
        "shape [-8, -8]",
        st_file({"w": st_tensor("F32", [-8, -8], [0, 256])}, b"\0" * 256),
    ),
    "st-float-dims.safetensors": (
        "shape [4.0, 16]",
        st_file({"w": st_tensor("F32", [4.0, 16], [0, 256])}, b"\0" * 256),
    ),
    "st-bool-dims.safetensors": (
        "shape [true, 4]",
        st_file({"w": st_tensor("F32", [True, 4], [0, 16])}, b"\0" * 16),
    ),
    "st-overflow-dims.safetensors": (
        "shape [2**62 + 1, 64]: the element count wraps in 64 bits",
        st_file({"w": st_tensor("F32", [2**62 + 1, 64], [0, 256])}, b"\0" * 256),
    ),
    "st-negative-offset.safetensors": (
        "data_offsets [-8, 56]: would read header bytes as weights",
        st_file({"w": st_tensor("F32", [4, 4], [-8, 56])}, _EYE4),
    ),
    "st-three-offsets.safetensors": (
        "data_offsets with three numbers",
        st_file({"w": st_tensor("F32", [4, 4], [0, 32, 64])}, _EYE4),
    ),
    "st-string-offsets.safetensors": (
        'data_offsets ["0", "64"]',
        st_file({"w": st_tensor("F32", [4, 4], ["0", "64"])}, _EYE4),
    ),
    "st-reversed-offsets.safetensors": (
        "data_offsets [64, 0]",
        st_file({"w": st_tensor("F32", [4, 4], [64, 0])}, _EYE4),
    ),
    "st-size-mismatch.safetensors": (
        "F32 x [4, 4] is 64 bytes but the offsets span 32",
        st_file({"w": st_tensor("F32", [4, 4], [0, 32])}, _EYE4[:32]),
    ),
    "st-overlap.safetensors": (
        "two tensors share the same 64 bytes",
        st_file({"a": _f32_4x4(), "b": _f32_4x4()}, _EYE4),
    ),
    "st-gap.safetensors": (
        "16 bytes between two tensors belong to no tensor",
        st_file({"a": _f32_4x4(), "b": _f32_4x4((80, 144))}, _EYE4 + b"\0" * 16 + _EYE4),
    ),
    "st-trailing-bytes.safetensors": (
        "8 bytes after the last tensor",
        st_file({"w": _f32_4x4()}, _EYE4 + b"\0" * 8),
    ),
    "st-truncated.safetensors": (
        "the last tensor ends past the end of the file (truncated download)",
        st_file({"w": _f32_4x4()}, _EYE4[:40]),
    ),
    "st-only-uint16.safetensors": (
        "a valid file whose only matrix is uint16: no candidate matrices",
        st_file({"w": st_tensor("U16", [4, 4], [0, 32])}, b"\1\0" * 16),
    ),
    "st-only-f4.safetensors": (
        "a valid file whose only matrix is 4-bit float: no candidate matrices",
        st_file({"w": st_tensor("F4", [4, 4], [0, 8])}, b"\x22" * 8),
    ),
    # GGUF
    "gguf-empty.gguf": ("0 bytes", b""),
    "gguf-bad-magic.gguf": ("magic GGUX", b"GGUX" + u32(3) + u64(0) + u64(0)),
    "gguf-version-1.gguf": ("version 1 (32-bit counts)", b"GGUF" + u32(1) + u32(0) + u32(0)),
    "gguf-truncated.gguf": ("cut inside the counts", b"GGUF" + u32(3) + u64(0)[:5]),
    "gguf-nested-arrays.gguf": (
        "metadata arrays nested 1000 deep (a RecursionError before)",
        gguf_file([gkv("deep", _ARRAY, nested_arrays(1000))], []),
    ),
    "gguf-dims-huge.gguf": (
        "a tensor with 2**32 - 1 dimensions (1.3 GB allocated before)",
        gguf_file([], [gstr("w") + u32(2**32 - 1) + u64(4) * 4]),
    ),
    "gguf-dims-overflow.gguf": (
        "dimensions [2**62, 2**62]: the element count overflows",
        gguf_file([], [gtensor("w", (2**62, 2**62))], b"\0" * 64),
    ),
    "gguf-kv-count-huge.gguf": (
        "2**64 - 1 metadata keys in a tiny file",
        gguf_file([], [], n_kv=2**64 - 1),
    ),
    "gguf-tensor-count-huge.gguf": (
        "2**60 tensors in a tiny file",
        gguf_file([], [], n_tensors=2**60),
    ),
    "gguf-array-count-huge.gguf": (
        "a metadata array of 2**62 uint32",
        gguf_file([gkv("a", _ARRAY, u32(4) + u64(2**62))], []),
    ),
    "gguf-string-array-huge.gguf": (
        "a metadata array of 2**40 strings",
        gguf_file([gkv("a", _ARRAY, u32(_STRING) + u64(2**40))], []),
    ),
    "gguf-string-huge.gguf": (
        "a metadata string of 2**63 bytes",
        gguf_file([gkv("s", _STRING, u64(2**63))], []),
    ),
    "gguf-unknown-value-type.gguf": (
        "metadata value type 99",
        gguf_file([gkv("x", 99, b"\0" * 8)], []),
    ),
    "gguf-key-not-utf8.gguf": (
        "a metadata key that is not UTF-8",
        gguf_file([gkv(b"\xff\xfe", 4, u32(1))], []),
    ),
    "gguf-duplicate-key.gguf": (
        "the same metadata key twice",
        gguf_file([gkv("general.alignment", 4, u32(32))] * 2, []),
    ),
    "gguf-alignment-zero.gguf": (
        "general.alignment 0",
        gguf_file([gkv("general.alignment", 4, u32(0))], [gtensor("w", (4, 4))], b"\0" * 64),
    ),
    "gguf-alignment-string.gguf": (
        'general.alignment "32"',
        gguf_file([gkv("general.alignment", _STRING, gstr("32"))], []),
    ),
    "gguf-misaligned-offset.gguf": (
        "a tensor offset that is not a multiple of the alignment",
        gguf_file([_ARCH], [gtensor("w", (4, 4), offset=4)], b"\0" * 96),
    ),
    "gguf-tensor-outside.gguf": (
        "a tensor that ends past the end of the file",
        gguf_file([_ARCH], [gtensor("w", (64, 64))], b"\0" * 64),
    ),
    "gguf-overlap.gguf": (
        "two tensors on the same bytes",
        gguf_file([_ARCH], [gtensor("a", (4, 4)), gtensor("b", (4, 4))], _EYE4),
    ),
    "gguf-duplicate-tensor.gguf": (
        "the same tensor name twice",
        gguf_file([_ARCH], [gtensor("w", (4, 4)), gtensor("w", (4, 4), offset=64)], _EYE4 * 2),
    ),
    "gguf-unknown-tensor-type.gguf": (
        "tensor type 999",
        gguf_file([_ARCH], [gtensor("w", (4, 4), qtype=999)], _EYE4),
    ),
    "gguf-partial-block.gguf": (
        "a Q8_0 tensor whose rows of 31 are not whole 32-element blocks",
        gguf_file([_ARCH], [gtensor("w", (31, 2), qtype=_Q8_0)], b"\0" * 68),
    ),
    "gguf-dims-overflow-unsigned.gguf": (
        "a dimension of 2**64 - 1 (negative as int64)",
        gguf_file([_ARCH], [gtensor("w", (2**64 - 1, 1))], b"\0" * 64),
    ),
    # torch pickles
    "pickle-runs-code.bin": (
        "a pickle whose loading calls os.system (never run: weights_only=True)",
        pickle.dumps({"w": _RunsCode()}, protocol=2),
    ),
    "zip-truncated.pt": ("a torch zip archive cut short", _truncated_zip()),
    # checkpoint directories
    "dir-not-a-checkpoint": ("a directory with no weights", {"notes.txt": b"hello\n"}),
    "index-parent-escape": (
        "shard index naming ../model.safetensors",
        {"model.safetensors.index.json": _index({"w": "../model.safetensors"})},
    ),
    "index-nested-escape": (
        "shard index naming sub/../../model.safetensors",
        {
            "model.safetensors.index.json": _index({"w": "sub/../../model.safetensors"}),
            "model.safetensors": _SHARD,
        },
    ),
    "index-absolute": (
        "shard index naming /tmp/model.safetensors",
        {"model.safetensors.index.json": _index({"w": "/tmp/model.safetensors"})},
    ),
    "index-backslash": (
        "shard index naming ..\\model.safetensors",
        {"model.safetensors.index.json": _index({"w": "..\\model.safetensors"})},
    ),
    "index-not-object": (
        "weight_map is a list",
        {
            "model.safetensors.index.json": _index(["model.safetensors"]),
            "model.safetensors": _SHARD,
        },
    ),
    "index-name-not-string": (
        "a shard name that is a number",
        {"model.safetensors.index.json": _index({"w": 5})},
    ),
    "index-missing-shard": (
        "shard index naming a file that is not there",
        {"model.safetensors.index.json": _index({"w": "gone.safetensors"})},
    ),
    "index-deep-json": (
        "shard index nested 5000 levels deep",
        {"model.safetensors.index.json": b"[" * 5000 + b"]" * 5000},
    ),
    "index-same-tensor-twice": (
        "two shards that both hold tensor w",
        {
            "model.safetensors.index.json": _index({"w": "a.safetensors", "v": "b.safetensors"}),
            "a.safetensors": _SHARD,
            "b.safetensors": _SHARD,
        },
    ),
}


def write_corpus(root: Path) -> None:
    """Write every corpus item and a README line per item under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Hostile inputs",
        "",
        "Small hostile and careless checkpoints. `tests/unit/test_hostile_readers.py` runs each",
        "through `kappatune analyze` and expects exit code 2, one error line, no traceback and no",
        "output file. Regenerate with `python -m tests.unit._hostile_corpus`.",
        "",
    ]
    for name, (what, content) in sorted(CORPUS.items()):
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            for rel, data in content.items():
                (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / name / rel).write_bytes(data)
        lines.append(f"- `{name}`: {what}")
    (root / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_corpus(CORPUS_DIR)
    print(f"wrote {len(CORPUS)} items to {CORPUS_DIR}")
