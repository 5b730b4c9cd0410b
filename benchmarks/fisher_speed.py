"""How much faster is the batched per-example Fisher than one backward pass per sequence?

Loads Gemma 3 270M (float32), packs English prose from ``pydoc_data.topics`` (see
``probe_gemma.py``) into 128-token rows, and times :func:`kappatune.analysis.fisher.fisher_diagonals`
for both kinds (true and empirical, one forward shared) over the same tokens and seed:

* ``loop``: ``batch_size=1``, one forward and one backward pass per sequence and kind (the
  estimator before the batched one);
* ``batched``: ``batch_size=B`` sequences per pass, per-example gradients rebuilt from each
  linear layer's inputs and output gradients; the tied embedding and output head through
  :mod:`kappatune.analysis.fisher_rows` (embedding rows from a sparse backward, the head's
  squared gradient shared between label sets except on the rows where they differ).

For scale, ``plain`` times one ordinary training pass over the same sequences (forward, the
data's loss, backward into every weight), after a warm-up: the estimator cannot cost less than
one forward pass plus, per label set, the weight-gradient half of a backward pass, so the
``plain`` column says how far each route is from that floor.

With ``--profile N`` the batched route runs once more under ``torch.profiler`` (after the timed
runs, so it does not slow them) and the N operators with the most CPU time are written too.
The machine's load average is recorded at the start and the end: on a shared machine the
absolute seconds move with the load; the ratio of the two routes in the same run is the figure.

It checks that both give the same diagonals (largest relative difference per tensor) and
writes ``fisher_speed.{json,md}`` into ``benchmarks/results``. Usage::

    flock /tmp/kt-heavy.lock python benchmarks/fisher_speed.py --tokens 508 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kappatune.jsonio import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "gemma-3-270m"


def _english(path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe_gemma import english_records

    path.write_text("\n\n".join(english_records()), encoding="utf-8")
    return path


def _time(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _worst_rel(
    a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]
) -> float:
    worst = 0.0
    for kind, per in a.items():
        for name, x in per.items():
            y = b[kind][name]
            worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-30)))
    return worst


def _profile(fn: Any, top: int) -> list[dict[str, Any]]:
    """The ``top`` operators by self CPU time of one call of ``fn``: name, seconds, share, calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: (-e.self_cpu_time_total, e.key))
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "seconds": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:top]
    ]


def _plain_pass(model: Any, examples: list[dict[str, torch.Tensor]], tokens: int) -> float:
    """Seconds of one forward and backward pass (the data's loss) over the sequences the
    estimator uses, after one untimed warm-up pass."""
    from kappatune.analysis.fisher import CausalLMObjective, plan_examples

    used = [ex for ex, _ in plan_examples(examples, CausalLMObjective(), tokens)]
    ids = torch.cat([ex["input_ids"].reshape(1, -1) for ex in used])
    labels = torch.cat([ex["labels"].reshape(1, -1) for ex in used])
    mask = torch.cat([ex["attention_mask"].reshape(1, -1) for ex in used])

    def once() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    once()
    seconds, _ = _time(once)
    return seconds


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--tokens", type=int, default=508, help="predicted tokens (default: 508 = 4 x 127)"
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per batched pass (default: 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile the batched route: top N ops"
    )
    args = p.parse_args(argv)
    load_start = _load()

    from kappatune.analysis.fisher import FisherOptions, fisher_diagonals, load_model_and_examples

    with tempfile.TemporaryDirectory() as tmp:
        text = _english(Path(tmp) / "english.txt")
        load_s, (model, examples, _stats) = _time(
            lambda: load_model_and_examples(MODEL, [text], seq_len=args.seq_len)
        )
    opts = FisherOptions(kinds=("true", "empirical"), tokens=args.tokens, seed=args.seed)
    plain_s = _plain_pass(model, examples, args.tokens)
    print(f"plain pass: {plain_s:.1f} s", flush=True)
    rows = []
    results = {}
    for method, batch in (("batched", args.batch), ("loop", 1)):
        secs, diag = _time(lambda b=batch: fisher_diagonals(model, examples, opts, batch_size=b))
        results[method] = diag.tensors
        rows.append(
            {"method": method, "batch_size": batch, "seconds": secs, "examples": diag.examples}
        )
        print(f"{method}: {secs:.1f} s", flush=True)
    load_end = _load()
    profile = (
        _profile(
            lambda: fisher_diagonals(model, examples, opts, batch_size=args.batch), args.profile
        )
        if args.profile
        else []
    )
    loop_s = rows[1]["seconds"]
    for r in rows:
        r["speedup"] = loop_s / r["seconds"]
        r["plain_passes"] = r["seconds"] / plain_s
    worst = _worst_rel(results["loop"], results["batched"])
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    info = {
        "command": command,
        "model": MODEL,
        "matrices": len(next(iter(results["loop"].values()))),
        "tokens": args.tokens,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "kinds": list(opts.kinds),
        "load_seconds": load_s,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "max_rel_difference": worst,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "rows": rows,
        "plain_pass_seconds": plain_s,
        "profile_batched": profile,
    }
    lines = [
        f"# Fisher speed: {MODEL}, batched per-example gradients against one pass per sequence",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['machine']}, CPU, shared. {info['matrices']} matrices (embedding included),"
        f" {args.tokens} predicted tokens in {rows[0]['examples']} sequences of {args.seq_len},"
        " true + empirical Fisher, seed"
        f" {args.seed}.",
        "",
        "| method | sequences per pass | seconds | speed-up | in plain passes |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['method']} | {r['batch_size']} | {r['seconds']:.1f} | {r['speedup']:.2f}x"
            f" | {r['plain_passes']:.1f} |"
            for r in rows
        ),
        "",
        f"One plain training pass (forward, the data's loss, backward) over the same"
        f" {rows[0]['examples']} sequences: {plain_s:.1f} s.",
        "",
        f"Largest difference between the two diagonals, relative to each tensor's largest entry: {worst:.1e}.",
        "",
        f"Load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_end}"
        f" ({torch.get_num_threads()} threads; the machine was shared, so the seconds are slow"
        " and the ratio is the figure).",
        *_profile_lines(profile),
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "fisher_speed.md", md)
    atomic_write_text(args.out_dir / "fisher_speed.json", json.dumps(info, indent=2) + "\n")
    return 0


def _profile_lines(profile: list[dict[str, Any]]) -> list[str]:
    if not profile:
        return []
    return [
        "",
        f"Where the batched route spends its time (torch.profiler, top {len(profile)} operators"
        " by self CPU time, one more batched run):",
        "",
        "| operator | seconds | share | calls |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['op']} | {r['seconds']:.1f} | {100 * r['share']:.1f}% | {r['calls']} |"
            for r in profile
        ),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
