"""Speed-up of sharded analysis: one process against ``torchrun`` with several, end to end.

Each configuration runs ``kappatune analyze SOURCE --no-cache`` as its own command (process
start-up, reading and dequantizing the checkpoint included) and writes its JSON; the JSON
files must hold the same rows. Best of ``--repeat`` wall times.

    python benchmarks/analyze_sharded.py [--source gemma-3-270m] [--nproc 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"


def _configs(nproc: int) -> list[tuple[str, list[str]]]:
    cli = [sys.executable, "-m", "kappatune.cli.main"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [
        ("1 process, 1 worker", [*cli, "analyze", "{src}", "--workers", "1"]),
        (f"1 process, {nproc} worker threads", [*cli, "analyze", "{src}", "--workers", str(nproc)]),
        (
            f"torchrun, {nproc} processes x 1 worker",
            [
                *run,
                f"--nproc-per-node={nproc}",
                "-m",
                "kappatune.cli.main",
                "analyze",
                "{src}",
                "--workers",
                "1",
            ],
        ),
    ]


def _rows(path: Path) -> list[tuple[str, object]]:
    doc = json.loads(path.read_text())
    return [(t["name"], t["kappa"]) for t in doc["tensors"]]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--source", default="gemma-3-270m")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--output", type=Path, default=RESULTS / "analyze_sharded")
    args = ap.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS="1")
    results = []
    reference: list[tuple[str, object]] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for label, template in _configs(args.nproc):
            best = float("inf")
            for i in range(args.repeat):
                out = Path(tmp) / f"{len(results)}-{i}.json"
                cmd = [a.replace("{src}", args.source) for a in template]
                cmd += ["--no-cache", "--output", str(out)]
                start = time.perf_counter()
                subprocess.run(cmd, check=True, env=env, capture_output=True)
                best = min(best, time.perf_counter() - start)
                rows = _rows(out)
                reference = reference or rows
                if rows != reference:
                    raise SystemExit(f"{label}: the JSON differs from the single-process one")
            results.append({"configuration": label, "seconds": best})
            print(f"{label}: {best:.2f} s", file=sys.stderr)
    base = results[0]["seconds"]
    for r in results:
        r["speedup"] = base / r["seconds"]

    table = Table(title=f"kappatune analyze {args.source} --no-cache (best of {args.repeat})")
    for col in ("configuration", "seconds", "speed-up"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in results:
        table.add_row(r["configuration"], f"{r['seconds']:.2f}", f"{r['speedup']:.2f}")
    Console(width=100).print(table)

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "source": args.source,
        "tensors": len(reference or []),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    md = [
        f"# Sharded analysis: {args.source}, {meta['tensors']} matrices",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {meta['machine']}; date {meta['date']}. Wall time of the whole command"
        " (start-up, reading and dequantizing included); every configuration wrote the same JSON.",
        "",
        "| configuration | seconds | speed-up |",
        "|---|---:|---:|",
        *[f"| {r['configuration']} | {r['seconds']:.2f} | {r['speedup']:.2f} |" for r in results],
    ]
    args.output.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
