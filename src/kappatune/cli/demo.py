"""``kappatune demo [MODEL]``: analyze, select, fine-tune and measure forgetting, in one command."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kappatune.cli.command import add_command
from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from rich.console import Console

    from kappatune.analysis.spectra import Analysis
    from kappatune.demo import DemoResult, Perplexities
    from kappatune.selection.core import Selection

EPILOG = """examples:
  kappatune demo                                  # Gemma 3 270M, the built-in default
  kappatune demo --steps 100 --budget-params 5% -o demo.json
  kappatune demo ./my-causal-lm

The task is Python standard-library source (training on 29 modules, perplexity on 8 others);
the control is English prose from Python's own documentation (pydoc_data.topics), standing for
what the model already knew. Everything runs offline.
"""


def add_parser(sub: Any) -> None:
    from kappatune.demo import DemoSettings
    from kappatune.settings import add_flags

    p = add_command(
        sub,
        "demo",
        help="the whole path on built-in data: analyze, select, fine-tune, task and control"
        " perplexity before and after",
        description="Analyze a causal LM, select its lowest-kappa linear layers under a parameter\n"
        "budget, fine-tune only those on Python source for a few steps, and report the\n"
        "perplexity on unseen Python code (the task) and on English prose (the control)\n"
        "before and after.",
        epilog=EPILOG,
    )
    add_flags(p, DemoSettings)
    p.add_argument("--output", "-o", type=Path, help="also write the figures as JSON here")
    p.set_defaults(run=run)


class ConsoleReporter:
    """Prints each stage as a plain line (readable without a terminal, e.g. under nohup)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def stage(self, text: str) -> None:
        self.console.print(f"[bold]>[/bold] {text}")

    def analysed(self, analysis: Analysis) -> None:
        rows = [r for r in analysis.tensors if math.isfinite(r.kappa)]
        if not rows:
            return
        low = min(rows, key=lambda r: (r.kappa, r.name))
        high = max(rows, key=lambda r: (r.kappa, r.name))
        self.console.print(
            f"  {len(analysis.tensors)} matrices; kappa from {low.kappa:.3g} ({low.name})"
            f" to {high.kappa:.3g} ({high.name})"
        )

    def selected(self, selection: Selection) -> None:
        from kappatune.cli.select import print_selection

        print_selection(self.console, selection, top=10)

    def step(self, step: int, total: int, loss: float) -> None:
        every = max(1, total // 10)
        if step % every == 0 or step in (1, total):
            self.console.print(f"  step {step}/{total}  loss {loss:.4f}")

    def measured(self, when: str, ppl: Perplexities) -> None:
        self.console.print(
            f"  perplexity {when}: task (unseen Python code) {ppl.task:.3f},"
            f" control (English prose) {ppl.control:.3f}"
        )


def _summary(console: Console, result: DemoResult) -> None:
    from rich.table import Table

    from kappatune.demo import loss_window

    t = Table(title="perplexity (lower is better)", title_justify="left")
    for col in ("", "before", "after", "change"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row(
        "task: unseen Python code",
        f"{result.before.task:.3f}",
        f"{result.after.task:.3f}",
        f"{result.task_change:+.1f}%",
    )
    t.add_row(
        "control: English prose",
        f"{result.before.control:.3f}",
        f"{result.after.control:.3f}",
        f"{result.control_change:+.1f}%",
    )
    console.print(t)
    if result.frozen_changed:  # the selection's guarantee failed: say so loudly
        console.print(
            f"[red]{len(result.frozen_changed)} frozen tensor(s) changed, e.g. {result.frozen_changed[0]}[/red]"
        )
    else:
        console.print("every frozen tensor is bit-identical to the original")
    k = loss_window(result.steps)
    console.print(
        f"training loss, mean of the first and last {k} step(s): {result.first_loss:.3f} ->"
        f" {result.final_loss:.3f};"
        f" {result.seconds['total']:.0f} s in all ({result.seconds['load']:.0f} s loading,"
        f" {result.seconds['train']:.0f} s training)"
    )
    console.print(result.sentence(), soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    from kappatune.cli.console import wide_console
    from kappatune.cli.quiet import quiet_transformers
    from kappatune.demo import DemoSettings, run_demo
    from kappatune.jsonio import atomic_write_json
    from kappatune.settings import from_args

    settings = from_args(DemoSettings, args)
    if args.output is not None and args.output.is_dir():
        raise KappaTuneError(f"--output {args.output} is a directory; give a file name")
    quiet_transformers()
    console = wide_console()
    result = run_demo(settings, ConsoleReporter(console))
    _summary(console, result)
    if args.output is not None:
        atomic_write_json(args.output, result.to_json())
        console.print(f"wrote {args.output}")
    return 1 if result.frozen_changed else 0
