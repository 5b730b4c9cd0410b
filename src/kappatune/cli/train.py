"""``kappatune train MODEL --data FILE... --method ... --output DIR``: fine-tune and save.

Everything is validated (flags, data files, selection, model names) before anything is
written to DIR. DIR then holds ``run.json`` (the resolved configuration), ``selection.json``
(selective and kappa-lora), a ``checkpoint/`` every ``--checkpoint-every`` steps, and at
the end ``model/`` (selective, full) or ``adapter/`` (lora, kappa-lora) plus ``result.json``.
Rerunning the same command with the same DIR resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from kappatune.cli.select import add_selection_flags, validate_selection_args
from kappatune.errors import KappaTuneError

METHODS = ("selective", "kappa-lora", "lora", "full")
RUN_FORMAT = 1
_VOLATILE = ("checkpoint_every",)

EPILOG = """examples:
  kappatune train gemma-3-270m --data task.txt --method selective --budget-params 5% --steps 100 -o runs/sel
  kappatune train ./my-model --data train.jsonl --method kappa-lora --selection sel.json --lora-r 16 -o runs/kl
  kappatune train gemma-3-270m --data train.jsonl --method lora --lora-r 8 --epochs 2 -o runs/lora
  kappatune train ./my-model --data a.txt b.txt --method full --lr 2e-5 --warmup 10 --steps 200 -o runs/full

JSONL records hold "text", or "prompt" and "completion" (loss on the completion only).
Rerun the same command to resume an interrupted run from its last checkpoint.
Multi-process (DDP, FSDP with fsdp_use_orig_params, DeepSpeed ZeRO-2/3):
  accelerate launch --config_file fsdp.yaml -m kappatune.cli.main train ./my-model --data t.txt --method selective -o runs/d
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a causal LM: selective (KappaTune), kappa-lora, lora or full",
        description="Fine-tune a causal language model on text/JSONL files with a plain PyTorch loop.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument("--method", required=True, choices=METHODS, help="what to train")
    p.add_argument(
        "--output", "-o", type=Path, required=True, help="run directory (created; reused to resume)"
    )
    p.add_argument(
        "--selection", type=Path, metavar="FILE", help="selection JSON from 'kappatune select'"
    )
    add_selection_flags(p)
    t = p.add_argument_group("training")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    t.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default: 0)")
    t.add_argument("--scheduler", default="constant", choices=("constant", "linear", "cosine"))
    t.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch (default: 4)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    t.add_argument("--seq-len", type=int, default=128, help="tokens per row (default: 128)")
    t.add_argument("--no-pack", action="store_true", help="one example per row instead of packing")
    t.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)"
    )
    t.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: 1.0)"
    )
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="checkpoint interval in steps (default: 50)",
    )
    t.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    t.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own Python code"
    )
    lora = p.add_argument_group("LoRA (lora, kappa-lora)")
    lora.add_argument("--lora-r", type=int, default=8, help="rank (default: 8)")
    lora.add_argument("--lora-alpha", type=int, help="alpha (default: 2 x rank)")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora-budget",
        metavar="N|P%",
        help="LoRA parameter budget: fit the rank (with --lora-r 0) or the module count",
    )
    p.set_defaults(run=run)


# --------------------------------------------------------------------------- validation


def _train_config(args: argparse.Namespace) -> Any:
    from kappatune.training import TrainConfig

    return TrainConfig(
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        warmup_steps=args.warmup,
        scheduler=args.scheduler,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seed=args.seed,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
    )


def _lora_settings(args: argparse.Namespace, total_params: int | None) -> Any:
    from kappatune.selection import Budget
    from kappatune.training import LoraSettings

    budget = None
    if args.lora_budget is not None:
        b = Budget.parse_params(args.lora_budget)
        if b.params is not None:
            budget = b.params
        else:
            if total_params is None:
                return None  # resolved once the model is loaded
            assert b.params_percent is not None
            budget = max(1, int(total_params * b.params_percent / 100))
    r = None if args.lora_r == 0 else args.lora_r
    return LoraSettings(r=r, alpha=args.lora_alpha, dropout=args.lora_dropout, budget_params=budget)


def _validate(args: argparse.Namespace) -> None:
    from kappatune.data import PackConfig

    if args.steps is None and args.epochs is None:
        raise KappaTuneError("give --steps N or --epochs N")
    _train_config(args)
    PackConfig(seq_len=args.seq_len, pack=not args.no_pack)
    if args.checkpoint_every < 1:
        raise KappaTuneError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if args.lora_r < 0:
        raise KappaTuneError(
            f"--lora-r must be at least 1 (or 0 with --lora-budget), got {args.lora_r}"
        )
    if args.lora_r == 0 and args.lora_budget is None:
        raise KappaTuneError("--lora-r 0 (fit the rank) needs --lora-budget")
    if args.method in ("lora", "kappa-lora"):
        _lora_settings(args, None)
    needs_selection = args.method in ("selective", "kappa-lora")
    if args.selection is not None:
        if not needs_selection:
            raise KappaTuneError(
                f"--selection only applies to --method selective or kappa-lora, not {args.method}"
            )
        if not args.selection.is_file():
            raise KappaTuneError(f"no such selection file: {args.selection}")
    if needs_selection:
        validate_selection_args(args)
    from kappatune.outputs import check_dir

    check_dir(args.output, "--output")


def _resolved(args: argparse.Namespace, selection: Any, lora: Any) -> dict[str, Any]:
    from dataclasses import asdict

    import kappatune

    return {
        "format": RUN_FORMAT,
        "kappatune_version": kappatune.__version__,
        "model": args.model,
        "method": args.method,
        "data": [str(d) for d in args.data],
        "seq_len": args.seq_len,
        "pack": not args.no_pack,
        "train": _train_config(args).to_json(),
        "lora": None if lora is None else asdict(lora),
        "selection": None
        if selection is None
        else {
            "policy": selection.policy,
            "fingerprint": selection.fingerprint,
            "names": list(selection.names),
        },
        "checkpoint_every": args.checkpoint_every,
    }


def _check_run_dir(out: Path, resolved: dict[str, Any]) -> str:
    """'new', 'resume' or 'done'; raises if DIR holds something else."""
    run_file = out / "run.json"
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "new"
    if not run_file.is_file():
        raise KappaTuneError(
            f"--output {out} is not empty and holds no kappatune run (run.json); choose a new directory"
        )
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KappaTuneError(f"cannot read {run_file}: {exc}") from None
    if not isinstance(previous, dict):
        raise KappaTuneError(f"cannot read {run_file}: not a JSON object")
    keys = sorted(
        k
        for k in set(previous) | set(resolved)
        if k not in _VOLATILE and previous.get(k) != resolved.get(k)
    )
    if keys:
        raise KappaTuneError(
            f"--output {out} holds a run with a different configuration (differs in: {', '.join(keys)});"
            " choose a new directory"
        )
    return "done" if (out / "result.json").is_file() else "resume"


# --------------------------------------------------------------------------- checkpoints


def _trainable_state(model: Any) -> dict[str, Any]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def _save_checkpoint(out: Path, model: Any, loop_state: Any) -> None:
    """``checkpoint/``: safetensors and JSON with a manifest of digests (nothing pickled)."""
    from kappatune.checkpoint import swap_in, write_checkpoint

    tmp = out / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, _trainable_state(model), loop_state.state_dict())
    swap_in(tmp, out / "checkpoint")


def _load_checkpoint(out: Path, prepared: Any, config: Any, total: int) -> dict[str, Any] | None:
    """The loop state of ``out/checkpoint`` after copying its tensors into the model, or None.

    Only the run's own trainable tensors, with their shapes and dtypes, are accepted, only
    from files that match the manifest's digests, and only with a loop state shaped like
    the one this run would write (see :mod:`kappatune.checkpoint`).
    """
    import torch

    from kappatune.checkpoint import TensorSpec, check_loop_state, read_checkpoint
    from kappatune.training import reference_state

    ckpt = out / "checkpoint"
    if not ckpt.exists():
        return None
    params = {n: p for n, p in prepared.model.named_parameters() if p.requires_grad}
    tensors, state = read_checkpoint(ckpt, {n: TensorSpec.of(p) for n, p in params.items()})
    shapes = [[tuple(p.shape) for p in g["params"]] for g in prepared.param_groups]
    reference = reference_state(prepared.param_groups, config, total)
    check_loop_state(ckpt, state, reference, shapes)
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return state


# --------------------------------------------------------------------------- the command


def _selection(args: argparse.Namespace) -> Any:
    from kappatune.cli.select import load_analysis, selection_from_args
    from kappatune.models import analysis_source
    from kappatune.selection import Selection

    if args.method not in ("selective", "kappa-lora"):
        return None
    if args.selection is not None:
        return Selection.load(args.selection)
    analysis = load_analysis(analysis_source(args.model))
    return selection_from_args(args, analysis, model_spec=args.model)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kappatune.data import PackConfig, load_examples, tokenize
    from kappatune.devices import resolve_device
    from kappatune.distributed_train import launched
    from kappatune.jsonio import atomic_write_json
    from kappatune.layout import locate
    from kappatune.models import check_seq_len, load_causal_lm, total_parameters

    _validate(args)
    _quiet_transformers()
    if launched():  # accelerate launch / torchrun: kappatune.cli.train_launched
        from kappatune.cli.train_launched import run_launched

        return run_launched(args)
    console = Console(highlight=False, stderr=False)
    device = resolve_device(args.device)
    examples = load_examples(args.data)
    selection = _selection(args)
    model, tokenizer = load_causal_lm(args.model, trust_remote_code=args.trust_remote_code)
    check_seq_len(args.seq_len, model, tokenizer)
    data = tokenize(tokenizer, examples, PackConfig(seq_len=args.seq_len, pack=not args.no_pack))
    warn_unfit_examples(data, args.seq_len)
    if selection is not None:
        locate(model, selection)
    lora = (
        _lora_settings(args, total_parameters(model))
        if args.method in ("lora", "kappa-lora")
        else None
    )
    resolved = _resolved(args, selection, lora)
    status = _check_run_dir(args.output, resolved)
    if status == "done":
        console.print(f"{args.output} already holds the finished run (result.json); nothing to do")
        return 0
    console.print(
        f"[bold]{args.model}[/bold]  {args.method}  {len(data)} rows x {data.seq_len} tokens"
        f" ({data.n_label_tokens:,} labelled)  on {device}"
    )
    prepared = _prepare(model, args, selection, lora)
    _write_run_files(args.output, resolved, selection, atomic_write_json)
    return _train(args, console, prepared, tokenizer, data, device, status)


def warn_unfit_examples(data: Any, seq_len: int) -> None:
    """One stderr line when --no-pack dropped or cut examples at --seq-len."""
    if data.dropped or data.truncated:
        print(
            f"kappatune: warning: --no-pack with --seq-len {seq_len}: {data.dropped} example(s)"
            f" dropped (completion starts past the row), {data.truncated} truncated",
            file=sys.stderr,
        )


def unfit_counts(data: Any) -> dict[str, int]:
    """result.json's record of what --no-pack left out or cut."""
    return {"dropped_examples": data.dropped, "truncated_examples": data.truncated}


def _quiet_transformers() -> None:
    """The command reports progress itself; transformers' own bars and notices would interleave."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _prepare(model: Any, args: argparse.Namespace, selection: Any, lora: Any) -> Any:
    import torch

    from kappatune.training import prepare_model

    torch.manual_seed(args.seed)  # LoRA initialisation
    return prepare_model(model, args.method, selection, lora, weight_decay=args.weight_decay)


def _write_run_files(out: Path, resolved: dict[str, Any], selection: Any, write: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write(out / "run.json", resolved)
    if selection is not None:
        selection.save(out / "selection.json")


def announce_start(
    console: Any, args: argparse.Namespace, prepared: Any, resume: dict[str, Any] | None, total: int
) -> int:
    """Print where the run starts and what it trains; return the step it starts from."""
    start = 0 if resume is None else int(resume["step"])
    if resume is not None:
        console.print(f"resuming from step {start} of {total} ({args.output / 'checkpoint'})")
    console.print(
        f"trainable parameters: {prepared.trainable_params:,}"
        + (f"  (LoRA rank {prepared.lora_r})" if prepared.lora_r else "")
    )
    return start


def _train(
    args: argparse.Namespace,
    console: Any,
    prepared: Any,
    tokenizer: Any,
    data: Any,
    device: Any,
    status: str,
) -> int:
    from tqdm import tqdm

    from kappatune.jsonio import atomic_write_json
    from kappatune.training import StopRule, train_loop

    model = prepared.model.to(device)
    config = _train_config(args)
    total = config.total_steps(len(data))
    resume = _load_checkpoint(args.output, prepared, config, total) if status == "resume" else None
    start = announce_start(console, args, prepared, resume, total)
    bar = tqdm(total=total, initial=start, unit="step", desc="training", disable=None)

    def on_step(state: Any) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
        if state.step % args.checkpoint_every == 0 and state.step < total:
            _save_checkpoint(args.output, model, state)

    try:
        result = train_loop(
            model, data, config, StopRule(), param_groups=prepared.param_groups, resume=resume,
            on_step=on_step, device=device,
        )  # fmt: skip
    finally:
        bar.close()
    _save_final(args.output, args.method, model, tokenizer)
    report = result.to_json() | {
        "method": args.method,
        "trainable_params": prepared.trainable_params,
        **unfit_counts(data),
    }
    atomic_write_json(args.output / "result.json", report)
    shutil.rmtree(args.output / "checkpoint", ignore_errors=True)
    console.print(
        f"done: {result.steps} steps, final loss {result.final_loss:.4f},"
        f" {result.mean_step_time:.2f} s/step; saved to {args.output}"
    )
    return 0


def _save_final(out: Path, method: str, model: Any, tokenizer: Any) -> None:
    target = out / ("adapter" if method in ("lora", "kappa-lora") else "model")
    tmp = out / f".{target.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # safetensors; PEFT models save the adapter only
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
