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


def _uses_foreach(device: str) -> bool:
    """AdamW's multi-tensor update is PyTorch's default on CUDA (``auto``: when there is one)."""
    if device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return device == "cuda"


def estimates(args: argparse.Namespace, lora_settings: LoraFromArgs) -> list[MemoryEstimate]:
    """One MemoryEstimate per method, from the config on the meta device."""
    from kappatune.training import memory

    config = memory.config_of(args.model, args.trust_remote_code)
    runtime = memory.runtime_bytes(args.model, args.trust_remote_code)  # before anything else
    return memory.method_estimates(
        config,
        args.batch_size,
        args.seq_len,
        _selection_for(args),
        lambda model_params: lora_settings(args, model_params),
        foreach=_uses_foreach(args.device),
        max_grad_norm=args.max_grad_norm,
        runtime=runtime,
    )


def run_dry(args: argparse.Namespace, lora_settings: LoraFromArgs) -> int:
    from rich.table import Table

    from kappatune.cli.console import wide_console

    rows = estimates(args, lora_settings)
    update = "multi-tensor" if _uses_foreach(args.device) else "one tensor at a time"
    table = Table(
        title=f"{args.model}: memory per method, batch {args.batch_size} x {args.seq_len} tokens,"
        f" AdamW ({update}), float32 (MB; no weights were loaded)",
        title_justify="left",
    )
    cols = (
        "method",
        "trainable",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "peak above weights",
        "peak in",
        "total",
    )
    for c in cols:
        table.add_column(c, justify="left" if c in ("method", "peak in") else "right")
    for e in rows:
        mark = " *" if e.method == args.method else ""
        sizes = (e.weights, e.gradients, e.optimizer, e.activations, e.peak_above_weights)
        table.add_row(
            e.method + mark,
            f"{e.trainable:,}",
            *(f"{b / _MB:,.0f}" for b in sizes),
            e.peak.phase,
            f"{e.total / _MB:,.0f}",
        )
    console = wide_console()
    console.print(table)
    runtime = rows[0].runtime if rows else 0
    console.print(
        f"runtime: {runtime / _MB:,.0f} MB (this process's resident size with torch,"
        " transformers, PEFT and the tokenizer loaded: what a training process holds besides"
        " the model)"
    )
    console.print(
        "* the --method asked for. Peak above weights: the most memory alive at once in a"
        " training step simulated on the meta device (gradients, optimizer state, activations"
        " and the temporaries of the loss, backward pass and optimizer step; they are not all"
        " alive at once). Total = weights + peak above weights + runtime."
    )
    return 0
