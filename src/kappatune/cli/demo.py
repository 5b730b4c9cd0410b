"""``kappatune demo [MODEL]``: analyze, select, fine-tune and measure forgetting, in one command."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from types import SimpleNamespace

    from kappatune.demo import DEFAULT_MODEL, default_settings

    d = SimpleNamespace(**default_settings())
    p = sub.add_parser(
        "demo",
        help="the whole path on built-in data: analyze, select, fine-tune, task and control"
        " perplexity before and after",
        description="Analyze a causal LM, select its lowest-kappa linear layers under a parameter\n"
        "budget, fine-tune only those on Python source for a few steps, and report the\n"
        "perplexity on unseen Python code (the task) and on English prose (the control)\n"
        "before and after.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"causal LM: built-in name, directory, .gguf or cached HF id (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--budget-params",
        default=d.budget,
        metavar="N|P%",
        help="parameters to train: a count or a percentage of the model"
        f" (default: {d.budget.replace('%', '%%')})",
    )
    p.add_argument(
        "--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})"
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default: {d.lr:g})")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"rows per step (default: {d.batch_size})",
    )
    p.add_argument(
        "--seq-len", type=int, default=d.seq_len, help=f"tokens per row (default: {d.seq_len})"
    )
    p.add_argument(
        "--eval-sequences",
        type=int,
        default=d.eval_sequences,
        help=f"sequences in each of the task and control sets (default: {d.eval_sequences})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"data order seed (default: {d.seed})")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: auto)")
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

    settings = DemoSettings(
        model=args.model,
        budget=args.budget_params,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_sequences=args.eval_sequences,
        seed=args.seed,
        device=args.device,
    )
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
