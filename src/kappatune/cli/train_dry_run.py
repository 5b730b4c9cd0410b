"""``kappatune train ... --dry-run``: the memory each method would need, without loading weights."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kappatune.selection.core import Selection
    from kappatune.training.loop import LoraSettings
    from kappatune.training.memory import MemoryEstimate

#: ``train``'s LoRA settings from its flags and the model's parameter count.
LoraFromArgs = Callable[[argparse.Namespace, int], "LoraSettings | None"]

_MB = 2**20


def _selection_for(args: argparse.Namespace) -> Selection:
    """The selection ``train`` would use (a --selection file, or the policy flags on the analysis)."""
    from kappatune.cli.select import load_analysis, selection_from_args
    from kappatune.selection.core import Selection
    from kappatune.training.models import analysis_source

    if args.selection is not None:
        return Selection.load(args.selection)
    return selection_from_args(
        args, load_analysis(analysis_source(args.model), policy=args.policy), model_spec=args.model
    )


def estimates(args: argparse.Namespace, lora_settings: LoraFromArgs) -> list[MemoryEstimate]:
    """One MemoryEstimate per method, from the config on the meta device."""
    from kappatune.training import memory

    config = memory.config_of(args.model, args.trust_remote_code)
    return memory.method_estimates(
        config,
        args.batch_size,
        args.seq_len,
        _selection_for(args),
        lambda model_params: lora_settings(args, model_params),
    )


def run_dry(args: argparse.Namespace, lora_settings: LoraFromArgs) -> int:
    from rich.table import Table

    from kappatune.cli.console import wide_console

    rows = estimates(args, lora_settings)
    table = Table(
        title=f"{args.model}: memory per method, batch {args.batch_size} x {args.seq_len} tokens,"
        " AdamW, float32 (MB; no weights were loaded)",
        title_justify="left",
    )
    cols = (
        "method",
        "trainable",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "transient",
        "total",
    )
    for c in cols:
        table.add_column(c, justify="left" if c == "method" else "right")
    for e in rows:
        transient = max(e.backward_transient, e.step_transient)
        mark = " *" if e.method == args.method else ""
        table.add_row(
            e.method + mark,
            f"{e.trainable:,}",
            *(f"{b / _MB:,.0f}" for b in (e.weights, e.gradients, e.optimizer, e.activations)),
            f"{transient / _MB:,.0f}",
            f"{e.total / _MB:,.0f}",
        )
    console = wide_console()
    console.print(table)
    console.print(
        "* the --method asked for. Total = weights + gradients + optimizer state + the larger of"
        " (activations + loss backward) and the optimizer step's temporaries; the process"
        " runtime (Python, torch, tokenizer) comes on top."
    )
    return 0
