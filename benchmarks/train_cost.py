"""Step time and peak memory of fine-tuning Gemma 3 270M: full, selective, LoRA, KappaTune-LoRA.

Every arm trains on the same batch (English prose from ``pydoc_data.topics``, packed with
BOS first) with AdamW, in its own child process, so the memory figures do not mix:

* ``full``: every parameter trains;
* ``selective``: KappaTune, the lowest-kappa matrices of the decoder layers up to the
  parameter budget (by default the one LoRA uses), everything else frozen;
* ``lora``: LoRA rank ``--lora-r`` on every linear layer of the decoder (PEFT ``all-linear``);
* ``kappa-lora``: LoRA on the lowest-kappa 20% of the decoder's linear layers, rank fitted to
  the same parameter budget as ``lora``.

Peak memory is the kernel's high-water mark of resident memory (``VmHWM``), reset with
``/proc/self/clear_refs`` after the model is loaded and every weight paged in (transformers
memory-maps safetensors), so "training peak" covers the training steps with the weights
resident, loading transients excluded; "above weights" is that peak minus the resident size
before training (gradients, optimizer state, activations, logits); "runtime" is the resident
size before training minus the model's parameters and buffers. ``ru_maxrss`` of the whole
child is reported in the JSON too. Optimizer state is counted from the optimizer's tensors.

    nice -n 10 python benchmarks/train_cost.py [--batch 2] [--seq-len 64] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
MODEL = "gemma-3-270m"
ARMS = ("full", "selective", "lora", "kappa-lora")


# --------------------------------------------------------------------------- child side


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _batch(tokenizer: Any, batch: int, seq_len: int) -> Any:
    import pydoc_data.topics

    from kappatune.training.data import pack_texts

    topics = pydoc_data.topics.topics
    texts = [topics[k] for k in sorted(topics)[:40]]
    data = pack_texts(tokenizer, texts, seq_len=seq_len)
    if len(data) < batch:
        raise SystemExit(f"not enough text for a batch of {batch} x {seq_len}")
    return data.subset(list(range(batch)))


def _lora_budget(model: Any, r: int) -> int:
    from kappatune.integrations.lora import all_linear_targets, lora_param_count

    return lora_param_count(model, all_linear_targets(model), r)


def _prepare(arm: str, model: Any, args: argparse.Namespace) -> Any:
    from kappatune.analysis.spectra import analyze
    from kappatune.selection.budget import Budget, SelectOptions
    from kappatune.selection.core import select
    from kappatune.training.loop import LoraSettings, prepare_model
    from kappatune.training.models import analysis_source

    budget = args.budget or _lora_budget(model, args.lora_r)
    layers_only = SelectOptions(include=r"\.layers\.")
    if arm == "full":
        return prepare_model(model, "full"), budget
    if arm == "lora":
        return prepare_model(model, "lora", lora=LoraSettings(r=args.lora_r)), budget
    analysis = analyze(analysis_source(MODEL))
    if arm == "selective":
        sel = select(analysis, "lowest-kappa", Budget(params=budget), layers_only)
        return prepare_model(model, "selective", sel), budget
    sel = select(analysis, "lowest-kappa", Budget(fraction=0.2), layers_only)
    return prepare_model(
        model, "kappa-lora", sel, LoraSettings(r=None, budget_params=budget)
    ), budget


def _touch(model: Any) -> None:
    """Page in every weight: transformers memory-maps safetensors, so weights the forward pass has
    not read yet are not resident, and would otherwise count as training memory."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            float(p.sum())


def _optimizer_bytes(optimizer: Any) -> int:
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if hasattr(v, "numel"):
                total += v.numel() * v.element_size()
    return total


def child(arm: str, args: argparse.Namespace, out: Path) -> None:
    import torch

    from kappatune.training.loop import TrainConfig, train_loop
    from kappatune.training.models import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(MODEL)
    data = _batch(tokenizer, args.batch, args.seq_len)
    model_params = sum(p.numel() for p in model.parameters())
    prepared, budget = _prepare(arm, model, args)
    _touch(prepared.model)
    rss_loaded = _status_kb("VmRSS")
    own = [*prepared.model.parameters(), *prepared.model.buffers()]
    weights_mb = sum(t.numel() * t.element_size() for t in own) / 2**20
    reset = _reset_peak()
    seen: dict[str, Any] = {}

    def on_step(state: Any) -> None:
        seen["optimizer_bytes"] = _optimizer_bytes(state.optimizer)

    config = TrainConfig(steps=args.steps + 1, lr=1e-5, batch_size=args.batch, shuffle=False)
    result = train_loop(
        prepared.model, data, config, param_groups=prepared.param_groups, on_step=on_step
    )
    record = {
        "arm": arm,
        "trainable_params": prepared.trainable_params,
        "lora_r": prepared.lora_r,
        "budget_params": budget,
        "model_params": model_params,
        "tensors_trained": sum(len(g["params"]) for g in prepared.param_groups),
        "step_times_s": list(
            result.step_times[1:]
        ),  # the first step (allocation, warm-up) is left out
        "first_step_s": result.step_times[0],
        "losses": list(result.losses),
        "rss_after_load_mb": rss_loaded / 1024,
        "weights_mb": weights_mb,  # parameters and buffers
        "runtime_mb": rss_loaded / 1024 - weights_mb,  # the process besides the model
        "training_peak_rss_mb": _status_kb("VmHWM") / 1024 if reset else None,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer_state_mb": seen.get("optimizer_bytes", 0) / 2**20,
    }
    out.write_text(json.dumps(record, indent=2))


# --------------------------------------------------------------------------- parent side


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def run_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{arm}.json"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            arm,
            "--child-out",
            str(out),
            *_shared_flags(args),
        ]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
        record: dict[str, Any] = json.loads(out.read_text())
    record["wall_s"] = time.perf_counter() - started
    record["median_step_s"] = _median(record["step_times_s"])
    return record


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    flags += ["--lora-r", str(args.lora_r)]
    if args.budget:
        flags += ["--budget", str(args.budget)]
    return flags


def _table(records: list[dict[str, Any]]) -> list[str]:
    full = next(r for r in records if r["arm"] == "full")
    lines = [
        "| arm | trainable params | tensors | median step (s) | x full | training peak RSS (MB) | x full |"
        " above weights (MB) | optimizer state (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        peak = r["training_peak_rss_mb"]
        full_peak = full["training_peak_rss_mb"]
        above = None if peak is None else peak - r["rss_after_load_mb"]
        rank = f" (r={r['lora_r']})" if r["lora_r"] else ""
        lines.append(
            f"| {r['arm']}{rank} | {r['trainable_params']:,} | {r['tensors_trained']} |"
            f" {r['median_step_s']:.2f} | {r['median_step_s'] / full['median_step_s']:.2f} |"
            f" {peak:,.0f} | {peak / full_peak:.2f} | {above:,.0f} | {r['optimizer_state_mb']:,.1f} |"
            if peak is not None and full_peak
            else f"| {r['arm']}{rank} | {r['trainable_params']:,} | {r['tensors_trained']} |"
            f" {r['median_step_s']:.2f} | {r['median_step_s'] / full['median_step_s']:.2f} | n/a | n/a | n/a |"
            f" {r['optimizer_state_mb']:,.1f} |"
        )
    return lines


def _environment() -> dict[str, Any]:
    import torch

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="measured steps (one more runs first)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument(
        "--budget", type=int, help="parameter budget (default: LoRA's on all linear layers)"
    )
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args, args.child_out)
        return 0
    if "full" not in args.arms:
        args.arms = ["full", *args.arms]
    command = "python benchmarks/train_cost.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    records = []
    for arm in args.arms:
        print(f"running {arm} ...", flush=True)
        records.append(run_arm(arm, args))
    lines = _table(records)
    print("\n".join(lines))
    if args.no_write:
        return 0
    env = _environment()
    env["load_average_at_start"] = load_at_start
    payload = {"command": command.strip(), "model": MODEL, "batch": args.batch, "seq_len": args.seq_len,
               "measured_steps": args.steps, "environment": env, "arms": records}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_cost.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = [
        "# Training cost on Gemma 3 270M (CPU)",
        "",
        f"Command: `{command.strip()}` ({env['date']}, torch {env['torch']}, {env['cpus']} CPUs,"
        f" {env['torch_threads']} torch threads; load average {env['load_average_at_start'][0]} at the"
        f" start, {env['load_average_1m_5m_15m'][0]} at the end: the machine is shared, so step times"
        " are noisy; memory figures are not).",
        "",
        f"Same batch for every arm: {args.batch} x {args.seq_len} tokens of `pydoc_data.topics` prose"
        f" (BOS first), AdamW, {args.steps} measured steps after one unmeasured step; each arm in"
        " its own process. Training peak RSS: VmHWM reset after loading and paging in every weight,"
        " read after the steps (weights included); above weights: that peak minus the resident size"
        " before training. Optimizer state: bytes of the AdamW state tensors.",
        "",
        *lines,
        "",
    ]
    (RESULTS / "train_cost.md").write_text("\n".join(md))
    print(f"wrote {RESULTS / 'train_cost.md'} and {RESULTS / 'train_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
