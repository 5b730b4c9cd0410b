from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from kappatune.errors import KappaTuneError
from kappatune.training.loop import StepRecord
from kappatune.training.run_log import (
    LogLine,
    RunLog,
    check_reporters,
    format_line,
    make_reporters,
    read_log,
)


def rec(step: int, total: int = 4, loss: float = 2.0) -> StepRecord:
    return StepRecord(step, total, loss, 1e-3, 200, 0.5)


def test_log_line_json_and_text() -> None:
    line = LogLine(rec(3, 12, 1.23456), elapsed=3725.4, eval_loss=1.5)
    assert line.to_json() == {
        "step": 3,
        "total_steps": 12,
        "loss": 1.23456,
        "lr": 1e-3,
        "tokens": 200,
        "tokens_per_s": 400.0,
        "step_s": 0.5,
        "elapsed_s": 3725.4,
        "eval_loss": 1.5,
    }
    assert format_line(line) == (
        "step  3/12  loss 1.2346  lr 1.00e-03  400 tok/s  elapsed 1:02:05  eval loss 1.5000"
    )
    assert line.scalars() == {
        "train/loss": 1.23456,
        "train/lr": 1e-3,
        "train/tokens_per_s": 400.0,
        "eval/loss": 1.5,
    }
    zero = LogLine(StepRecord(1, 1, 2.0, 1e-3, 10, 0.0), elapsed=0.0)
    assert zero.to_json()["tokens_per_s"] is None and "eval_loss" not in zero.to_json()
    assert format_line(zero) == "step 1/1  loss 2.0000  lr 1.00e-03  - tok/s  elapsed 0:00:00"


def test_run_log_appends_flushed_lines_and_resume_drops_later_steps(tmp_path: Path) -> None:
    log = RunLog(tmp_path)
    for s in (1, 2, 3):
        log.write(log.line(rec(s), eval_loss=0.5 if s == 2 else None))
        # flushed at once: another reader sees every step written so far
        assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == list(range(1, s + 1))
    log.close()
    with (tmp_path / "log.jsonl").open("a") as fh:
        fh.write('{"step": 4, "lo')  # a run killed mid-line
    resumed = RunLog(tmp_path, start_step=2)  # the checkpoint was at step 2
    assert [r["step"] for r in resumed.records] == [1, 2]
    for s in (3, 4):
        resumed.write(resumed.line(rec(s)))
    resumed.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert resumed.evals() == [{"step": 2, "eval_loss": 0.5}]
    elapsed = [json.loads(x)["elapsed_s"] for x in lines]
    assert elapsed == sorted(elapsed)  # the resumed session continues the clock


def test_tensorboard_event_file_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [tb] = make_reporters(["tensorboard"], tmp_path, {})
    log = RunLog(tmp_path, reporters=[tb])
    for s, loss in ((1, 3.0), (2, 2.5)):
        log.write(log.line(rec(s, 2, loss), eval_loss=2.75 if s == 2 else None))
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == [
        "eval/loss",
        "train/loss",
        "train/lr",
        "train/tokens_per_s",
    ]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.5)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(2, 2.75)]


def test_wandb_reporter_logs_each_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []

    class FakeRun:
        def log(self, data: dict[str, float], step: int) -> None:
            calls.append(("log", (step, data)))

        def finish(self) -> None:
            calls.append(("finish", None))

    def init(**kwargs: Any) -> FakeRun:
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    [wb] = make_reporters(["wandb"], tmp_path / "run", {"lr": 0.1})
    wb.log(3, {"train/loss": 1.0})
    wb.close()
    assert calls == [
        (
            "init",
            {"project": "proj", "name": "run", "dir": str(tmp_path / "run"), "config": {"lr": 0.1}},
        ),
        ("log", (3, {"train/loss": 1.0})),
        ("finish", None),
    ]


def test_missing_tracker_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        KappaTuneError, match=r"^--report-to wandb needs the 'wandb' package: pip install wandb$"
    ):
        check_reporters(["tensorboard", "wandb"])
    with pytest.raises(KappaTuneError, match="cannot be combined"):
        check_reporters(["none", "tensorboard"])
    check_reporters(["none"])
    assert make_reporters(["none"], Path("."), {}) == []
