"""Time kappatune's analysis against PEFT's helper and the author's full SVD, on the same matrices.

All arms see the same dequantized matrices, already in memory (loading is not timed).
Each is checked against a float64 LAPACK SVD of the same matrix. On CPU a fourth row times the
bare numerical route (float64 syrk + eigvalsh in worker threads, nothing else): how close
kappatune's full analysis (all metrics, digests, checks) comes to its own floor. The
kappa-only arm is what ``select`` and ``train`` run (kappa, sigma_max, sigma_min only).

    python benchmarks/analyze_speed.py [--source gemma-3-270m] [--include REGEX] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kappatune import AnalyzeOptions, analyze
from kappatune.analysis.linalg import reference_svdvals
from kappatune.analysis.sources import open_source
from kappatune.analysis.torch_source import StateDictSource

RESULTS = Path(__file__).parent / "results"
GRAM_ONLY = "bare float64 Gram alone (the floor of any Gram route)"


def load_matrices(source: str, include: str) -> dict[str, torch.Tensor]:
    import re

    src = open_source(source)
    out = {}
    for e in src.entries():
        if len(e.shape) == 2 and re.search(include, e.name):
            out[e.name] = src.read(e)[0].float()
    return out


def as_linear_model(mats: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = torch.nn.Module()
    for i, (name, w) in enumerate(mats.items()):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        model.add_module(f"m{i:04d}_{name.replace('.', '_')}", lin)
    return model


def _err(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def best_of(fn: Callable[[], dict[str, float]], repeat: int) -> tuple[float, dict[str, float]]:
    times, out = [], {}
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--source", default="gemma-3-270m")
    ap.add_argument(
        "--include",
        default=r"^model\.layers\.",
        help="which 2-D tensors (default: the layers' linear weights)",
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", type=Path, default=RESULTS / "analyze_speed")
    args = ap.parse_args()

    mats = load_matrices(args.source, args.include)
    names = list(mats)
    print(f"{len(mats)} matrices from {args.source}", file=sys.stderr)
    ref = {n: (lambda s: s[0] / s[-1])(reference_svdvals(w)) for n, w in mats.items()}
    model = as_linear_model(mats)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")

    def run_kappatune() -> dict[str, float]:
        a = analyze(
            StateDictSource(mats),
            AnalyzeOptions(use_cache=False, workers=args.workers, device=args.device),
        )
        return {r.name: r.kappa for r in a.tensors}

    def run_kappa_only() -> dict[str, float]:
        a = analyze(
            StateDictSource(mats),
            AnalyzeOptions(
                use_cache=False, workers=args.workers, device=args.device, kappa_only=True
            ),
        )
        return {r.name: r.kappa for r in a.tensors}

    def run_peft() -> dict[str, float]:
        from peft.helpers import KappaTuneSelector

        sel = KappaTuneSelector(model.to(device), show_progress=False)
        sel._compute_kappas()
        assert sel._condition_numbers is not None
        by_module = dict(sel._condition_numbers)
        return {n: by_module[f"m{i:04d}_{n.replace('.', '_')}"] for i, n in enumerate(names)}

    def run_author() -> dict[str, float]:
        out = {}
        for n, w in mats.items():
            _, s, _ = torch.linalg.svd(w.to(device).float(), full_matrices=False)
            out[n] = float(s[0] / (s[-1] + 1e-8))
        return out

    def bare(solve: Callable[[Any], float]) -> dict[str, float]:
        """float64 Gram of each matrix, then ``solve``; no cache, digests, metrics or checks."""
        from threadpoolctl import threadpool_limits

        def one(w: torch.Tensor) -> float:
            b = (w if w.shape[0] >= w.shape[1] else w.T).double().numpy()
            return solve(b.T @ b)

        workers = args.workers or min(4, os.cpu_count() or 1)
        with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=workers) as pool:
            return dict(zip(names, pool.map(one, mats.values()), strict=True))

    def run_floor() -> dict[str, float]:
        """The bare float64 Gram + eigvalsh route."""

        def solve(g: Any) -> float:
            e = np.linalg.eigvalsh(g)
            return math.sqrt(e[-1] / e[0])

        return bare(solve)

    def run_gram_only() -> dict[str, float]:
        """The float64 Gram alone (kappa from its diagonal's extremes, a stand-in: this row's
        error column means nothing): what every route built on the Gram costs at least."""

        def solve(g: Any) -> float:
            d = np.diagonal(g)
            return math.sqrt(float(d.max()) / float(d.min()))

        return bare(solve)

    arms = {
        "kappatune": run_kappatune,
        "kappatune --kappa-only (what select and train run)": run_kappa_only,
        "peft find_kappa_target_modules": run_peft,
        "full torch.linalg.svd (author)": run_author,
    }
    if args.device == "cpu":
        arms["bare float64 Gram + eigvalsh (this route's floor)"] = run_floor
        arms[GRAM_ONLY] = run_gram_only
    rows = []
    for label, fn in arms.items():
        seconds, kappas = best_of(fn, args.repeat)
        err = None if label == GRAM_ONLY else max(abs(kappas[n] - ref[n]) / ref[n] for n in names)
        rows.append({"method": label, "seconds": seconds, "max_rel_kappa_error": err})
        print(f"{label}: {seconds:.3f} s, max rel err {_err(err)}", file=sys.stderr)
    base = rows[0]["seconds"]
    for r in rows:
        r["time_vs_kappatune"] = r["seconds"] / base

    table = Table(title=f"kappa of {len(mats)} matrices from {args.source} (best of {args.repeat})")
    for col in ("method", "seconds", "x kappatune time", "max rel. kappa error vs float64 SVD"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['seconds']:.3f}",
            f"{r['time_vs_kappatune']:.2f}",
            _err(r["max_rel_kappa_error"]),
        )
    console = Console(width=120)
    console.print(table)

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = {
        "load_average_after": list(os.getloadavg()),
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"),
        "matrices": len(mats),
        "source": args.source,
        "include": args.include,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    md = [
        f"# Analysis speed: {args.source}, {len(mats)} matrices",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {meta['machine']}; date {meta['date']}",
        "",
        "| method | seconds | time / kappatune | max rel. kappa error vs float64 SVD |",
        "|---|---:|---:|---:|",
    ]
    md += [
        f"| {r['method']} | {r['seconds']:.3f} | {r['time_vs_kappatune']:.2f} | {_err(r['max_rel_kappa_error'])} |"
        for r in rows
    ]
    secs = {r["method"]: r["seconds"] for r in rows}
    peft = secs["peft find_kappa_target_modules"]
    md += ["", f"PEFT time / kappatune time: {peft / base:.2f}x (full metrics)"]
    md += [
        f"PEFT time / kappa-only time: {peft / secs[label]:.2f}x"
        for label in secs
        if "kappa-only" in label
    ]
    if GRAM_ONLY in secs:
        md += [
            f"PEFT time / Gram-alone time: {peft / secs[GRAM_ONLY]:.2f}x (the most any route"
            " that forms the float64 Gram can reach)"
        ]
    meta["peft_speedup"] = {label: peft / t for label, t in secs.items()}
    args.output.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    args.output.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0 if all(math.isfinite(r["seconds"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
