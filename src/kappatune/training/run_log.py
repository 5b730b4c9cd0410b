"""A training run's step log: ``log.jsonl`` in the run directory, plus optional trackers.

:class:`RunLog` is a :data:`kappatune.training.loop.StepObserver`-shaped sink: each step becomes
one JSON object (step, loss, learning rate, tokens, tokens/s, elapsed seconds and, on
evaluation steps, the eval loss), appended and flushed at once so ``tail -f`` shows the run
as it goes. Reopening the log to resume drops the records after the resumed step, so a
resumed run never lists a step twice. Trackers (:func:`make_reporters`: TensorBoard event
files, Weights & Biases) receive the same numbers. Nothing here prints.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from kappatune.training.loop import StepRecord

LOG_NAME = "log.jsonl"


@dataclass(frozen=True)
class LogLine:
    """One step as it is logged: the loop's record plus the run-level numbers."""

    record: StepRecord
    elapsed: float  # seconds since the run began, earlier sessions of a resumed run included
    eval_loss: float | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.record
        out: dict[str, Any] = {
            "step": r.step,
            "total_steps": r.total_steps,
            "loss": r.loss,
            "lr": r.lr,
            "tokens": r.tokens,
            "tokens_per_s": _finite(r.tokens_per_second),
            "step_s": r.seconds,
            "elapsed_s": self.elapsed,
        }
        if self.eval_loss is not None:
            out["eval_loss"] = self.eval_loss
        return out

    def scalars(self) -> dict[str, float]:
        """The numbers a tracker plots, under ``train/`` and ``eval/``."""
        r = self.record
        out = {"train/loss": r.loss, "train/lr": r.lr}
        if math.isfinite(r.tokens_per_second):
            out["train/tokens_per_s"] = r.tokens_per_second
        if self.eval_loss is not None:
            out["eval/loss"] = self.eval_loss
        return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (a torn last line, from a killed run, is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
    return records


class Reporter(Protocol):
    """A tracker that receives each logged step."""

    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class RunLog:
    """Appends one JSON object per step to ``run_dir/log.jsonl`` and forwards it to trackers.

    ``start_step`` is the step the run (re)starts from: records after it are dropped
    (their steps run again). Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self, run_dir: Path, start_step: int = 0, reporters: Sequence[Reporter] = ()
    ) -> None:
        self.path = Path(run_dir) / LOG_NAME
        kept = [r for r in read_log(self.path) if r["step"] <= start_step]
        self._rewrite(kept)
        self.records: list[dict[str, Any]] = kept
        self._offset = float(kept[-1].get("elapsed_s", 0.0)) if kept else 0.0
        self._began = time.perf_counter()
        self._reporters = list(reporters)
        self._fh = self.path.open("a", encoding="utf-8")

    def _rewrite(self, kept: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{LOG_NAME}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def line(self, record: StepRecord, eval_loss: float | None = None) -> LogLine:
        """The log line of ``record`` (elapsed time measured now)."""
        return LogLine(record, self._offset + time.perf_counter() - self._began, eval_loss)

    def write(self, line: LogLine) -> None:
        rec = line.to_json()
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()
        self.records.append(rec)
        for reporter in self._reporters:
            reporter.log(line.record.step, line.scalars())

    def evals(self) -> list[dict[str, float]]:
        """Every eval loss logged so far, earlier sessions included, in step order."""
        return [
            {"step": r["step"], "eval_loss": r["eval_loss"]}
            for r in self.records
            if "eval_loss" in r
        ]

    def close(self) -> None:
        self._fh.close()
        for reporter in self._reporters:
            reporter.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eval_due(step: int, total: int, every: int | None) -> bool:
    """Evaluate every ``every`` steps and at the last step."""
    return step == total or (every is not None and step % every == 0)


class StepDisplay(Protocol):
    """Shows logged steps to a user (a progress bar, printed lines)."""

    def show(self, line: LogLine) -> None: ...

    def close(self) -> None: ...


class StepWatch:
    """The run's step observer: evaluates when due (``evaluate`` None: no eval split), writes
    the step to the run log (and trackers), then hands the line to ``display``."""

    def __init__(
        self,
        log: RunLog,
        *,
        evaluate: Callable[[], float] | None = None,
        eval_every: int | None = None,
        display: StepDisplay | None = None,
    ) -> None:
        self.log = log
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.display = display

    def __call__(self, record: StepRecord) -> None:
        due = self.evaluate is not None and eval_due(
            record.step, record.total_steps, self.eval_every
        )
        eval_loss = self.evaluate() if due and self.evaluate is not None else None
        line = self.log.line(record, eval_loss)
        self.log.write(line)
        if self.display is not None:
            self.display.show(line)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
        self.log.close()

    def eval_summary(self) -> dict[str, Any]:
        """What result.json says about evaluation (empty without an eval split)."""
        evals = self.log.evals()
        if not evals:
            return {}
        return {"eval": evals, "final_eval_loss": evals[-1]["eval_loss"]}


# --------------------------------------------------------------------------- trackers


class TensorBoardReporter:
    """Scalars into TensorBoard event files under ``log_dir`` (offline)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise KappaTuneError(
                "--report-to tensorboard needs the 'tensorboard' package: pip install tensorboard"
            ) from None
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbReporter:
    """Weights & Biases; ``WANDB_MODE=offline`` (and the other WANDB_* settings) apply as usual."""

    def __init__(self, run_dir: Path, name: str, config: Mapping[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise KappaTuneError(
                "--report-to wandb needs the 'wandb' package: pip install wandb"
            ) from None
        self._wandb = wandb
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "kappatune"),
            name=name,
            dir=str(run_dir),
            config=dict(config),
        )

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        self._run.finish()


@dataclass(frozen=True)
class Tracker:
    """A ``--report-to`` tracker: the package it needs and how it is made for a run."""

    package: str
    make: Callable[[Path, Mapping[str, Any]], Reporter]


TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker(
        "tensorboard", lambda run_dir, _: TensorBoardReporter(run_dir / "tensorboard")
    ),
    "wandb": Tracker("wandb", lambda run_dir, config: WandbReporter(run_dir, run_dir.name, config)),
}
REPORTERS = (*TRACKERS, "none")  # the --report-to choices


def make_reporters(
    names: Sequence[str], run_dir: Path, config: Mapping[str, Any]
) -> list[Reporter]:
    """Trackers for ``--report-to`` (``none``, or any of :data:`TRACKERS`)."""
    unknown = sorted(set(names) - set(REPORTERS))
    if unknown:
        raise KappaTuneError(
            f"--report-to: unknown tracker {unknown[0]!r} (choose from {', '.join(REPORTERS)})"
        )
    return [TRACKERS[n].make(Path(run_dir), config) for n in dict.fromkeys(names) if n in TRACKERS]


def check_reporters(names: Sequence[str]) -> None:
    """Fail early (before any work) when a tracker's package is missing."""
    import importlib.util

    for name in names:
        tracker = TRACKERS.get(name)
        if tracker is not None and importlib.util.find_spec(tracker.package) is None:
            raise KappaTuneError(
                f"--report-to {name} needs the '{tracker.package}' package: pip install"
                f" {tracker.package}"
            )
    if "none" in names and len(set(names)) > 1:
        raise KappaTuneError("--report-to none cannot be combined with a tracker")


def format_line(line: LogLine) -> str:
    """A plain progress line: step, loss, learning rate, throughput, elapsed (and eval loss)."""
    r = line.record
    width = len(str(r.total_steps))
    parts = [
        f"step {r.step:>{width}}/{r.total_steps}",
        f"loss {r.loss:.4f}",
        f"lr {r.lr:.2e}",
        f"{r.tokens_per_second:,.0f} tok/s" if math.isfinite(r.tokens_per_second) else "- tok/s",
        f"elapsed {_clock(line.elapsed)}",
    ]
    if line.eval_loss is not None:
        parts.append(f"eval loss {line.eval_loss:.4f}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
