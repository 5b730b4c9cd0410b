"""``kappatune analyze SOURCE``: exact per-tensor spectra of a checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kappatune.cli.command import add_command
from kappatune.cli.console import wide_console
from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from rich.console import Console

    from kappatune.analysis.spectra import Analysis, AnalyzeOptions, ProgressHook, SpectrumRow

EPILOG = """examples:
  kappatune analyze gemma-3-270m
  kappatune analyze model.safetensors --output spectra.json --csv spectra.csv --plot kappa.png
  kappatune analyze ./checkpoint-dir --include 'layers\\.(1[0-9])\\.' --exclude embed --workers 2
  kappatune analyze Qwen/Qwen2.5-0.5B --device cuda     # a model in the local HF cache
  torchrun --nproc-per-node 2 -m kappatune.cli.main analyze ./ckpt -o spectra.json  # sharded
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "analyze",
        help="per-tensor condition numbers and spectral metrics of a checkpoint",
        description="Exact per-tensor spectra (kappa, sigma_max/min, log-volume, entropy deficit, "
        "stable and effective rank), streamed tensor by tensor from the checkpoint files.",
        epilog=EPILOG,
    )
    p.add_argument(
        "source",
        help="safetensors/GGUF/.bin file, checkpoint directory, built-in name "
        "(gemma-3-270m, all-minilm-l6-v2) or Hugging Face id in the local cache",
    )
    p.add_argument("--output", "-o", type=Path, help="write the analysis JSON here")
    p.add_argument("--csv", type=Path, help="write one CSV row per matrix here")
    p.add_argument("--plot", type=Path, help="write a PNG of kappa over layer x module type here")
    from kappatune.analysis.options import AnalyzeOptions
    from kappatune.settings import add_flags

    add_flags(p, AnalyzeOptions)
    p.add_argument(
        "--top", type=int, default=10, help="rows in the lowest/highest tables (default: 10)"
    )
    p.set_defaults(run=run)


def _check_outputs(args: argparse.Namespace) -> None:
    from kappatune.outputs import check_file

    check_file(args.output, "--output", (".json",))
    check_file(args.csv, "--csv", (".csv",))
    check_file(args.plot, "--plot", (".png",))


def _write_outputs(args: argparse.Namespace, analysis: Analysis) -> None:
    """The JSON, CSV and PNG asked for: all of them, or none when one cannot be written."""
    from kappatune.analysis import report
    from kappatune.jsonio import json_bytes
    from kappatune.outputs import write_all

    files: list[tuple[Path, bytes]] = []
    if args.output:
        files.append((args.output, json_bytes(analysis.to_json())))
    if args.csv:
        files.append((args.csv, report.to_csv(analysis).encode("utf-8")))
    if args.plot:
        files.append((args.plot, report.plot_png(analysis)))
    write_all(files)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kappatune.analysis.spectra import AnalyzeOptions, analyze
    from kappatune.settings import from_args

    _check_outputs(args)
    if args.top < 0:
        raise KappaTuneError(f"--top must be at least 0, got {args.top}")
    options = from_args(AnalyzeOptions, args)
    from kappatune.analysis.sharded import launched_world

    world = launched_world()
    is_main = world is None or world[0] == 0
    bar = tqdm(unit="tensor", desc="analyzing", disable=None if is_main else True, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    start = time.perf_counter()
    try:
        if world is None:
            analysis = analyze(args.source, options, progress=progress)
        else:
            sharded = _analyze_sharded(args.source, options, progress)
            if sharded is None:  # not rank 0: rank 0 reports and writes
                return 0
            analysis = sharded
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    if not analysis.tensors:
        reasons = (
            "; ".join(f"{n} {r}" for r, n, _ in _skips(analysis)) or "the source has no tensors"
        )
        raise KappaTuneError(f"no candidate matrices in {analysis.source} ({reasons})")
    console = wide_console()
    _print_report(console, analysis, elapsed, args.top)
    _write_outputs(args, analysis)
    for flag, path in (("JSON", args.output), ("CSV", args.csv), ("plot", args.plot)):
        if path:
            console.print(f"wrote {flag}: {path}")
    return 0


def _analyze_sharded(
    source: str, options: AnalyzeOptions, progress: ProgressHook
) -> Analysis | None:
    import torch.distributed as dist

    from kappatune.analysis.sharded import analyze_sharded

    try:
        return analyze_sharded(source, options, progress=progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _skips(analysis: Analysis) -> list[tuple[str, int, list[str]]]:
    from kappatune.analysis.report import skip_summary

    return skip_summary(analysis)


def _print_report(console: Console, analysis: Analysis, elapsed: float, top: int) -> None:
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from kappatune.analysis.report import format_kappa, kappa_order, module_summary
    from kappatune.printable import printable

    rows = kappa_order(analysis.tensors)
    methods = sorted({r.method for r in rows})
    console.print(
        f"[bold]{escape(printable(analysis.source))}[/bold]  fingerprint {analysis.fingerprint[:16]}  "
        f"{len(rows)} matrices, {len(analysis.skipped)} tensors skipped, "
        f"{elapsed:.2f} s ({', '.join(methods)})"
    )

    def table(title: str, subset: list[SpectrumRow]) -> Table:
        t = Table(title=title, title_justify="left")
        for col in ("name", "expert", "shape", "kappa", "sigma_max", "sigma_min", "eff. rank"):
            t.add_column(col, justify="left" if col == "name" else "right")
        for r in subset:
            t.add_row(
                Text(printable(r.name)),
                "" if r.expert is None else str(r.expert),
                "x".join(map(str, r.shape)),
                format_kappa(r.kappa),
                f"{r.sigma_max:.4g}",
                f"{r.sigma_min:.4g}",
                "-" if r.kappa_only else f"{r.effective_rank:.1f}",
            )
        return t

    if top:
        console.print(table(f"lowest kappa (first {min(top, len(rows))})", rows[:top]))
        console.print(table(f"highest kappa (last {min(top, len(rows))})", rows[::-1][:top]))
    t = Table(title="by module type", title_justify="left")
    for col in ("module type", "matrices", "params", "kappa min", "median", "max"):
        t.add_column(col, justify="left" if col == "module type" else "right")
    for s in module_summary(analysis):
        t.add_row(
            Text(printable(s.module_type)),
            str(s.count),
            f"{s.params:,}",
            format_kappa(s.kappa_min),
            format_kappa(s.kappa_median),
            format_kappa(s.kappa_max),
        )
    console.print(t)
    skips = _skips(analysis)
    if skips:
        t = Table(title="skipped", title_justify="left")
        for col in ("reason", "tensors", "examples"):
            t.add_column(col, justify="right" if col == "tensors" else "left")
        for reason, n, examples in skips:
            t.add_row(Text(printable(reason)), str(n), Text(printable(", ".join(examples))))
        console.print(t)
