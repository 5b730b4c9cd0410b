"""How ``kappatune train`` shows a run: its flags for logging and evaluation, and what it prints.

The recipe (:mod:`kappatune.training.recipe`) evaluates, writes ``log.jsonl`` and feeds the
trackers (:class:`kappatune.training.run_log.StepWatch`); :class:`ConsoleReporter` prints
what it reports, and its :class:`Display` shows each logged step as a plain line (stdout
not a terminal: nohup, schedulers, CI) or moves a progress bar (terminal).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kappatune.errors import KappaTuneError
from kappatune.training.run_log import REPORTERS, LogLine, check_reporters, format_line

if TYPE_CHECKING:
    from rich.console import Console
    from tqdm import tqdm

    from kappatune.training.data import TokenizedData
    from kappatune.training.loop import TrainResult
    from kappatune.training.methods import PreparedModel


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
    """--report-to and --log-every (--eval-every's checks are RunSettings')."""
    check_reporters(args.report_to)
    if args.log_every < 1:
        raise KappaTuneError(f"--log-every must be at least 1, got {args.log_every}")


class Display:
    """Logged steps as a progress bar (terminal) or as a plain line every ``log_every`` steps,
    on evaluation steps and at the last step."""

    def __init__(
        self,
        *,
        total: int,
        start: int,
        log_every: int,
        print_line: Callable[[str], None],
        terminal: bool | None = None,
    ) -> None:
        self.total = total
        self.log_every = log_every
        self.print_line = print_line
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.bar = self._bar(start) if self.terminal else None

    def _bar(self, start: int) -> tqdm:
        from tqdm import tqdm

        return tqdm(total=self.total, initial=start, unit="step", desc="training")

    def show(self, line: LogLine) -> None:
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


def print_line(text: str) -> None:
    print(text, flush=True)  # plain and unwrapped, flushed at once for nohup and schedulers


class ConsoleReporter:
    """What ``kappatune train`` prints (a :class:`kappatune.training.recipe.RunReporter`)."""

    def __init__(self, console: Console, log_every: int) -> None:
        self.console = console
        self.log_every = log_every

    def unfit(self, data: TokenizedData, seq_len: int) -> None:
        print(
            f"kappatune: warning: --no-pack with --seq-len {seq_len}: {data.dropped} example(s)"
            f" dropped (completion starts past the row), {data.truncated} truncated",
            file=sys.stderr,
        )

    def finished(self, output: Path) -> None:
        self.console.print(f"{output} already holds the finished run (result.json); nothing to do")

    def header(self, model: str, method: str, data: TokenizedData, where: str) -> None:
        self.console.print(
            f"[bold]{model}[/bold]  {method}  {len(data)} rows x {data.seq_len} tokens"
            f" ({data.n_label_tokens:,} labelled)  on {where}"
        )

    def note(self, text: str) -> None:
        self.console.print(text)

    def start(
        self, prepared: PreparedModel, resumed_at: int | None, total: int, checkpoint: Path
    ) -> None:
        if resumed_at is not None:
            self.console.print(f"resuming from step {resumed_at} of {total} ({checkpoint})")
        self.console.print(
            f"trainable parameters: {prepared.trainable_params:,}"
            + (f"  (LoRA rank {prepared.lora_r})" if prepared.lora_r else "")
        )

    def progress(self, total: int, start: int) -> Display:
        return Display(total=total, start=start, log_every=self.log_every, print_line=print_line)

    def done(self, result: TrainResult, output: Path, processes: int | None) -> None:
        where = "" if processes is None else f" on {processes} processes"
        self.console.print(
            f"done: {result.steps} steps{where}, final loss {result.final_loss:.4f},"
            f" {result.mean_step_time:.2f} s/step; saved to {output}"
        )
