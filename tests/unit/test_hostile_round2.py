"""Hostile and careless inputs, round 2 (issue 27): each ends in one line and exit code 2, or is
handled (a cache entry that is not a file is recomputed), never a hang, a traceback or a silent
run. Everything is built in the test."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kappatune.cli.main import main
from kappatune.training import data as data_mod
from tests.unit._tiny_models import save_tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 6


def _run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("kappatune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=0)


def _train(model: Path, data: Path, out: Path, *extra: object) -> list[object]:
    return ["train", model, "--data", data, "--output", out, "--steps", 2, "--batch-size", 2,
            "--seq-len", 16, "--lr", 1e-2, "--method", "full", *extra]  # fmt: skip


def test_an_oversized_jsonl_record_is_refused_before_tokenizing(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "a" * (data_mod.MAX_RECORD_CHARS + 10)}) + "\n")
    started = time.perf_counter()
    code, _, err = _run(_train(tiny, big, tmp_path / "out"), capsys)
    assert code == 2 and time.perf_counter() - started < 30
    assert "big.jsonl line 1 is 8,000,022 characters long, over the 8,000,000" in _one_line(err)
    # the same text inside a .json list, and a chat record
    as_json = tmp_path / "big.json"
    as_json.write_text(json.dumps([{"prompt": "p", "completion": "a" * 8_000_000}]))
    code, _, err = _run(_train(tiny, as_json, tmp_path / "out"), capsys)
    assert code == 2 and "record 0 holds 8,000,001 characters of text" in _one_line(err)
    assert not (tmp_path / "out").exists()


def test_deeply_nested_json_is_one_line(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for name, text in (("deep.jsonl", deep + "\n"), ("deep.json", deep)):
        f = tmp_path / name
        f.write_text(text)
        code, _, err = _run(_train(tiny, f, tmp_path / "out"), capsys)
        assert code == 2 and "is nested too deeply to be a record" in _one_line(err)


def test_seeds_out_of_range_are_refused(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    want = "--seed must be an integer from 0 to 4294967295 (2**32 - 1), got 1180591620717411303424"
    code, _, err = _run(_train(tiny, data, tmp_path / "out", "--seed", 2**70), capsys)
    assert code == 2 and want in _one_line(err)
    code, _, err = _run(["select", tiny, "--budget-tensors", 1, "--seed", 2**70], capsys)
    assert code == 2 and want in _one_line(err)
    code, _, err = _run(["select", tiny, "--budget-tensors", 1, "--seed", -1], capsys)
    assert code == 2 and "got -1" in _one_line(err)
    assert main(["select", str(tiny), "--budget-tensors", "1", "--seed", str(2**32 - 1)]) == 0


def test_unknown_chat_roles_are_refused(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "hello there"}]
    f.write_text(json.dumps({"messages": msgs}) + "\n")
    code, _, err = _run(_train(tiny, f, tmp_path / "out"), capsys)
    assert code == 2
    assert "line 1: message 1 has the unknown role 'asistant' (known: system, developer, user," in (
        _one_line(err)
    )


def test_a_cache_entry_that_is_not_a_regular_file_is_recomputed(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["analyze", str(tiny), "--cache-dir", str(cache), "-o", str(first)]) == 0
    entries = sorted((cache / "spectra").rglob("*.json"))
    assert entries
    for i, e in enumerate(entries):  # a device read without end, a FIFO, a link to a real entry
        e.unlink()
        if i % 3 == 0:
            e.symlink_to("/dev/zero")
        elif i % 3 == 1:
            os.mkfifo(e)
        else:
            e.symlink_to(entries[0].with_name("elsewhere.json"))
    started = time.perf_counter()
    with caplog.at_level("WARNING", logger="kappatune.analysis.cache"):
        assert main(["analyze", str(tiny), "--cache-dir", str(cache), "-o", str(second)]) == 0
    assert time.perf_counter() - started < 60
    warned = [
        r.getMessage() for r in caplog.records if "ignoring corrupt cache entry" in r.getMessage()
    ]
    assert len(warned) == len(entries)
    assert any("is a symbolic link" in w for w in warned)
    assert any("is not a regular file" in w for w in warned)
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["tensors"] == b["tensors"]


def test_control_characters_in_names_are_printed_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "evil.safetensors"
    torch.manual_seed(0)
    names = [
        "clear\x1b[2J.weight",
        "two\nlines.weight",
        "nul\x00byte.weight",
        "[bold]x[/bold].weight",
    ]
    save_file({n: torch.randn(6, 4) for n in names}, str(f))
    code, out, err = _run(["analyze", f, "--no-cache", "--top", 4], capsys)
    assert code == 0, err
    assert "\x1b" not in out and "\x00" not in out
    for shown in ("clear\\x1b[2J.weight", "two\\nlines.weight", "nul\\x00byte.weight",
                  "[bold]x[/bold].weight"):  # fmt: skip
        assert shown in out, shown
    assert all("lines.weight" not in ln or "two\\n" in ln for ln in out.splitlines())
    # the same names read back from an analysis JSON, in select's table and in an error line
    a = tmp_path / "a.json"
    assert main(["analyze", str(f), "--no-cache", "-o", str(a)]) == 0
    capsys.readouterr()
    code, out, err = _run(["select", a, "--budget-tensors", 4], capsys)
    assert code == 0 and "\x1b" not in out + err and "clear\\x1b[2J.weight" in err  # table
    code, out, err = _run(["select", a, "--budget-tensors", 4, "--include", "nul\x00"], capsys)
    assert "\x00" not in err


def test_a_catastrophic_regex_ends_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "m.safetensors"
    save_file({"a" * 33 + "!": torch.randn(4, 4), "b": torch.randn(4, 4)}, str(f))
    # the pattern: Python's re backtracks on it for hours; matched without a hang now
    started = time.perf_counter()
    code, _, err = _run(["analyze", f, "--no-cache", "--include", "(a+)+$"], capsys)
    assert code == 2 and "no candidate matrices" in _one_line(err)
    assert time.perf_counter() - started < 30
    # one that backtracks in any engine: the time limit ends it in one line
    started = time.perf_counter()
    code, _, err = _run(["analyze", f, "--no-cache", "--include", "(a|aa)+$"], capsys)
    assert code == 2 and time.perf_counter() - started < 60
    assert "--include regex '(a|aa)+$' took over 1 s on a 34-character name" in _one_line(err)
    code, _, err = _run(["select", f, "--budget-tensors", 1, "--exclude", "(a|aa)+$"], capsys)
    assert code == 2 and "--exclude regex '(a|aa)+$' took over 1 s" in _one_line(err)


def test_an_analysis_row_whose_numel_contradicts_its_shape_is_refused(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "a.json"
    assert main(["analyze", str(tiny), "--no-cache", "-o", str(f)]) == 0
    doc = json.loads(f.read_text())
    doc["tensors"][0]["numel"] -= 1
    f.write_text(json.dumps(doc))
    capsys.readouterr()
    code, _, err = _run(["select", f, "--budget-tensors", 1], capsys)
    assert code == 2 and "contradicts shape" in _one_line(err)


def test_a_run_whose_checkpoint_is_a_symlink_is_refused(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert main([str(a) for a in _train(tiny, data, out)]) == 0
    (out / "result.json").unlink()  # as if interrupted
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "checkpoint").symlink_to(elsewhere)
    capsys.readouterr()
    code, _, err = _run(_train(tiny, data, out), capsys)
    assert code == 2 and "its checkpoint/ is a symbolic link" in _one_line(err)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_swap_in_replaces_a_link_without_following_it(tmp_path: Path) -> None:
    from kappatune.training.checkpoint import swap_in

    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    final = tmp_path / "checkpoint"
    final.symlink_to(target)
    for round_ in range(2):
        tmp = tmp_path / ".checkpoint.tmp"
        tmp.mkdir()
        (tmp / "x").write_text(str(round_))
        swap_in(tmp, final)
        assert (
            final.is_dir() and not final.is_symlink() and (final / "x").read_text() == str(round_)
        )
        assert not (tmp_path / ".checkpoint.old").exists()
    assert (target / "keep.txt").read_text() == "mine"  # what the link pointed to is untouched
