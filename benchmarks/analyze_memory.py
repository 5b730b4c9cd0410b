"""Peak resident memory of `kappatune analyze` on a 2 GB safetensors checkpoint.

Writes a synthetic sharded bf16 checkpoint (a 512 MB embedding-like tall matrix plus
transformer-shaped layers, about 2 GB in all) to a temporary directory, then runs
`kappatune analyze DIR --no-cache` in a child process and reads its peak RSS.

    python benchmarks/analyze_memory.py [--gigabytes 2.0] [--workers 0]
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

RESULTS = Path(__file__).parent / "results"


def write_checkpoint(root: Path, gigabytes: float, hidden: int = 1024, inter: int = 4096) -> int:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    vocab = 262144
    layer_bytes = 2 * (4 * hidden * hidden + 3 * inter * hidden)
    embed_bytes = 2 * vocab * hidden
    n_layers = max(1, int((gigabytes * 1024**3 - embed_bytes) // layer_bytes))
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=g).to(
        torch.bfloat16
    )
    for i in range(n_layers):
        shard = shards[0] if i < n_layers // 3 else shards[1]
        p = f"model.layers.{i}"
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shard[f"{p}.self_attn.{m}.weight"] = torch.randn(hidden, hidden, generator=g).to(
                torch.bfloat16
            )
        shard[f"{p}.mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g).to(
            torch.bfloat16
        )
        shard[f"{p}.mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g).to(
            torch.bfloat16
        )
        shard[f"{p}.mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g).to(
            torch.bfloat16
        )
        shard[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-00002.safetensors"
        save_file(shard, root / name)
        weight_map.update(dict.fromkeys(shard, name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(f.stat().st_size for f in root.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gigabytes", type=float, default=2.0)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--output", type=Path, default=RESULTS / "analyze_memory")
    ap.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_only:  # in a child process, so the measuring parent stays small
        write_checkpoint(args.write_only, args.gigabytes)
        return 0
    with tempfile.TemporaryDirectory(prefix="kappatune-mem-") as tmp:
        subprocess.run(
            [sys.executable, __file__, "--gigabytes", str(args.gigabytes), "--write-only", tmp],
            check=True,
        )
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        cmd = [
            sys.executable,
            "-m",
            "kappatune.cli.main",
            "analyze",
            tmp,
            "--no-cache",
            "--top",
            "0",
            "--workers",
            str(args.workers),
        ]
        # The parent never imports torch, so the child's pre-exec size stays far below its peak;
        # wait4 gives this child's own rusage (not the checkpoint writer's).
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        peak_mb = usage.ru_maxrss / 1024
    if proc.returncode != 0:
        print(stderr, file=sys.stderr)
        return proc.returncode
    summary = stdout.strip().splitlines()[0]
    print(summary)
    print(f"checkpoint {size / 1024**3:.2f} GiB, peak RSS {peak_mb:.0f} MiB, {seconds:.1f} s")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    result = {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
        "checkpoint_bytes": size,
        "peak_rss_mib": round(peak_mb, 1),
        "seconds": round(seconds, 2),
        "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(
        f"# Analysis memory\n\nCommand: `{command}`\n\nMachine: {result['machine']}; date {result['date']}\n\n"
        f"| checkpoint | peak RSS | time |\n|---:|---:|---:|\n"
        f"| {size / 1024**3:.2f} GiB ({summary.split('  ')[-1]}) | {peak_mb:.0f} MiB | {seconds:.1f} s |\n"
    )
    return 0 if peak_mb < 1024 else 1


if __name__ == "__main__":
    raise SystemExit(main())
