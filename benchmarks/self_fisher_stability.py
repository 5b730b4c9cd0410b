"""How stable is the self-Fisher ranking of Gemma 3 270M's matrices, and how many tokens does it need?

Self-Fisher (``kappatune.analysis.self_fisher``): sequences sampled from the model itself (BOS, then
temperature 1 over the whole vocabulary), true Fisher diagonal measured on them, mean per
parameter of each matrix. This script

1. measures a reference on ``--reference`` tokens (its own sampling seed);
2. for each seed in ``--seeds``, samples ``max(--sizes)`` tokens and measures the self-Fisher
   on growing prefixes of them (the sizes in ``--sizes``; a prefix's estimate is the
   token-weighted mean of the chunks it covers, each chunk with its own label seed);
3. reports the Spearman rank correlation of each (seed, size) ranking with the reference, and
   between seeds at each size; and the reference's rank correlation with kappa and with the
   Fisher of English prose and Python code measured by ``probe_gemma.py`` (if present).

Writes ``self_fisher_stability.{json,md}`` into ``benchmarks/results``. Usage::

    flock /tmp/kt-heavy.lock python benchmarks/self_fisher_stability.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kappatune.jsonio import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "gemma-3-270m"
THRESHOLD = 0.9  # mean Spearman with the reference a default size must reach


def _spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    from scipy.stats import spearmanr

    keys = sorted(set(a) & set(b))
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def _chunk_sums(
    model: Any, ids: torch.Tensor, seed: int
) -> tuple[dict[str, float], dict[str, int], int]:
    """Per-matrix Fisher sums (times tokens) and sizes of a chunk of sampled sequences."""
    from kappatune.analysis.fisher import FisherOptions, compute_fisher, examples_from_ids

    tokens = ids.shape[0] * (ids.shape[1] - 1)
    res = compute_fisher(
        model, examples_from_ids(ids), FisherOptions(kinds=("true",), tokens=tokens, seed=seed)
    )["true"]
    return {r.name: r.sum * tokens for r in res.rows}, {r.name: r.numel for r in res.rows}, tokens


def _means(sums: Mapping[str, float], numel: Mapping[str, int], tokens: int) -> dict[str, float]:
    return {n: s / tokens / numel[n] for n, s in sums.items()}


def _measure(
    model: Any, seqs: int, seq_len: int, seed: int, sizes: Sequence[int], batch: int
) -> tuple[dict[int, dict[str, float]], float]:
    """Self-Fisher means at each size (sequences), from one pool sampled with ``seed``."""
    from kappatune.analysis.self_fisher import bos_of, sample_sequences

    start = time.perf_counter()
    pool = sample_sequences(model, seqs, seq_len, bos=bos_of(model), seed=seed, batch_size=batch)
    out: dict[int, dict[str, float]] = {}
    total: dict[str, float] = {}
    tokens, lo = 0, 0
    for i, size in enumerate(sorted(sizes)):
        sums, numel, t = _chunk_sums(model, pool[lo:size], seed * 1000 + i)
        total = {n: total.get(n, 0.0) + v for n, v in sums.items()}
        tokens += t
        lo = size
        out[size] = _means(total, numel, tokens)
    return out, time.perf_counter() - start


def _probe_fisher(name: str) -> dict[str, float] | None:
    path = RESULTS / f"probe_gemma_{name}.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    return {r["name"]: float(r["fisher"]["true"]["mean"]) for r in report["rows"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=MODEL)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="sequences per estimate"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--reference", type=int, default=16, help="sequences of the reference")
    p.add_argument("--batch", type=int, default=4, help="sequences sampled together")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from kappatune.analysis.spectra import AnalyzeOptions, analyze
    from kappatune.training.models import load_causal_lm

    torch.set_grad_enabled(True)
    model, _ = load_causal_lm(args.model)
    per_tok = args.seq_len - 1
    ref_seed = 1000
    ref_runs, ref_s = _measure(
        model, args.reference, args.seq_len, ref_seed, [args.reference], args.batch
    )
    reference = ref_runs[args.reference]
    print(f"reference: {args.reference * per_tok} tokens, {ref_s:.0f} s", flush=True)
    runs: dict[int, dict[int, dict[str, float]]] = {}
    seconds = {}
    for seed in args.seeds:
        runs[seed], seconds[seed] = _measure(
            model, max(args.sizes), args.seq_len, seed, args.sizes, args.batch
        )
        print(f"seed {seed}: {seconds[seed]:.0f} s", flush=True)
    table = []
    for size in sorted(args.sizes):
        vs_ref = [_spearman(runs[s][size], reference) for s in args.seeds]
        pairs = [
            _spearman(runs[a][size], runs[b][size])
            for a, b in itertools.combinations(args.seeds, 2)
        ]
        table.append({
            "sequences": size, "tokens": size * per_tok,
            "spearman_vs_reference": vs_ref, "mean_vs_reference": sum(vs_ref) / len(vs_ref),
            "min_vs_reference": min(vs_ref),
            "spearman_between_seeds": pairs, "mean_between_seeds": sum(pairs) / max(1, len(pairs)),
        })  # fmt: skip
    ok = [r for r in table if r["min_vs_reference"] >= THRESHOLD]
    chosen = ok[0]["tokens"] if ok else None
    analysis = analyze(model, AnalyzeOptions(workers=1))
    kappa = {r.name: r.kappa for r in analysis.tensors}
    others = {"kappa": _spearman(reference, kappa)}
    for name in ("english", "code") if args.model == MODEL else ():
        f = _probe_fisher(name)
        if f is not None:
            others[f"{name} Fisher (probe_gemma)"] = _spearman(reference, f)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    info = {
        "command": command, "model": args.model, "seq_len": args.seq_len, "matrices": len(reference),
        "reference_tokens": args.reference * per_tok, "reference_seed": ref_seed,
        "reference_seconds": ref_s, "seeds": args.seeds, "seconds_per_seed": seconds,
        "threshold": THRESHOLD, "smallest_size_reaching_threshold_tokens": chosen,
        "rows": table, "reference_vs": others,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "reference": reference,
    }  # fmt: skip
    lines = [
        f"# Self-Fisher stability: {args.model}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['machine']}, CPU, shared. {len(reference)} matrices; sequences of"
        f" {args.seq_len} sampled from the model (BOS, temperature 1), true Fisher mean per"
        f" parameter. Reference: {args.reference * per_tok} tokens (sampling seed {ref_seed},"
        f" {ref_s:.0f} s). Seeds {', '.join(map(str, args.seeds))}: prefixes of one sample each.",
        "",
        "| tokens | Spearman vs reference (per seed) | mean | min | Spearman between seeds (mean) |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {r['tokens']} | {', '.join(f'{v:.3f}' for v in r['spearman_vs_reference'])} |"
            f" {r['mean_vs_reference']:.3f} | {r['min_vs_reference']:.3f} | {r['mean_between_seeds']:.3f} |"
            for r in table
        ),
        "",
        f"Smallest size whose every seed reaches Spearman >= {THRESHOLD} with the reference:"
        f" {chosen if chosen is not None else 'none of those measured'} tokens.",
        "",
        "The reference's Spearman rank correlation with:",
        "",
        *(f"- {k}: {v:+.3f}" for k, v in others.items()),
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "self_fisher_stability.md", md)
    atomic_write_text(
        args.out_dir / "self_fisher_stability.json", json.dumps(info, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
