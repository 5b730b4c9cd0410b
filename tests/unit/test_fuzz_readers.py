"""Bounded, deterministic fuzzing of the safetensors, GGUF and analysis-JSON readers.

Every generated input must either parse (and then read back every tensor it lists) or raise
KappaTuneError; any other exception is a failure. Safetensors headers are also checked against
the safetensors library itself: it accepts exactly the files we accept. The example counts are
fixed (``derandomize=True``, no example database), so CI sees the same inputs on every run.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kappatune.analysis.gguf_source import GGUFSource
from kappatune.analysis.safetensors_source import SafetensorsSource
from kappatune.analysis.spectra import Analysis
from kappatune.errors import KappaTuneError
from tests.unit._hostile_corpus import gguf_file, gkv, gstr, gtensor, st_file

EXAMPLES = {"safetensors": 300, "gguf": 300, "analysis": 300}
TALLY: Counter[str] = Counter()
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _fresh(path: Path) -> Path:
    """``path`` removed first: rewriting a file in place makes ext4 flush it on close
    (``auto_da_alloc``), about 3 ms an example; a new file is not flushed."""
    path.unlink(missing_ok=True)
    return path


def _record(kind: str, parsed: bool) -> None:
    TALLY[f"{kind} tried"] += 1
    TALLY[f"{kind} {'parsed' if parsed else 'refused'}"] += 1


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**66), 2**66),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_any = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)

# --------------------------------------------------------------------------- safetensors

ST_DTYPES = ["F32", "F16", "BF16", "F64", "U8", "I8", "U16", "I64", "BOOL", "F8_E4M3", "F4", "C64"]
_ST_BITS = {"F32": 32, "F16": 16, "BF16": 16, "F64": 64, "U8": 8, "I8": 8, "U16": 16}
_ST_BITS |= {"I64": 64, "BOOL": 8, "F8_E4M3": 8, "F4": 4, "C64": 64}


ST_MUTATIONS = ["none"] * 6 + ["field", "offsets", "shape", "data", "length", "metadata"]


@st.composite
def st_inputs(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A safetensors file and whether it is structured (the safetensors-library oracle then
    applies): a valid header with at most one thing broken, or raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=96)), False
    mutation = draw(st.sampled_from(ST_MUTATIONS))
    names = draw(st.lists(st.text(max_size=6), max_size=4, unique=True))
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(ST_DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        nbytes = 1
        for d in shape:
            nbytes *= d
        nbytes = nbytes * _ST_BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if names and mutation in ("field", "offsets", "shape"):
        info = header[draw(st.sampled_from(names))]
        if mutation == "offsets":
            info["data_offsets"] = draw(st.lists(st.integers(-4, 120), min_size=2, max_size=2))
        elif mutation == "shape":
            info["shape"] = draw(st.lists(st.integers(-2, 2**64 + 1), max_size=3))
        else:
            key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            if draw(st.booleans()):
                info[key] = draw(json_any)
            else:
                del info[key]
    if mutation == "metadata" or draw(st.integers(0, 4)) == 0:
        values = st.text(max_size=4) | (json_leaf if mutation == "metadata" else st.nothing())
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), values, max_size=2))
    data_size = offset + (draw(st.sampled_from([-8, -1, 1, 8])) if mutation == "data" else 0)
    data = draw(st.binary(min_size=max(0, data_size), max_size=max(0, data_size)))
    raw = json.dumps(header).encode()
    n = len(raw) + (draw(st.sampled_from([-1, 1, 2**40])) if mutation == "length" else 0)
    return st_file(raw, data, n=max(0, n)), True


def _safetensors_library_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np"):
            return True
    except Exception:
        return False


@settings(FUZZ, max_examples=EXAMPLES["safetensors"])
@given(st_inputs())
def test_fuzzed_safetensors_parse_or_refuse(workdir: Path, case: tuple[bytes, bool]) -> None:
    content, structured = case
    path = _fresh(workdir / "fuzz.safetensors")
    path.write_bytes(content)
    src = SafetensorsSource([path])
    try:
        entries = src.entries()
    except KappaTuneError:
        _record("safetensors", False)
        assert not structured or not _safetensors_library_accepts(path)
        return
    _record("safetensors", True)
    assert not structured or _safetensors_library_accepts(path)
    for e in entries:
        if e.unreadable is None:
            assert tuple(src.read(e)[0].shape) == e.shape


# --------------------------------------------------------------------------- GGUF

_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# F32, F16, Q4_0, Q8_0, Q4_K, Q8_1 (not decodable), I8, BF16, unknown
_QTYPES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34), 12: (256, 144), 9: (32, 40)}
_QTYPES |= {24: (1, 1), 30: (1, 2), 999: (1, 1)}


def gguf_values(depth: int = 0) -> st.SearchStrategy[tuple[int, bytes]]:
    """A valid metadata (type, payload) pair: scalars, UTF-8 strings, arrays (nested)."""
    scalar = st.sampled_from(sorted(_SCALARS)).flatmap(
        lambda t: st.binary(min_size=_SCALARS[t], max_size=_SCALARS[t]).map(lambda b: (t, b))
    )
    string = st.text(max_size=6).map(lambda t: (8, gstr(t)))
    if depth >= 2:
        return scalar | string

    def array(items: list[tuple[int, bytes]]) -> tuple[int, bytes]:
        etype = items[0][0] if items else 4
        same = [p for t, p in items if t == etype]
        return 9, struct.pack("<IQ", etype, len(same)) + b"".join(same)

    return scalar | string | st.lists(gguf_values(depth + 1), max_size=3).map(array)


GGUF_MUTATIONS = ["none"] * 6 + [
    "n_kv",
    "n_tensors",
    "version",
    "byte",
    "truncate",
    "duplicate",
    "offset",
    "dims",
    "qtype",
    "alignment",
    "value_type",
    "array_count",
]


@st.composite
def gguf_inputs(draw: st.DrawFn) -> bytes:
    """A GGUF file: valid metadata and tensor table with at most one thing broken."""
    mutation = draw(st.sampled_from(GGUF_MUTATIONS))
    keys = draw(st.lists(st.text(max_size=6), max_size=3, unique=True))
    kvs = [gkv(k, *draw(gguf_values())) for k in keys if k != "general.alignment"]
    if mutation == "alignment":
        align = draw(st.sampled_from([0, 3, 2**31 + 1]))
        kvs.append(gkv("general.alignment", 4, struct.pack("<I", align)))
    if mutation == "value_type":
        kvs.append(gkv("bad", draw(st.integers(13, 40)), b"\0" * 4))
    if mutation == "array_count":
        count = draw(st.sampled_from([1, 2**40, 2**63]))
        kvs.append(gkv("arr", 9, struct.pack("<IQ", draw(st.sampled_from([4, 8, 9])), count)))
    tensors, offset = [], 0
    for i in range(draw(st.integers(0, 3))):
        qtype = draw(st.sampled_from(sorted(_QTYPES)))
        if qtype == 999 and mutation != "qtype":
            qtype = 0
        block, size = _QTYPES[qtype]
        ne = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=1, max_size=3)))
        ne = (ne[0] * block, *ne[1:])
        if mutation == "dims" and i == 0:
            ne = tuple(draw(st.lists(st.integers(0, 2**64 - 1), max_size=5)))
        nbytes = 1
        for d in ne:
            nbytes *= d
        nbytes = nbytes // block * size
        where = offset + (draw(st.sampled_from([-32, 4, 2**40])) if mutation == "offset" else 0)
        name = "blk.0.w.weight" if mutation == "duplicate" else f"blk.{i}.attn_q.weight"
        tensors.append(gtensor(name, ne, qtype, max(0, where)))
        if nbytes <= 1 << 16:
            offset += nbytes + (-nbytes % 32)
    content = gguf_file(
        kvs,
        tensors,
        b"\0" * offset,
        n_kv=len(kvs) + draw(st.sampled_from([1, 2**63])) if mutation == "n_kv" else None,
        n_tensors=len(tensors) + draw(st.sampled_from([1, 2**40]))
        if mutation == "n_tensors"
        else None,
        version=draw(st.sampled_from([2, 3])) if mutation != "version" else 1,
    )
    if mutation == "byte":
        at = draw(st.integers(0, len(content) - 1))
        content = content[:at] + bytes([draw(st.integers(0, 255))]) + content[at + 1 :]
    if mutation == "truncate":
        content = content[: draw(st.integers(0, len(content) - 1))]
    return content


@settings(FUZZ, max_examples=EXAMPLES["gguf"])
@given(gguf_inputs())
def test_fuzzed_gguf_parse_or_refuse(workdir: Path, content: bytes) -> None:
    path = _fresh(workdir / "fuzz.gguf")
    path.write_bytes(content)
    src = GGUFSource(path)
    try:
        entries = src.entries()
    except KappaTuneError:
        _record("gguf", False)
        return
    _record("gguf", True)
    for e in entries:
        if e.unreadable is None and not e.dtype.startswith("int"):
            assert tuple(src.read(e)[0].shape) == e.shape


# --------------------------------------------------------------------------- analysis JSON

_ROW = {
    "name": "model.layers.0.mlp.down_proj.weight",
    "shape": [4, 4],
    "dtype": "float32",
    "numel": 16,
    "expert": None,
    "kappa": 2.0,
    "sigma_max": 2.0,
    "sigma_min": 1.0,
    "log_volume": 0.5,
    "entropy_deficit": -0.1,
    "stable_rank": 1.5,
    "effective_rank": 3.0,
    "layer": 0,
    "module_type": "down_proj",
    "method": "gram",
}
_ANALYSIS = {"schema_version": 1, "source": "m", "fingerprint": "f", "tensors": [], "skipped": []}
_JSON_ODDITIES = st.sampled_from(
    ["inf", "-inf", "nan", "1e999", "-1", "", [1, "x"], {"a": 1}, True, 2**70, 1e308, -0.0]
)


@st.composite
def analysis_inputs(draw: st.DrawFn) -> str:
    """Analysis JSON text: near-valid documents with fields broken, or arbitrary JSON/text."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.text(max_size=40))
    if choice == 1:
        return json.dumps(draw(json_any))
    broken = choice > 5
    junk = json_any if broken else st.nothing()
    doc: dict[str, Any] = dict(_ANALYSIS)
    rows = []
    for _ in range(draw(st.integers(0, 3))):
        row = dict(_ROW)
        for key in draw(st.lists(st.sampled_from(sorted(_ROW)), max_size=3 if broken else 0)):
            if draw(st.booleans()):
                row[key] = draw(_JSON_ODDITIES | json_any)
            else:
                row.pop(key, None)
        rows.append(row)
    doc["tensors"] = rows
    doc["skipped"] = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.text(max_size=4),
                    "shape": st.lists(st.integers(0, 9), max_size=2) | junk,
                    "reason": st.text(max_size=4) | junk,
                }
            ),
            max_size=2,
        )
    )
    for key in draw(st.lists(st.sampled_from(sorted(_ANALYSIS)), max_size=2 if broken else 0)):
        doc[key] = draw(_JSON_ODDITIES | json_any)
    text = json.dumps(doc)
    if draw(st.integers(0, 5)) == 0:  # Python's json also reads these non-JSON constants
        text = text.replace("2.0", draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])), 1)
    return text


@settings(FUZZ, max_examples=EXAMPLES["analysis"])
@given(analysis_inputs())
def test_fuzzed_analysis_json_parse_or_refuse(workdir: Path, text: str) -> None:
    path = _fresh(workdir / "fuzz.json")
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        Analysis.load(path)
    except KappaTuneError:
        _record("analysis", False)
        return
    _record("analysis", True)


def test_fuzz_tally() -> None:
    """Runs after the three fuzz tests (file order): every example was tried and held."""
    if not TALLY:
        pytest.skip("run with the fuzz tests above")
    for kind, n in EXAMPLES.items():
        if not TALLY[f"{kind} tried"]:
            continue  # deselected
        assert TALLY[f"{kind} tried"] == n
        assert TALLY[f"{kind} parsed"] + TALLY[f"{kind} refused"] == n
        assert TALLY[f"{kind} parsed"] > 0 and TALLY[f"{kind} refused"] > 0
    print(dict(sorted(TALLY.items())))
