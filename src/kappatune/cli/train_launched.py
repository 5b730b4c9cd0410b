"""``kappatune train`` under ``accelerate launch`` / ``torchrun``: the multi-process run.

Same flags, checks and outputs as the single-process command (:mod:`kappatune.cli.train`).
Rank 0 computes the selection from the checkpoint files and broadcasts it, decides whether
the run is new or resumed, prints, and writes every file; all ranks train through
``accelerate`` (DDP, FSDP or DeepSpeed, as the launch configuration says).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from typing import Any

from kappatune.cli import train as single
from kappatune.errors import KappaTuneError

log = logging.getLogger(__name__)


def run_launched(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kappatune.training.accelerate_engine import (
        AccelerateEngine,
        broadcast_from_main,
        broadcast_selection,
        engine_note,
        make_accelerator,
    )
    from kappatune.training.data import PackConfig, load_examples, tokenize
    from kappatune.training.freezing import is_partitioned, param_numel
    from kappatune.training.layout import locate
    from kappatune.training.models import check_seq_len, load_causal_lm

    if args.eval_data is not None:
        raise KappaTuneError(
            "--eval-data runs in a single process only (not under accelerate launch or torchrun)"
        )
    accelerator = make_accelerator(args.grad_accum, args.device)
    engine = AccelerateEngine(accelerator, args.batch_size, args.max_grad_norm)
    console = Console(highlight=False, stderr=False, quiet=not engine.is_main)
    examples = load_examples(args.data)
    selection = broadcast_selection(lambda: single._selection(args))
    model, tokenizer = load_causal_lm(args.model, trust_remote_code=args.trust_remote_code)
    check_seq_len(args.seq_len, model, tokenizer)
    data = tokenize(tokenizer, examples, PackConfig(seq_len=args.seq_len, pack=not args.no_pack))
    if engine.is_main:
        single.warn_unfit_examples(data, args.seq_len)
    if selection is not None:
        locate(model, selection)
        log.info(
            "rank %d of %d: selection of %d tensors, %s",
            engine.rank, engine.world, len(selection.names), ",".join(selection.names),
        )  # fmt: skip
    partitioned = sum(is_partitioned(p) for p in model.parameters())
    log.info("rank %d: %d parameters partitioned by ZeRO-3 at load", engine.rank, partitioned)
    lora = None
    if args.method in ("lora", "kappa-lora"):
        lora = single._lora_settings(args, sum(param_numel(p) for p in model.parameters()))
    resolved = single._resolved(args, selection, lora) | {"processes": engine.world}
    status = broadcast_from_main(lambda: single._check_run_dir(args.output, resolved), str, str)
    if status == "done":
        console.print(f"{args.output} already holds the finished run (result.json); nothing to do")
        return 0
    console.print(
        f"[bold]{args.model}[/bold]  {args.method}  {len(data)} rows x {data.seq_len} tokens"
        f" ({data.n_label_tokens:,} labelled)  on {engine.world} processes"
        f" ({accelerator.distributed_type.value}, {accelerator.device})"
    )
    if (note := engine_note(accelerator)) is not None:
        console.print(note)
    prepared = single._prepare(model, args, selection, lora)
    if engine.is_main:
        from kappatune.jsonio import atomic_write_json

        single._write_run_files(args.output, resolved, selection, atomic_write_json)
    engine.wait()
    run = single._Run(args, console, prepared, tokenizer, data, None, selection, resolved)
    return _train(run, engine, status)


def _train(run: Any, engine: Any, status: str) -> int:
    from kappatune.cli import train_publish
    from kappatune.jsonio import atomic_write_json
    from kappatune.training.accelerate_engine import loop_meta, resume_point
    from kappatune.training.loop import StopRule, train_loop

    args, prepared, console = run.args, run.prepared, run.console
    resume = None
    if status == "resume" and (point := resume_point(args.output)) is not None:
        engine.resume_from, resume = point
    config = single._train_config(args)
    total = config.total_steps(len(run.data), engine.world)
    start = single.announce_start(console, args, prepared, resume, total)
    watch = single._watch(run, prepared.model, total, start) if engine.is_main else None

    def on_step(state: Any) -> None:
        if state.step % args.checkpoint_every == 0 and state.step < total:
            engine.save_checkpoint(args.output, loop_meta(state))

    try:
        result = train_loop(
            prepared.model, run.data, config, StopRule(), param_groups=prepared.param_groups,
            resume=resume, on_step=on_step, engine=engine, observer=watch,
        )  # fmt: skip
    finally:
        if watch is not None:
            watch.close()
    target = args.output / ("adapter" if train_publish.is_adapter(args.method) else "model")
    engine.save_model(target, run.tokenizer, dtype=_save_dtype(args, prepared.model))
    if engine.is_main:
        train_publish.write_model_card(target, args, result, prepared, run.selection, None)
        report = result.to_json() | {
            "method": args.method,
            "trainable_params": prepared.trainable_params,
            "processes": engine.world,
            **single.unfit_counts(run.data),
        }
        atomic_write_json(args.output / "result.json", report)
        shutil.rmtree(args.output / "checkpoint", ignore_errors=True)
    engine.wait()
    console.print(
        f"done: {result.steps} steps on {engine.world} processes, final loss"
        f" {result.final_loss:.4f}, {result.mean_step_time:.2f} s/step; saved to {args.output}"
    )
    if engine.is_main:
        train_publish.push(target, args, console)
    return 0


def _save_dtype(args: argparse.Namespace, model: Any) -> Any:
    """The dtype to save a model in (None: adapters, saved as trained); names the base
    model portably in an adapter's config."""
    from kappatune.cli.train_publish import is_adapter, save_dtype

    if is_adapter(args.method):
        from kappatune.training.models import portable_name

        for config in model.peft_config.values():
            config.base_model_name_or_path = portable_name(args.model)
        return None
    return save_dtype(args)
