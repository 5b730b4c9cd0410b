"""``kappatune probe MODEL --data FILE...``: Fisher information in the weights against kappa.

Parses the flags, calls :func:`kappatune.probe.run.run_probe` (the probe itself, as a library) and
prints its report. Everything is computed and rendered before any file is written.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kappatune.cli.command import add_command
from kappatune.errors import KappaTuneError
from kappatune.probe.run import MEASURES

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from kappatune.probe.run import ProbeProgress, ProbeReport, ProbeRow, ProbeSettings

EPILOG = """examples:
  kappatune probe gemma-3-270m --data notes.txt --tokens 2048 --seq-len 128
  kappatune probe ./checkpoint --data a.txt b.jsonl --kind both --output probe.json --csv probe.csv --plot probe.png
  kappatune probe gemma-3-270m --data code.txt --kind empirical --lambda 1e-6 --bootstrap 2000 --seed 1

Positive correlations mean that tensors with a higher condition number also carry more
Fisher information (the premise of KappaTune); values near 0 mean kappa says little about it.
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "probe",
        help="Fisher information in the weights against kappa, with rank correlations",
        description="Diagonal Fisher information per tensor from a data sample, next to kappa, "
        "with Spearman/Kendall rank correlations (bootstrap intervals) over all tensors and per "
        "module type.",
        epilog=EPILOG,
    )
    p.add_argument(
        "model",
        help="causal LM: built-in name (gemma-3-270m), .gguf file, model directory or HF id",
    )
    p.add_argument(
        "--data", nargs="+", required=True, type=Path, metavar="FILE",
        help="text (.txt, one document per file) or JSONL (a 'text' field per line) files",
    )  # fmt: skip
    from kappatune.probe.run import ProbeSettings
    from kappatune.settings import add_flags

    add_flags(p, ProbeSettings)
    p.add_argument("--output", "-o", type=Path, help="write the probe JSON here")
    p.add_argument("--csv", type=Path, help="write one CSV row per tensor here")
    p.add_argument(
        "--plot", type=Path, help="write a scatter plot (PNG) of Fisher against kappa here"
    )
    p.add_argument(
        "--top",
        type=int,
        default=10,
        help="tensors listed per end of the kappa order (default: 10)",
    )
    p.set_defaults(run=run)


# --------------------------------------------------------------------------- flags


def _settings(args: argparse.Namespace) -> ProbeSettings:
    from kappatune.probe.run import ProbeSettings
    from kappatune.settings import from_args

    return from_args(ProbeSettings, args)


def _check_output(path: Path | None, flag: str, suffix: str) -> None:
    from kappatune.outputs import check_file

    check_file(path, flag, (suffix,))


# --------------------------------------------------------------------------- console


def _fmt(x: float | str | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:+.{digits}f}"


def _ci(c: Mapping[str, Any]) -> str:
    if c["estimate"] is None:
        return "-"
    if c["ci_low"] is None:
        return _fmt(c["estimate"], 2)
    return f"{_fmt(c['estimate'], 2)} \\[{_fmt(c['ci_low'], 2)},{_fmt(c['ci_high'], 2)}]"


def _print_rows(console: Console, rows: Sequence[ProbeRow], kinds: Sequence[str], top: int) -> None:
    from rich.table import Table
    from rich.text import Text

    from kappatune.analysis.report import format_kappa
    from kappatune.printable import printable

    ordered = sorted(
        rows,
        key=lambda r: (r.kappa if not math.isnan(r.kappa) else math.inf, r.name, r.expert or -1),
    )
    shown = ordered if len(ordered) <= 2 * top else ordered[:top] + ordered[-top:]
    t = Table(
        title=f"kappa and Fisher per tensor ({len(shown)} of {len(rows)}, kappa order)",
        title_justify="left",
    )
    t.add_column("name")
    t.add_column("expert", justify="right")
    t.add_column("kappa", justify="right")
    for k in kinds:
        t.add_column(f"{k} mean", justify="right")
        t.add_column(f"{k} logvol", justify="right")
    for i, r in enumerate(shown):
        if len(shown) < len(ordered) and i == top:
            t.add_row("...", "", "", *([""] * (2 * len(kinds))))
        cells = [
            c for k in kinds for c in (f"{r.fisher[k]['mean']:.3e}", f"{r.fisher[k]['logvol']:.4g}")
        ]
        t.add_row(
            Text(printable(r.name)),
            "" if r.expert is None else str(r.expert),
            format_kappa(r.kappa),
            *cells,
        )
    console.print(t)


def _print_correlations(
    console: Console, correlations: list[dict[str, Any]], kinds: Sequence[str]
) -> None:
    from rich.table import Table

    for kind in kinds:
        t = Table(
            title=f"rank correlation of kappa with {kind} Fisher: estimate \\[bootstrap CI]",
            title_justify="left",
        )
        t.add_column("group")
        t.add_column("n", justify="right")
        for m in MEASURES:
            t.add_column(f"{m}: Spearman", justify="right")
            t.add_column(f"{m}: Kendall", justify="right")
        groups = list(dict.fromkeys(c["group"] for c in correlations if c["kind"] == kind))
        for g in groups:
            cells = {
                (c["measure"], c["method"]): c
                for c in correlations
                if c["kind"] == kind and c["group"] == g
            }
            n = cells[("mean", "spearman")]["n"]
            t.add_row(
                g, str(n),
                *[_ci(cells[(m, meth)]) for m in MEASURES for meth in ("spearman", "kendall")],
            )  # fmt: skip
        console.print(t)


def _print_spectral(console: Console, correlations: list[dict[str, Any]]) -> None:
    from rich.table import Table

    t = Table(
        title="is spectral selection one signal? Spearman \\[bootstrap CI] between the scores",
        title_justify="left",
    )
    t.add_column("group")
    t.add_column("n", justify="right")
    pairs = list(dict.fromkeys((c["x"], c["y"]) for c in correlations))
    for x, y in pairs:
        t.add_column(f"{x} ~ {y}", justify="right")
    for g in dict.fromkeys(c["group"] for c in correlations):
        cells = {
            (c["x"], c["y"]): c
            for c in correlations
            if c["group"] == g and c["method"] == "spearman"
        }
        t.add_row(g, str(cells[pairs[0]]["n"]), *[_ci(cells[p]) for p in pairs])
    console.print(t)


# --------------------------------------------------------------------------- run


def _progress_bars(settings: ProbeSettings) -> tuple[ProbeProgress, Callable[[], None]]:
    """A progress hook for :func:`run_probe` with one tqdm bar per stage, and a closer."""
    from tqdm import tqdm

    labels = {
        "kappa": ("tensor", "kappa"),
        "fisher": ("tok", f"Fisher ({'+'.join(settings.kinds)})"),
    }
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for other in bars.values():
                other.close()
            unit, desc = labels[stage]
            bars[stage] = tqdm(unit=unit, desc=desc, disable=None, leave=False)
        bar = bars[stage]
        bar.total, bar.n = total, done
        bar.refresh()

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return progress, close


def run(args: argparse.Namespace) -> int:
    from kappatune.cli.console import wide_console
    from kappatune.cli.quiet import quiet_transformers
    from kappatune.outputs import write_all
    from kappatune.probe.run import run_probe

    settings = _settings(args)
    _check_output(args.output, "--output", ".json")
    _check_output(args.csv, "--csv", ".csv")
    _check_output(args.plot, "--plot", ".png")
    if args.top < 0:
        raise KappaTuneError(f"--top must be at least 0, got {args.top}")
    quiet_transformers()
    progress, close = _progress_bars(settings)
    try:
        report = run_probe(args.model, args.data, settings, progress=progress)
    finally:
        close()

    rendered: list[tuple[str, Path, bytes]] = []
    if args.output:
        from kappatune.jsonio import json_bytes

        rendered.append(("JSON", args.output, json_bytes(report.to_json())))
    if args.csv:
        rendered.append(("CSV", args.csv, report.csv_text().encode("utf-8")))
    if args.plot:
        rendered.append(("plot", args.plot, report.png()))
    console = wide_console(160)
    _print_report(console, args.model, args.top, report)
    write_all([(path, payload) for _, path, payload in rendered])
    for label, path, _ in rendered:
        console.print(f"wrote {label}: {path}")
    console.print(report.conclusion(), soft_wrap=True)
    return 0


def _print_report(console: Console, model: str, top: int, report: ProbeReport) -> None:
    settings, timings = report.settings, report.timings
    console.print(
        f"[bold]{model}[/bold]  {len(report.rows)} matrices  {settings.tokens} tokens in "
        f"{report.sequences} sequences of {settings.seq_len}  "
        f"kinds {', '.join(settings.kinds)}  lambda {settings.damping:g}  seed {settings.seed}  "
        f"(load {timings['load']:.1f} s, kappa {timings['kappa']:.1f} s, Fisher {timings['fisher']:.1f} s)"
    )
    _print_rows(console, report.rows, settings.kinds, top)
    _print_correlations(console, report.correlations, settings.kinds)
    _print_spectral(console, report.spectral)
