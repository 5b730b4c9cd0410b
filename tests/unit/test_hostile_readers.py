"""Hostile and careless checkpoints: every one is refused with one line and exit code 2."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kappatune import AnalyzeOptions, analyze
from kappatune.analysis.sources import open_source
from kappatune.cli.main import main
from kappatune.errors import KappaTuneError
from tests.unit._hostile_corpus import (
    _EYE4,
    CORPUS,
    CORPUS_DIR,
    gguf_file,
    gkv,
    gstr,
    gtensor,
    st_file,
    st_tensor,
    write_corpus,
)

# why each corpus item is refused (a regex on the error line)
REASONS = {
    "st-empty.safetensors": r"0 bytes, shorter than the 8-byte header length",
    "st-short.safetensors": r"5 bytes, shorter than the 8-byte header length",
    "st-header-past-end.safetensors": r"header length 1000 exceeds the 20-byte file",
    "st-header-too-large.safetensors": r"header length 1099511627776 exceeds the format's 100 MB",
    "st-header-not-utf8.safetensors": r"header is not UTF-8 text",
    "st-header-not-json.safetensors": r"header is not valid JSON",
    "st-header-list.safetensors": r"header is not a JSON object",
    "st-header-nan.safetensors": r"header holds NaN, which is not JSON",
    "st-header-deep.safetensors": r"header nests too deeply",
    "st-duplicate-name.safetensors": r"header names 'w' twice",
    "st-metadata-not-strings.safetensors": r"__metadata__ must map strings to strings",
    "st-entry-not-object.safetensors": r"tensor 'w': entry is not a JSON object",
    "st-missing-dtype.safetensors": r"tensor 'w': entry has no 'dtype'",
    "st-unknown-dtype.safetensors": r"tensor 'w': unknown dtype 'X9'",
    "st-negative-dims.safetensors": r"shape \[-8, -8\] is not a list of non-negative integers",
    "st-float-dims.safetensors": r"shape \[4\.0, 16\] is not a list of non-negative integers",
    "st-bool-dims.safetensors": r"shape \[True, 4\] is not a list of non-negative integers",
    "st-overflow-dims.safetensors": r"element count of shape \[4611686018427387905, 64\] overflows",
    "st-negative-offset.safetensors": r"data_offsets \[-8, 56\] are not two non-negative integers",
    "st-three-offsets.safetensors": r"data_offsets \[0, 32, 64\] are not two non-negative",
    "st-string-offsets.safetensors": r"data_offsets \['0', '64'\] are not two non-negative",
    "st-reversed-offsets.safetensors": r"data_offsets \[64, 0\] end before they begin",
    "st-size-mismatch.safetensors": r"span 32 bytes but F32 x shape \[4, 4\] needs 64",
    "st-overlap.safetensors": r"tensor 'b': data_offsets \[0, 64\] overlap those of tensor 'a'",
    "st-gap.safetensors": r"tensor 'b': 16 bytes of gap before its data",
    "st-trailing-bytes.safetensors": r"8 bytes after the last tensor belong to no tensor",
    "st-truncated.safetensors": r"tensor 'w' lies outside the file .*truncated download",
    "st-only-uint16.safetensors": r"no candidate matrices .*integer dtype uint16",
    "st-only-f4.safetensors": r"no candidate matrices .*unsupported dtype F4",
    "gguf-empty.gguf": r"corrupt GGUF file .*: empty file",
    "gguf-bad-magic.gguf": r"bad magic \(not a GGUF file\)",
    "gguf-version-1.gguf": r"unsupported GGUF version 1",
    "gguf-truncated.gguf": r"truncated header",
    "gguf-nested-arrays.gguf": r"metadata arrays nest deeper than 4 levels",
    "gguf-dims-huge.gguf": r"tensor 'w' has 4294967295 dimensions \(GGML allows 4\)",
    "gguf-dims-overflow.gguf": r"element count of shape .* overflows int64",
    "gguf-dims-overflow-unsigned.gguf": r"element count of shape \[18446744073709551615, 1\]",
    "gguf-kv-count-huge.gguf": r"metadata key count 18446744073709551615 does not fit",
    "gguf-tensor-count-huge.gguf": r"tensor count 1152921504606846976 does not fit",
    "gguf-array-count-huge.gguf": r"metadata array length 4611686018427387904 does not fit",
    "gguf-string-array-huge.gguf": r"metadata array length 1099511627776 does not fit",
    "gguf-string-huge.gguf": r"metadata string length 9223372036854775808 does not fit",
    "gguf-unknown-value-type.gguf": r"unknown metadata value type 99",
    "gguf-key-not-utf8.gguf": r"metadata key is not UTF-8 text",
    "gguf-duplicate-key.gguf": r"metadata key 'general.alignment' appears twice",
    "gguf-alignment-zero.gguf": r"general.alignment 0 is not a power of two",
    "gguf-alignment-string.gguf": r"general.alignment '32' is not a power of two",
    "gguf-misaligned-offset.gguf": r"data offset 4 is not a multiple of the alignment 32",
    "gguf-tensor-outside.gguf": r"tensor 'w' lies outside the file",
    "gguf-overlap.gguf": r"tensor 'b' overlaps tensor 'a'",
    "gguf-duplicate-tensor.gguf": r"tensor 'w' appears twice",
    "gguf-unknown-tensor-type.gguf": r"tensor 'w' has unknown type 999",
    "gguf-partial-block.gguf": r"rows of 31 are not whole Q8_0 blocks",
    "pickle-runs-code.bin": r"refusing to load .*weights_only=True",
    "zip-truncated.pt": r"corrupt checkpoint .*zip-truncated\.pt",
    "dir-not-a-checkpoint": r"no weights found in",
    "index-parent-escape": r"names \.\./model\.safetensors: shard names must be relative paths",
    "index-nested-escape": r"names sub/\.\./\.\./model\.safetensors: shard names must be relative",
    "index-absolute": r"names /tmp/model\.safetensors: shard names must be relative paths",
    "index-backslash": r"names \.\.\\model\.safetensors: shard names must be relative paths",
    "index-not-object": r"weight_map is not a JSON object",
    "index-name-not-string": r"shard name 5 is not a string",
    "index-missing-shard": r"names missing files: gone\.safetensors",
    "index-deep-json": r"corrupt shard index",
    "index-same-tensor-twice": r"tensor 'w' is in two shards: a\.safetensors and b\.safetensors",
}


def _corpus_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_committed_corpus_is_what_the_generator_writes(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    assert _corpus_files(CORPUS_DIR) == _corpus_files(tmp_path)
    assert set(REASONS) == set(CORPUS)
    assert len(CORPUS) == 65


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_input_is_one_line_exit_2_nothing_written(
    name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    rc = main(
        ["analyze", str(CORPUS_DIR / name), "-o", str(out), "--cache-dir", str(tmp_path / "c")]
    )
    stdout, stderr = capfd.readouterr()
    assert rc == 2
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kappatune: error: ")
    assert re.search(REASONS[name], lines[0]), lines[0]
    assert "Traceback" not in stdout + stderr and "KT_HOSTILE_CODE_RAN" not in stdout + stderr
    assert not out.exists()


def test_safetensors_checks_mirror_the_safetensors_library() -> None:
    """Every corpus file the safetensors library refuses we refuse, and the reverse, except
    duplicate names (the library keeps one silently; we refuse the ambiguity)."""
    from safetensors import safe_open

    theirs, ours = set(), set()
    st_names = sorted(n for n in CORPUS if n.endswith(".safetensors"))
    for name in st_names:
        path = CORPUS_DIR / name
        try:
            with safe_open(str(path), framework="np"):
                pass
        except Exception:
            theirs.add(name)
        try:
            open_source(path).entries()
        except KappaTuneError:
            ours.add(name)
    assert ours - theirs == {"st-duplicate-name.safetensors"}
    assert theirs - ours == set()
    assert set(st_names) - ours == {"st-only-uint16.safetensors", "st-only-f4.safetensors"}


# --------------------------------------------------------------------------- safetensors


def test_valid_layouts_the_format_allows_are_read(tmp_path: Path) -> None:
    """Header order differs from data order, zero-size tensors share an offset, a scalar,
    __metadata__, leading blanks: all valid, all read exactly."""
    header = {
        "__metadata__": {"format": "pt"},
        "late": st_tensor("F32", [4, 4], [68, 132]),
        "empty_a": st_tensor("F16", [0, 3], [68, 68]),
        "scalar": st_tensor("F32", [], [64, 68]),
        "early": st_tensor("F32", [4, 4], [0, 64]),
        "empty_b": st_tensor("BF16", [3, 0], [68, 68]),
    }
    raw = b"  " + json.dumps(header).encode()
    data = _EYE4 + struct.pack("<f", 7.0) + (_EYE4 * 2)[:64]
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_file(raw, data))
    src = open_source(path)
    entries = src.entries()
    assert [e.name for e in entries] == ["late", "empty_a", "scalar", "early", "empty_b"]
    got = {e.name: src.read(e)[0] for e in entries}
    assert torch.equal(got["early"], torch.eye(4)) and torch.equal(got["late"], torch.eye(4))
    assert got["scalar"].item() == 7.0 and got["empty_a"].shape == (0, 3)


def test_uint16_next_to_a_float_matrix_is_skipped_not_corrupt(tmp_path: Path) -> None:
    header = {"u": st_tensor("U16", [4, 4], [0, 32]), "w": st_tensor("F32", [4, 4], [32, 96])}
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_file(header, b"\1\0" * 16 + _EYE4))
    a = analyze(path, AnalyzeOptions(use_cache=False))
    assert [(r.name, r.kappa) for r in a.tensors] == [("w", 1.0)]
    assert [(s.name, s.reason) for s in a.skipped] == [
        ("u", "integer dtype uint16 (not floating-point weights)")
    ]


def test_fnuz_fp8_is_analysed(tmp_path: Path) -> None:
    w = (torch.eye(4) * torch.tensor([1.0, 2.0, 4.0, 8.0])).to(torch.float8_e4m3fnuz)
    raw = w.view(torch.uint8).numpy().tobytes()
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_file({"w": st_tensor("F8_E4M3FNUZ", [4, 4], [0, 16])}, raw))
    a = analyze(path, AnalyzeOptions(use_cache=False))
    assert a.tensors[0].dtype == "float8_e4m3fnuz" and a.tensors[0].kappa == 8.0


def test_header_is_not_read_as_weights(tmp_path: Path) -> None:
    """The issue's case: a negative offset used to read 8 header bytes as the first weights."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_file({"w": st_tensor("F32", [4, 4], [-8, 56])}, _EYE4))
    with pytest.raises(KappaTuneError, match="are not two non-negative integers"):
        open_source(path).entries()


def test_long_and_multiline_names_stay_on_one_short_line(tmp_path: Path) -> None:
    name = "evil\nname" + "x" * 5000
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_file({name: st_tensor("F32", [-1], [0, 0])}))
    with pytest.raises(KappaTuneError) as info:
        open_source(path).entries()
    message = str(info.value)
    assert "\n" not in message and len(message) < 300 and "'evil\\nname" in message


# --------------------------------------------------------------------------- GGUF


def test_gguf_dimension_count_is_bounded_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    content = CORPUS["gguf-dims-huge.gguf"][1]
    assert isinstance(content, bytes)
    path.write_bytes(content)
    assert path.stat().st_size == 96  # the file was 101 bytes
    tracemalloc.start()
    try:
        with pytest.raises(KappaTuneError, match="4294967295 dimensions"):
            open_source(path).entries()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_gguf_integer_and_undecodable_types_are_skipped_with_reasons(tmp_path: Path) -> None:
    tensors = [
        gtensor("blk.0.attn_q.weight", (4, 4), qtype=0, offset=0),
        gtensor("blk.0.ffn_up.weight", (4, 4), qtype=24, offset=64),  # I8
        gtensor("blk.0.ffn_down.weight", (32, 2), qtype=9, offset=96),  # Q8_1
    ]
    data = _EYE4 + b"\1" * 16 + b"\0" * 16 + b"\0" * 80  # Q8_1: 2 blocks of 40 bytes
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_file([gkv("general.architecture", 8, gstr("llama"))], tensors, data))
    a = analyze(path, AnalyzeOptions(use_cache=False))
    assert [(r.name, r.kappa) for r in a.tensors] == [
        ("model.layers.0.self_attn.q_proj.weight", 1.0)
    ]
    assert [(s.name, s.reason) for s in a.skipped] == [
        (
            "model.layers.0.mlp.up_proj.weight",
            "integer dtype int8 (packed quantized weights: dequantize first)",
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            "unsupported GGUF type Q8_1 (gguf cannot dequantize it)",
        ),
    ]


def test_gguf_names_that_collide_after_mapping_are_refused(tmp_path: Path) -> None:
    tensors = [
        gtensor("blk.0.attn_q.weight", (4, 4)),
        gtensor("model.layers.0.self_attn.q_proj.weight", (4, 4), offset=64),
    ]
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_file([gkv("general.architecture", 8, gstr("llama"))], tensors, _EYE4 * 2))
    with pytest.raises(KappaTuneError, match="two tensors are named"):
        open_source(path).entries()


# --------------------------------------------------------------------------- not files


@pytest.fixture
def no_hang() -> Iterator[None]:
    def fail(*_: object) -> None:
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    return err[0]


@pytest.mark.parametrize("suffix", [".safetensors", ".gguf", ".bin"])
def test_fifo_is_refused_without_opening_it(
    suffix: str, tmp_path: Path, no_hang: None, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / f"model{suffix}"
    os.mkfifo(fifo)
    line = _one_line_exit_2(["analyze", str(fifo), "--no-cache"], capsys)
    assert "is not a regular file (a FIFO, socket or device?)" in line


def test_devices_are_refused(
    tmp_path: Path, no_hang: None, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "zeros.safetensors"
    link.symlink_to("/dev/zero")
    for target in ("/dev/null", str(link)):
        line = _one_line_exit_2(["analyze", target, "--no-cache"], capsys)
        assert "is not a regular file" in line


def test_fifo_in_a_checkpoint_directory(
    tmp_path: Path, no_hang: None, capsys: pytest.CaptureFixture[str]
) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    line = _one_line_exit_2(["analyze", str(tmp_path), "--no-cache"], capsys)
    assert "no weights found" in line
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model.safetensors"}})
    )
    line = _one_line_exit_2(["analyze", str(tmp_path), "--no-cache"], capsys)
    assert "names files that are not regular files: model.safetensors" in line


def test_shards_in_subdirectories_inside_the_checkpoint_are_read(tmp_path: Path) -> None:
    (tmp_path / "part").mkdir()
    save_file({"w": torch.eye(3)}, tmp_path / "part" / "model.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "part/model.safetensors"}})
    )
    src = open_source(tmp_path)
    assert torch.equal(src.read(src.entries()[0])[0], torch.eye(3))


def test_symlinked_shards_inside_the_checkpoint_are_followed(tmp_path: Path) -> None:
    """Hugging Face cache snapshots link each shard to a blob outside the snapshot."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    save_file({"w": torch.eye(2)}, blobs / "abc123")
    (snap / "model-1.safetensors").symlink_to("../blobs/abc123")
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-1.safetensors"}})
    )
    assert [e.name for e in open_source(snap).entries()] == ["w"]
