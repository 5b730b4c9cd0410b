"""What a training run tells its user: the :class:`RunReporter` protocol and the library's
quiet default (:class:`SilentReporter`, which only logs). ``kappatune train`` prints through
its own reporter (:class:`kappatune.cli.train_watch.ConsoleReporter`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kappatune.training.data import TokenizedData
    from kappatune.training.loop import TrainResult
    from kappatune.training.methods import PreparedModel
    from kappatune.training.run_log import StepDisplay

log = logging.getLogger(__name__)


class RunReporter(Protocol):
    """What a run tells its user (called on the main rank only)."""

    def unfit(self, data: TokenizedData, seq_len: int) -> None:
        """Examples dropped or cut with packing off (one example per row)."""

    def finished(self, output: Path) -> None:
        """``output`` already holds the finished run: nothing to do."""

    def header(self, model: str, method: str, data: TokenizedData, where: str) -> None: ...

    def note(self, text: str) -> None: ...

    def start(
        self, prepared: PreparedModel, resumed_at: int | None, total: int, checkpoint: Path
    ) -> None:
        """Training starts (``resumed_at``: the checkpoint's step, None for a fresh start)."""

    def progress(self, total: int, start: int) -> StepDisplay | None: ...

    def done(self, result: TrainResult, output: Path, processes: int | None) -> None: ...


class SilentReporter:
    """The library's default: tells nothing (see the ``logging`` records instead)."""

    def unfit(self, data: TokenizedData, seq_len: int) -> None:
        log.warning("%d example(s) dropped, %d truncated", data.dropped, data.truncated)

    def finished(self, output: Path) -> None:
        log.info("%s already holds the finished run", output)

    def header(self, model: str, method: str, data: TokenizedData, where: str) -> None:
        log.info("%s %s: %d rows x %d tokens on %s", model, method, len(data), data.seq_len, where)

    def note(self, text: str) -> None:
        log.info("%s", text)

    def start(
        self, prepared: PreparedModel, resumed_at: int | None, total: int, checkpoint: Path
    ) -> None:
        log.info("starting at step %d of %d", resumed_at or 0, total)

    def progress(self, total: int, start: int) -> StepDisplay | None:
        return None

    def done(self, result: TrainResult, output: Path, processes: int | None) -> None:
        log.info("done: %d steps; saved to %s", result.steps, output)
