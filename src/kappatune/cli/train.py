"""``kappatune train MODEL --data FILE... --method ... --output DIR``: fine-tune and save.

The command parses its flags into :class:`kappatune.training.run_settings.RunSettings` and runs
:func:`kappatune.training.recipe.run_training` (one process, or every process of an
``accelerate launch`` / ``torchrun``); :mod:`kappatune.cli.train_watch` prints what it reports.

Everything is validated (flags, data files, selection, model names) before anything is
written to DIR. DIR then holds ``run.json`` (the resolved configuration), ``selection.json``
(selective and kappa-lora), ``log.jsonl`` (one line per step), a ``checkpoint/`` every
``--checkpoint-every`` steps, and at the end ``model/`` (selective, full) or ``adapter/``
(lora, kappa-lora), each with a model card, plus ``result.json``. Rerunning the same command
with the same DIR resumes from the last checkpoint. Flags can come from ``--config run.yaml``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from kappatune.cli.command import add_command
from kappatune.cli.config import add_config_flag
from kappatune.cli.select import add_selection_flags, validate_selection_args
from kappatune.cli.train_publish import add_publish_flags, validate_publish
from kappatune.cli.train_watch import add_watch_flags, validate_watch
from kappatune.errors import KappaTuneError
from kappatune.training.methods import get_method, method_names

if TYPE_CHECKING:
    from kappatune.cli.select import SelectionFlags
    from kappatune.selection.budget import Budget
    from kappatune.selection.core import Selection
    from kappatune.training.loop import LoraSettings, TrainConfig
    from kappatune.training.run_settings import RunSettings, SelectionSource

EPILOG = """examples:
  kappatune train gemma-3-270m --data task.txt --method selective --budget-params 5% --steps 100 -o runs/sel
  kappatune train ./my-model --data train.jsonl --method kappa-lora --selection sel.json --lora-r 16 -o runs/kl
  kappatune train gemma-3-270m --data train.jsonl --method lora --lora-r 8 --epochs 2 -o runs/lora
  kappatune train ./my-model --data a.txt b.txt --method full --lr 2e-5 --warmup 10 --steps 200 -o runs/full
  kappatune train --config run.yaml --lr 5e-5      (YAML keys are the flag names; flags override)

JSONL records hold "text", "prompt" and "completion" (loss on the completion only), or
"messages" (chat turns, rendered with the model's chat template; loss on assistant turns only).
--budget-params is always what is trained. With --method lora or kappa-lora it sizes the
adapter: without --lora-r the rank is fitted (the largest rank whose adapters fit the budget;
kappa-lora adapts the policy's first 20% of the candidates, or --selection's modules); with
--lora-r the module count is fitted (the policy order's modules until the next adapter does
not fit; --fill greedy skips it and fills on).
Each step is appended to DIR/log.jsonl; without a terminal it is also printed as a line.
Rerun the same command to resume an interrupted run from its last checkpoint.
Multi-process (DDP, FSDP with fsdp_use_orig_params, DeepSpeed ZeRO-2/3):
  accelerate launch --config_file fsdp.yaml -m kappatune.cli.main train ./my-model --data t.txt --method selective -o runs/d
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "train",
        help="fine-tune a causal LM: selective (KappaTune), kappa-lora, lora or full",
        description="Fine-tune a causal language model on text/JSONL files with a plain PyTorch loop.",
        epilog=EPILOG,
    )
    p.add_argument(
        "model", help="model directory, .gguf file, built-in name (gemma-3-270m) or cached HF id"
    )
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="FILE",
        help="text, JSONL or JSON files, or HF dataset names",
    )
    p.add_argument("--method", required=True, choices=method_names(), help="what to train")
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        help="run directory (created; reused to resume); required except with --dry-run",
    )
    p.add_argument(
        "--selection", type=Path, metavar="FILE", help="selection JSON from 'kappatune select'"
    )
    add_selection_flags(p, lora_note=True)
    p.add_argument(
        "--selection-other-weights",
        action="store_true",
        help="train a --selection made on other weights of this architecture (by default a"
        " selected matrix whose kappa differs from the selection's is refused)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory each method would need (weights, gradients, optimizer state,"
        " activations at --batch-size x --seq-len) without loading weights; train nothing",
    )
    from kappatune.settings import add_flags, argument_group
    from kappatune.training.config import LoraSettings, TrainConfig

    before_rows = ("steps", "epochs", "lr", "warmup_steps", "scheduler", "batch_size", "grad_accum")
    add_flags(p, TrainConfig, only=before_rows)  # --seed is the selection flags'
    t = argument_group(p, "training")
    from kappatune.training.config import PackConfig

    add_flags(p, PackConfig)  # --seq-len, --no-pack
    t.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast of the forward and backward passes (weights, gradients and AdamW"
        " state stay float32; frozen tensors are untouched)",
    )
    t.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, about a third more time)",
    )
    add_flags(p, TrainConfig, only=("weight_decay", "max_grad_norm"))
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="checkpoint interval in steps (default: 50)",
    )
    t.add_argument("--device", default="auto", help=f"{_devices()} (default: auto)")
    t.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own Python code"
    )
    add_flags(p, LoraSettings)
    add_watch_flags(p)
    add_publish_flags(p)
    add_config_flag(p)
    p.set_defaults(run=run)


def _devices() -> str:
    from kappatune.devices import DEVICES

    return f"{', '.join(DEVICES[:-1])} or {DEVICES[-1]}"


# --------------------------------------------------------------------------- settings


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from kappatune.settings import from_args
    from kappatune.training.loop import TrainConfig

    return from_args(TrainConfig, args)  # type: ignore[no-any-return]


def _lora_settings(args: argparse.Namespace, total_params: int | None) -> LoraSettings | None:
    """LoRA settings; ``--budget-params`` sizes the adapter (rank, or module count with --lora-r)."""
    from kappatune.selection.budget import Budget
    from kappatune.training.loop import DEFAULT_LORA_R, LoraSettings

    budget = None
    if args.budget_params is not None:
        b = Budget.parse_params(args.budget_params)
        if b.params is not None:
            budget = b.params
        else:
            if total_params is None:
                return None  # resolved once the model is loaded
            assert b.params_percent is not None
            budget = max(1, int(total_params * b.params_percent / 100))
    r = args.lora_r if args.lora_r is not None or budget is not None else DEFAULT_LORA_R
    return LoraSettings(
        r=r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        budget_params=budget,
        greedy=args.fill == "greedy",
    )


def _validate_dry(args: argparse.Namespace) -> None:
    """The checks a --dry-run needs: it trains nothing, so neither --steps nor --output."""
    if args.lora_r is not None and args.lora_r < 1:
        raise KappaTuneError(f"--lora-r must be at least 1, got {args.lora_r}")
    if get_method(args.method).lora:
        _lora_settings(args, None)


def _validate(args: argparse.Namespace) -> RunSettings:
    """The run's settings, after every check that needs no model or data."""
    method = get_method(args.method)
    if args.output is None:
        raise KappaTuneError("the following arguments are required: --output/-o")
    if args.steps is None and args.epochs is None:
        raise KappaTuneError("give --steps N or --epochs N")
    settings = settings_from_args(args)
    if args.lora_r is not None and args.lora_r < 1:
        raise KappaTuneError(f"--lora-r must be at least 1, got {args.lora_r}")
    if method.lora:
        _lora_settings(args, None)
    if args.selection is not None:
        if not method.needs_selection:
            raise KappaTuneError(
                f"--selection only applies to --method selective or kappa-lora, not {args.method}"
            )
        if not args.selection.is_file():
            raise KappaTuneError(f"no such selection file: {args.selection}")
    if method.needs_selection:
        flags = validate_selection_args(args)
        settings = replace(settings, selection=_selection(args, flags))
    from kappatune.outputs import check_dir

    check_dir(args.output, "--output")
    validate_watch(args)
    validate_publish(args)
    return settings


def _selection(
    args: argparse.Namespace, flags: SelectionFlags | None = None
) -> SelectionSource | None:
    """The selection file, or how to make the selection from the policy flags (``flags``:
    as validated)."""
    if not get_method(args.method).needs_selection:
        return None
    if args.selection is not None:
        return Path(args.selection)

    def make() -> Selection:
        from kappatune.cli.select import load_analysis, selection_from_args
        from kappatune.training.models import analysis_source

        analysis = load_analysis(analysis_source(args.model), policy=args.policy)
        budget = _modules_budget(args)
        return selection_from_args(
            args, analysis, model_spec=args.model, budget=budget, flags=flags
        )

    return make


def _modules_budget(args: argparse.Namespace) -> Budget | None:
    """kappa-lora with --budget-params: the budget sizes the adapter, not the module list.

    The rank is fitted on the policy's first 20% (as the bench's KappaTune-LoRA arm), or,
    with --lora-r, the module count is fitted along the whole policy order.
    """
    from kappatune.cli.select import DEFAULT_FRACTION
    from kappatune.selection.budget import Budget

    method = get_method(args.method)
    if not (method.lora and method.needs_selection) or args.budget_params is None:
        return None
    return Budget(fraction=1.0 if args.lora_r is not None else DEFAULT_FRACTION)


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    from kappatune.settings import from_args
    from kappatune.training.config import PackConfig
    from kappatune.training.run_settings import RunSettings

    def lora(total_params: int) -> LoraSettings:
        settings = _lora_settings(args, total_params)
        assert settings is not None
        return settings

    return RunSettings(
        model=args.model,
        data=tuple(str(d) for d in args.data),
        method=args.method,
        output=args.output,
        train=_train_config(args),
        pack=from_args(PackConfig, args),
        selection=_selection(args),
        lora=lora if get_method(args.method).lora else None,
        checkpoint_every=args.checkpoint_every,
        eval_data=None if args.eval_data is None else tuple(str(d) for d in args.eval_data),
        eval_every=args.eval_every,
        report_to=tuple(args.report_to),
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        save_dtype=args.save_dtype,
        other_weights=args.selection_other_weights,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
    )


# --------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kappatune.cli.quiet import quiet_transformers
    from kappatune.cli.train_publish import push
    from kappatune.cli.train_watch import ConsoleReporter
    from kappatune.training.recipe import run_training

    if args.dry_run:  # memory per method from the config alone: no weights, nothing written
        from kappatune.cli.train_dry_run import run_dry

        _validate_dry(args)
        quiet_transformers()
        return run_dry(args, _lora_settings)
    settings = _validate(args)
    quiet_transformers()
    console = Console(highlight=False, stderr=False)
    outcome = run_training(settings, reporter=ConsoleReporter(console, args.log_every))
    if outcome.target is not None and outcome.is_main:
        push(outcome.target, args, console)
    return 0
