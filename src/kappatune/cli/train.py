"""``kappatune train MODEL --data FILE... --method ... --output DIR``: fine-tune and save.

Everything is validated (flags, data files, selection, model names) before anything is
written to DIR. DIR then holds ``run.json`` (the resolved configuration), ``selection.json``
(selective and kappa-lora), ``log.jsonl`` (one line per step), a ``checkpoint/`` every
``--checkpoint-every`` steps, and at the end ``model/`` (selective, full) or ``adapter/``
(lora, kappa-lora), each with a model card, plus ``result.json``. Rerunning the same command
with the same DIR resumes from the last checkpoint. Flags can come from ``--config run.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kappatune.cli.config import add_config_flag
from kappatune.cli.select import add_selection_flags, validate_selection_args
from kappatune.cli.train_publish import add_publish_flags, validate_publish
from kappatune.cli.train_watch import add_watch_flags, validate_watch
from kappatune.errors import KappaTuneError

METHODS = ("selective", "kappa-lora", "lora", "full")
RUN_FORMAT = 1
_VOLATILE = ("checkpoint_every",)

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
    add_selection_flags(p, lora_note=True)
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
    t.add_argument("--seq-len", type=int, default=128, help="tokens per row (default: 128)")
    t.add_argument("--no-pack", action="store_true", help="one example per row instead of packing")
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


# --------------------------------------------------------------------------- validation


def _train_config(args: argparse.Namespace) -> Any:
    from kappatune.training.loop import TrainConfig

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


def _validate(args: argparse.Namespace) -> None:
    from kappatune.training.data import PackConfig

    if args.steps is None and args.epochs is None:
        raise KappaTuneError("give --steps N or --epochs N")
    _train_config(args)
    PackConfig(seq_len=args.seq_len, pack=not args.no_pack)
    if args.checkpoint_every < 1:
        raise KappaTuneError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if args.lora_r is not None and args.lora_r < 1:
        raise KappaTuneError(f"--lora-r must be at least 1, got {args.lora_r}")
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
    validate_watch(args)
    validate_publish(args)


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
        "eval_data": None if args.eval_data is None else [str(d) for d in args.eval_data],
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
    from kappatune.training.checkpoint import swap_in, write_checkpoint

    tmp = out / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, _trainable_state(model), loop_state.state_dict())
    swap_in(tmp, out / "checkpoint")


def _load_checkpoint(out: Path, prepared: Any, config: Any, total: int) -> dict[str, Any] | None:
    """The loop state of ``out/checkpoint`` after copying its tensors into the model, or None.

    Only the run's own trainable tensors, with their shapes and dtypes, are accepted, only
    from files that match the manifest's digests, and only with a loop state shaped like
    the one this run would write (see :mod:`kappatune.training.checkpoint`).
    """
    import torch

    from kappatune.training.checkpoint import TensorSpec, check_loop_state, read_checkpoint
    from kappatune.training.loop import reference_state

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
    from kappatune.selection.core import Selection
    from kappatune.training.models import analysis_source

    if args.method not in ("selective", "kappa-lora"):
        return None
    if args.selection is not None:
        return Selection.load(args.selection)
    analysis = load_analysis(analysis_source(args.model), policy=args.policy)
    return selection_from_args(args, analysis, model_spec=args.model, budget=_modules_budget(args))


def _modules_budget(args: argparse.Namespace) -> Any:
    """kappa-lora with --budget-params: the budget sizes the adapter, not the module list.

    The rank is fitted on the policy's first 20% (as the bench's KappaTune-LoRA arm), or,
    with --lora-r, the module count is fitted along the whole policy order.
    """
    from kappatune.cli.select import DEFAULT_FRACTION
    from kappatune.selection.budget import Budget

    if args.method != "kappa-lora" or args.budget_params is None:
        return None
    return Budget(fraction=1.0 if args.lora_r is not None else DEFAULT_FRACTION)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kappatune.cli.quiet import quiet_transformers
    from kappatune.devices import resolve_device
    from kappatune.jsonio import atomic_write_json
    from kappatune.training.accelerate_engine import launched
    from kappatune.training.data import PackConfig, load_examples, tokenize
    from kappatune.training.layout import locate
    from kappatune.training.models import check_seq_len, load_causal_lm, total_parameters

    _validate(args)
    quiet_transformers()
    if args.dry_run:  # memory per method from the config alone: no weights, nothing written
        from kappatune.cli.train_dry_run import run_dry

        return run_dry(args, _lora_settings)
    if launched():  # accelerate launch / torchrun: kappatune.cli.train_launched
        from kappatune.cli.train_launched import run_launched

        return run_launched(args)
    console = Console(highlight=False, stderr=False)
    device = resolve_device(args.device)
    examples = load_examples(args.data)
    eval_examples = None if args.eval_data is None else load_examples(args.eval_data)
    selection = _selection(args)
    model, tokenizer = load_causal_lm(args.model, trust_remote_code=args.trust_remote_code)
    check_seq_len(args.seq_len, model, tokenizer)
    pack = PackConfig(seq_len=args.seq_len, pack=not args.no_pack)
    data = tokenize(tokenizer, examples, pack)
    warn_unfit_examples(data, args.seq_len)
    eval_data = None if eval_examples is None else tokenize(tokenizer, eval_examples, pack)
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
    run = _Run(args, console, prepared, tokenizer, data, eval_data, selection, resolved)
    return _train(run, device, status)


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


def _prepare(model: Any, args: argparse.Namespace, selection: Any, lora: Any) -> Any:
    import torch

    from kappatune.training.loop import prepare_model

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


@dataclass(frozen=True)
class _Run:
    """Everything a single-process training session works with."""

    args: argparse.Namespace
    console: Any
    prepared: Any
    tokenizer: Any
    data: Any
    eval_data: Any
    selection: Any
    resolved: dict[str, Any]


def _watch(run: _Run, model: Any, total: int, start: int) -> Any:
    from kappatune.cli.train_watch import open_watch
    from kappatune.training.loop import evaluate_loss

    evaluate = None
    if run.eval_data is not None:
        eval_data, batch = run.eval_data, run.args.batch_size

        def evaluate() -> float:
            return evaluate_loss(model, eval_data, batch_size=batch)

    return open_watch(
        run.args, total=total, start=start, evaluate=evaluate,
        print_line=_print_line, resolved=run.resolved,
    )  # fmt: skip


def _print_line(text: str) -> None:
    print(text, flush=True)  # plain and unwrapped, flushed at once for nohup and schedulers


def _train(run: _Run, device: Any, status: str) -> int:
    from kappatune.cli.train_watch import eval_summary
    from kappatune.jsonio import atomic_write_json
    from kappatune.training.loop import StopRule, train_loop

    args, prepared = run.args, run.prepared
    model = prepared.model.to(device)
    config = _train_config(args)
    total = config.total_steps(len(run.data))
    resume = _load_checkpoint(args.output, prepared, config, total) if status == "resume" else None
    start = announce_start(run.console, args, prepared, resume, total)
    watch = _watch(run, model, total, start)

    def on_step(state: Any) -> None:
        if state.step % args.checkpoint_every == 0 and state.step < total:
            _save_checkpoint(args.output, model, state)

    try:
        result = train_loop(
            model, run.data, config, StopRule(), param_groups=prepared.param_groups,
            resume=resume, on_step=on_step, device=device, observer=watch,
        )  # fmt: skip
    finally:
        watch.close()
    evals = eval_summary(watch)
    target = _finish_output(run, model, result, evals.get("final_eval_loss"))
    report = (
        result.to_json()
        | evals
        | {
            "method": args.method,
            "trainable_params": prepared.trainable_params,
            **unfit_counts(run.data),
        }
    )
    atomic_write_json(args.output / "result.json", report)
    shutil.rmtree(args.output / "checkpoint", ignore_errors=True)
    run.console.print(
        f"done: {result.steps} steps, final loss {result.final_loss:.4f},"
        f" {result.mean_step_time:.2f} s/step; saved to {args.output}"
    )
    from kappatune.cli.train_publish import push

    push(target, args, run.console)
    return 0


def _finish_output(run: _Run, model: Any, result: Any, final_eval: float | None) -> Path:
    """Save model/ or adapter/ (portable base name, dtype to keep) with its model card."""
    from kappatune.cli.train_publish import is_adapter, prepare_for_save, write_model_card

    args = run.args
    prepare_for_save(model, args)
    _save_final(args.output, args.method, model, run.tokenizer)
    target = args.output / ("adapter" if is_adapter(args.method) else "model")
    write_model_card(target, args, result, run.prepared, run.selection, final_eval)
    return target


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
