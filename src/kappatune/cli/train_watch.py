"""How ``kappatune train`` shows a run: step lines or a bar, ``log.jsonl``, trackers, eval loss.

The loop hands each step to :class:`Watch` (a :data:`kappatune.training.loop.StepObserver`);
``Watch`` evaluates when due, writes the step to the run log (and trackers), then prints a
plain line (stdout not a terminal: nohup, schedulers, CI) or moves a progress bar (terminal).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kappatune.errors import KappaTuneError
from kappatune.training.run_log import REPORTERS, LogLine, RunLog, check_reporters, format_line

if TYPE_CHECKING:
    from kappatune.training.loop import StepRecord


def add_watch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and evaluation")
    g.add_argument(
        "--report-to",
        nargs="+",
        default=["none"],
        choices=REPORTERS,
        metavar="NAME",
        help="also send the step log to tensorboard (DIR/tensorboard) and/or wandb"
        " (WANDB_MODE=offline works), or none (default: none; DIR/log.jsonl is always written)",
    )
    g.add_argument(
        "--log-every",
        type=int,
        default=1,
        metavar="N",
        help="print a progress line every N steps when stdout is not a terminal (default: 1)",
    )
    g.add_argument(
        "--eval-data",
        nargs="+",
        metavar="FILE",
        help="held-out data (same formats as --data) for a token-weighted eval loss",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="evaluate every N steps and at the end (default with --eval-data: at the end only)",
    )


def validate_watch(args: argparse.Namespace) -> None:
    check_reporters(args.report_to)
    if args.log_every < 1:
        raise KappaTuneError(f"--log-every must be at least 1, got {args.log_every}")
    if args.eval_every is not None:
        if args.eval_data is None:
            raise KappaTuneError("--eval-every needs --eval-data FILE")
        if args.eval_every < 1:
            raise KappaTuneError(f"--eval-every must be at least 1, got {args.eval_every}")


def eval_due(step: int, total: int, every: int | None) -> bool:
    """Evaluate every ``every`` steps and at the last step."""
    return step == total or (every is not None and step % every == 0)


class Watch:
    """The CLI's step observer. ``evaluate`` (None: no eval split) gives the eval loss now."""

    def __init__(
        self,
        log: RunLog,
        *,
        total: int,
        start: int,
        log_every: int,
        evaluate: Callable[[], float] | None,
        eval_every: int | None,
        print_line: Callable[[str], None],
        terminal: bool | None = None,
    ) -> None:
        self.log = log
        self.total = total
        self.log_every = log_every
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.print_line = print_line
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.bar = self._bar(start) if self.terminal else None

    def _bar(self, start: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=self.total, initial=start, unit="step", desc="training")

    def __call__(self, record: StepRecord) -> None:
        due = self.evaluate is not None and eval_due(
            record.step, record.total_steps, self.eval_every
        )
        eval_loss = self.evaluate() if due and self.evaluate is not None else None
        line = self.log.line(record, eval_loss)
        self.log.write(line)
        self._show(line)

    def _show(self, line: LogLine) -> None:
        r = line.record
        if self.bar is not None:
            post = {"loss": f"{r.loss:.4f}", "lr": f"{r.lr:.1e}"}
            if line.eval_loss is not None:
                post["eval"] = f"{line.eval_loss:.4f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif r.step % self.log_every == 0 or r.step == r.total_steps or line.eval_loss is not None:
            self.print_line(format_line(line))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log.close()


def open_watch(
    args: argparse.Namespace,
    *,
    total: int,
    start: int,
    evaluate: Callable[[], float] | None,
    print_line: Callable[[str], None],
    resolved: dict[str, Any],
) -> Watch:
    """The run log (trimmed to ``start``), trackers and printer for one session of a run."""
    from kappatune.training.run_log import make_reporters

    reporters = make_reporters(args.report_to, Path(args.output), resolved)
    log = RunLog(Path(args.output), start_step=start, reporters=reporters)
    return Watch(
        log,
        total=total,
        start=start,
        log_every=args.log_every,
        evaluate=evaluate,
        eval_every=args.eval_every,
        print_line=print_line,
    )


def eval_summary(watch: Watch) -> dict[str, Any]:
    """What result.json says about evaluation (empty without an eval split)."""
    evals = watch.log.evals()
    if not evals:
        return {}
    return {"eval": evals, "final_eval_loss": evals[-1]["eval_loss"]}
