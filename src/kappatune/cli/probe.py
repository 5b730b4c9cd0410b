"""``kappatune probe MODEL --data FILE...``: Fisher information in the weights against kappa.

Per candidate tensor (or expert) the probe puts kappa next to the diagonal Fisher measures
(true and/or empirical; sum, mean per parameter, log-volume) and reports how well the two
rankings agree: Spearman and Kendall tau-b with bootstrap intervals, over all tensors and per
module type. Everything is computed and rendered before any file is written.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kappatune.errors import KappaTuneError

SCHEMA_VERSION = 1
REPORT_KIND = "kappatune.probe"
MEASURES = ("mean", "sum", "logvol")

EPILOG = """examples:
  kappatune probe gemma-3-270m --data notes.txt --tokens 2048 --seq-len 128
  kappatune probe ./checkpoint --data a.txt b.jsonl --kind both --output probe.json --csv probe.csv --plot probe.png
  kappatune probe gemma-3-270m --data code.txt --kind empirical --lambda 1e-6 --bootstrap 2000 --seed 1

Positive correlations mean that tensors with a higher condition number also carry more
Fisher information (the premise of KappaTune); values near 0 mean kappa says little about it.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "probe",
        help="Fisher information in the weights against kappa, with rank correlations",
        description="Diagonal Fisher information per tensor from a data sample, next to kappa, "
        "with Spearman/Kendall rank correlations (bootstrap intervals) over all tensors and per "
        "module type.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        help="causal LM: built-in name (gemma-3-270m), .gguf file, model directory or HF id",
    )
    p.add_argument(
        "--data", nargs="+", required=True, type=Path, metavar="FILE",
        help="text (.txt, one document per file) or JSONL (a 'text' field per line) files",
    )  # fmt: skip
    p.add_argument(
        "--kind", choices=("true", "empirical", "both"), default="both",
        help="labels sampled from the model (true), the data's labels (empirical), or both (default)",
    )  # fmt: skip
    p.add_argument(
        "--tokens", type=int, default=2048, help="predicted tokens to use (default: 2048)"
    )
    p.add_argument(
        "--seq-len", type=int, default=128, help="tokens per sequence, BOS included (default: 128)"
    )
    p.add_argument(
        "--lambda", dest="damping", type=float, default=1e-8,
        help="damping of the log-volume 1/2 sum log(F_ii + lambda) (default: 1e-8)",
    )  # fmt: skip
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="label draws per sequence for the true Fisher (default: 1)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of label sampling and bootstrap (default: 0)"
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for intervals (default: 1000)",
    )
    p.add_argument(
        "--confidence", type=float, default=0.95, help="interval coverage (default: 0.95)"
    )
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


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ProbeSettings:
    kinds: tuple[str, ...]
    tokens: int
    seq_len: int
    damping: float
    samples: int
    seed: int
    bootstrap: int
    confidence: float

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise KappaTuneError(
                f"--seq-len must be at least 2 (BOS and one target), got {self.seq_len}"
            )
        if self.bootstrap < 0:
            raise KappaTuneError(f"--bootstrap must be 0 or more, got {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise KappaTuneError(f"--confidence must be between 0 and 1, got {self.confidence}")
        self.fisher_options()  # validates kinds, tokens, lambda and samples

    def fisher_options(self) -> Any:
        from kappatune.fisher import FisherOptions

        return FisherOptions(
            kinds=self.kinds,
            tokens=self.tokens,
            seed=self.seed,
            damping=self.damping,
            samples=self.samples,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kinds": list(self.kinds),
            "tokens": self.tokens,
            "seq_len": self.seq_len,
            "lambda": self.damping,
            "samples": self.samples,
            "seed": self.seed,
            "bootstrap": self.bootstrap,
            "confidence": self.confidence,
        }


def _settings(args: argparse.Namespace) -> ProbeSettings:
    kinds = ("true", "empirical") if args.kind == "both" else (args.kind,)
    return ProbeSettings(
        kinds=kinds, tokens=args.tokens, seq_len=args.seq_len, damping=args.damping, samples=args.samples,
        seed=args.seed, bootstrap=args.bootstrap, confidence=args.confidence,
    )  # fmt: skip


def _check_output(path: Path | None, flag: str, suffix: str) -> None:
    from kappatune.outputs import check_file

    check_file(path, flag, (suffix,))


def _check_data(files: Sequence[Path]) -> None:
    for f in files:
        if not f.exists():
            raise KappaTuneError(f"no such data file: {f}")
        if not f.is_file():
            raise KappaTuneError(f"data {f} is not a file")


def _file_info(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


# --------------------------------------------------------------------------- pure stages


@dataclass(frozen=True)
class ProbeRow:
    """kappa and the Fisher measures of one matrix (or expert)."""

    name: str
    expert: int | None
    layer: int | None
    module_type: str
    numel: int
    kappa: float
    fisher: Mapping[str, Mapping[str, float]]  # kind -> measure -> value

    def to_json(self) -> dict[str, Any]:
        from kappatune.jsonio import encode_float

        return {
            "name": self.name,
            "expert": self.expert,
            "layer": self.layer,
            "module_type": self.module_type,
            "numel": self.numel,
            "kappa": encode_float(self.kappa),
            "fisher": {
                k: {m: encode_float(v) for m, v in d.items()} for k, d in self.fisher.items()
            },
        }


def join_rows(analysis: Any, results: Mapping[str, Any]) -> list[ProbeRow]:
    """One row per analysed matrix, in the analysis order, with each kind's Fisher measures."""
    by_kind = {kind: {r.key: r for r in res.rows} for kind, res in results.items()}
    rows = []
    for s in analysis.tensors:
        fisher = {}
        for kind, rows_of in by_kind.items():
            if s.key not in rows_of:
                raise KappaTuneError(
                    f"no Fisher value for {s.name} (expert {s.expert}): names do not match"
                )
            fisher[kind] = {m: rows_of[s.key].measure(m) for m in MEASURES}
        rows.append(ProbeRow(s.name, s.expert, s.layer, s.module_type, s.numel, s.kappa, fisher))
    return rows


def correlate(rows: Sequence[ProbeRow], settings: ProbeSettings) -> list[dict[str, Any]]:
    """Correlations of kappa with each kind x measure, over all tensors then per module type."""
    from kappatune.correlation import grouped_correlations

    groups = [r.module_type for r in rows]
    kappas = [r.kappa for r in rows]
    out: list[dict[str, Any]] = []
    for kind in settings.kinds:
        for measure in MEASURES:
            values = [r.fisher[kind][measure] for r in rows]
            for g in grouped_correlations(
                groups, kappas, values, bootstrap=settings.bootstrap, confidence=settings.confidence,
                seed=settings.seed,
            ):  # fmt: skip
                out.append({"kind": kind, "measure": measure, **g.to_json()})
    return out


def report_json(
    model: str,
    data: dict[str, Any],
    settings: ProbeSettings,
    analysis: Any,
    results: Mapping[str, Any],
    rows: Sequence[ProbeRow],
    correlations: list[dict[str, Any]],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    import kappatune

    return {
        "schema_version": SCHEMA_VERSION,
        "kind": REPORT_KIND,
        "kappatune_version": kappatune.__version__,
        "model": model,
        "model_fingerprint": analysis.fingerprint,
        "data": data,
        "settings": settings.to_json(),
        "fisher": {k: {"tokens": r.tokens, "examples": r.examples} for k, r in results.items()},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "rows": [r.to_json() for r in rows],
        "correlations": correlations,
    }


def csv_text(rows: Sequence[ProbeRow], kinds: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["name", "expert", "layer", "module_type", "numel", "kappa"]
        + [f"{k}_{m}" for k in kinds for m in MEASURES]
    )
    for r in rows:
        w.writerow(
            [r.name, "" if r.expert is None else r.expert, "" if r.layer is None else r.layer,
             r.module_type, r.numel, repr(r.kappa)]
            + [repr(r.fisher[k][m]) for k in kinds for m in MEASURES]
        )  # fmt: skip
    return buf.getvalue()


def plot_png(
    rows: Sequence[ProbeRow], correlations: list[dict[str, Any]], kinds: Sequence[str], title: str
) -> bytes:
    """Fisher mean per parameter against kappa, log-log, one panel per kind, coloured by module type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({r.module_type for r in rows})
    cmap = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.0 * len(kinds), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for i, t in enumerate(types):
            pts = [
                (r.kappa, r.fisher[kind]["mean"])
                for r in rows
                if r.module_type == t and math.isfinite(r.kappa) and r.fisher[kind]["mean"] > 0
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, s=18, color=cmap(i % cmap.N), label=t, alpha=0.85)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("condition number kappa")
        ax.set_ylabel("Fisher, mean per parameter")
        rho = next(
            c for c in correlations
            if (c["kind"], c["measure"], c["group"], c["method"]) == (kind, "mean", "all", "spearman")
        )  # fmt: skip
        ax.set_title(
            f"{kind} Fisher  (Spearman {_fmt(rho['estimate'])}, n={rho['n']})", fontsize=10
        )
        ax.grid(True, which="both", alpha=0.25)
    axes[0][-1].legend(fontsize=7, loc="best", markerscale=0.8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- console


def _fmt(x: Any, digits: int = 3) -> str:
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


def _print_rows(console: Any, rows: Sequence[ProbeRow], kinds: Sequence[str], top: int) -> None:
    from rich.table import Table

    from kappatune.report import format_kappa

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
        t.add_row(r.name, "" if r.expert is None else str(r.expert), format_kappa(r.kappa), *cells)
    console.print(t)


def _print_correlations(
    console: Any, correlations: list[dict[str, Any]], kinds: Sequence[str]
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


# --------------------------------------------------------------------------- spectral scores


def spectral_scores(
    analysis: Any, rows: Sequence[ProbeRow], kinds: Sequence[str]
) -> dict[str, list[float]]:
    """Per matrix, in ``rows`` order: kappa, Spectrum's SNR and each kind's Fisher mean."""
    snr = {r.key: r.snr for r in analysis.tensors}
    keys = [(r.name, -1 if r.expert is None else r.expert) for r in rows]
    out: dict[str, list[float]] = {
        "kappa": [r.kappa for r in rows],
        "snr": [math.nan if snr.get(k) is None else float(snr[k]) for k in keys],  # type: ignore[arg-type]
    }
    for kind in kinds:
        out[f"fisher-{kind}"] = [r.fisher[kind]["mean"] for r in rows]
    return out


def spectral_correlations(
    analysis: Any, rows: Sequence[ProbeRow], settings: ProbeSettings
) -> list[dict[str, Any]]:
    """Rank correlations between kappa, SNR and Fisher (not Fisher with Fisher), all and per type."""
    from kappatune.correlation import pairwise_correlations

    scores = spectral_scores(analysis, rows, settings.kinds)
    names = list(scores)
    pairs = [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if not (a.startswith("fisher") and b.startswith("fisher"))
    ]
    return pairwise_correlations(
        [r.module_type for r in rows], scores, pairs, bootstrap=settings.bootstrap,
        confidence=settings.confidence, seed=settings.seed,
    )  # fmt: skip


def _print_spectral(console: Any, correlations: list[dict[str, Any]]) -> None:
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


def conclusion(correlations: Sequence[Mapping[str, Any]], kinds: Sequence[str]) -> str:
    """One plain sentence: do kappa and Fisher (mean per parameter, all matrices) agree?"""
    kind = "true" if "true" in kinds else kinds[0]
    c = next(
        c for c in correlations
        if (c["kind"], c["measure"], c["group"], c["method"]) == (kind, "mean", "all", "spearman")
    )  # fmt: skip
    if c["estimate"] is None or c["ci_low"] is None:
        return f"Conclusion: too few matrices ({c['n']}) to say whether kappa and Fisher agree."
    level = f"{100 * c['confidence']:g} %"
    figure = (
        f"Spearman {c['estimate']:+.2f}, {level} interval [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}],"
        f" {kind} Fisher per parameter, {c['n']} matrices"
    )
    if c["ci_low"] > 0:
        return (
            f"Conclusion: kappa and Fisher agree: matrices with a higher kappa carry more"
            f" information ({figure})."
        )
    if c["ci_high"] < 0:
        return (
            f"Conclusion: kappa and Fisher disagree: matrices with a higher kappa carry less"
            f" information, against KappaTune's premise ({figure})."
        )
    return f"Conclusion: no clear relation between kappa and Fisher ({figure})."


# --------------------------------------------------------------------------- run


def _quiet_transformers() -> None:
    """No "Loading weights" bars from transformers: errors must stay one line."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from tqdm import tqdm

    from kappatune import fisher
    from kappatune.outputs import write_all
    from kappatune.spectra import AnalyzeOptions, analyze

    settings = _settings(args)
    _check_output(args.output, "--output", ".json")
    _check_output(args.csv, "--csv", ".csv")
    _check_output(args.plot, "--plot", ".png")
    if args.top < 0:
        raise KappaTuneError(f"--top must be at least 0, got {args.top}")
    _check_data(args.data)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    _quiet_transformers()
    model, examples, stats = fisher.load_model_and_examples(
        args.model, args.data, seq_len=settings.seq_len
    )
    fisher.plan_examples(
        examples, fisher.CausalLMObjective(), settings.tokens
    )  # too little data: fail now
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    bar = tqdm(unit="tensor", desc="kappa", disable=None, leave=False)

    def analysis_progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        analysis = analyze(model, AnalyzeOptions(), progress=analysis_progress)
    finally:
        bar.close()
    if not analysis.tensors:
        raise KappaTuneError(
            f"the model {args.model} has no candidate tensors (floating-point, ndim >= 2;"
            f" {len(analysis.skipped)} tensors skipped)"
        )
    timings["kappa"] = time.perf_counter() - start

    start = time.perf_counter()
    fbar = tqdm(unit="tok", desc=f"Fisher ({'+'.join(settings.kinds)})", disable=None, leave=False)

    def fisher_progress(done: int, total: int) -> None:
        fbar.total, fbar.n = total, done
        fbar.refresh()

    try:
        results = fisher.compute_fisher(
            model, examples, settings.fisher_options(), only=[r.name for r in analysis.tensors],
            progress=fisher_progress,
        )  # fmt: skip
    finally:
        fbar.close()
    timings["fisher"] = time.perf_counter() - start

    rows = join_rows(analysis, results)
    correlations = correlate(rows, settings)
    data = {"files": [_file_info(f) for f in args.data], **stats}
    report = report_json(args.model, data, settings, analysis, results, rows, correlations, timings)
    spectral = spectral_correlations(analysis, rows, settings)
    report["spectral_correlations"] = spectral  # kappa, Spectrum's SNR and Fisher, pairwise
    rendered: list[tuple[str, Path, Any]] = []
    if args.output:
        rendered.append(("JSON", args.output, report))
    if args.csv:
        rendered.append(("CSV", args.csv, csv_text(rows, settings.kinds)))
    if args.plot:
        title = f"{args.model}: {settings.tokens} tokens of {', '.join(f.name for f in args.data)}"
        rendered.append(("plot", args.plot, plot_png(rows, correlations, settings.kinds, title)))

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)
    console.print(
        f"[bold]{args.model}[/bold]  {len(rows)} matrices  {settings.tokens} tokens in "
        f"{next(iter(results.values())).examples} sequences of {settings.seq_len}  "
        f"kinds {', '.join(settings.kinds)}  lambda {settings.damping:g}  seed {settings.seed}  "
        f"(load {timings['load']:.1f} s, kappa {timings['kappa']:.1f} s, Fisher {timings['fisher']:.1f} s)"
    )
    _print_rows(console, rows, settings.kinds, args.top)
    _print_correlations(console, correlations, settings.kinds)
    _print_spectral(console, spectral)

    write_all([(path, _encoded(label, payload)) for label, path, payload in rendered])
    for label, path, _ in rendered:
        console.print(f"wrote {label}: {path}")
    console.print(conclusion(correlations, settings.kinds), soft_wrap=True)
    return 0


def _encoded(label: str, payload: Any) -> bytes:
    from kappatune.jsonio import json_bytes

    if label == "JSON":
        return json_bytes(payload)
    return payload.encode("utf-8") if label == "CSV" else bytes(payload)
