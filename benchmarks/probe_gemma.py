"""Does kappa rank the tensors of Gemma 3 270M like their Fisher information does?

Runs ``kappatune probe gemma-3-270m`` (true and empirical Fisher) on two texts that ship with
the interpreter, so the run needs no network:

* ``english``: English prose from ``pydoc_data.topics`` (the values of its ``topics`` dict,
  topics in sorted order, the first two prose paragraphs of each: plain paragraphs of 25 words
  or more, no indented code, grammar rules or lists);
* ``code``: Python standard-library source: 40 lines of each module of a fixed list, starting
  at its first top-level ``def`` or ``class``.

Writes ``probe_gemma_{english,code}.{json,csv,png}`` and a summary ``probe_gemma.md`` (with the
exact command) into ``benchmarks/results``. Usage::

    nice -n 10 python benchmarks/probe_gemma.py            # defaults: 16 x 128-token sequences
    python benchmarks/probe_gemma.py --tokens 508 --bootstrap 200 --out-dir /tmp/probe   # quick
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from kappatune.cli.main import main as kappatune_main
from kappatune.jsonio import atomic_write_text
from kappatune.probe.correlation import rank_correlation

MODULES = (
    "argparse", "bisect", "calendar", "colorsys", "contextlib", "copy", "csv", "dataclasses",
    "difflib", "fnmatch", "fractions", "functools", "heapq", "shlex", "statistics", "textwrap",
)  # fmt: skip
CODE_LINES = 40
PROSE_PARAGRAPHS = 2
MODEL = "gemma-3-270m"
RESULTS = Path(__file__).resolve().parent / "results"


def _is_prose(paragraph: str) -> bool:
    if not paragraph or paragraph[0].isspace() or "::=" in paragraph:
        return False
    if paragraph.lstrip().startswith(("*", "-", ">>>", "+", "=", "|")):
        return False
    return len(paragraph.split()) >= 25


def english_records() -> list[str]:
    from pydoc_data.topics import topics

    records = []
    for name in sorted(topics):
        paragraphs = [
            " ".join(p.split()) for p in re.split(r"\n\s*\n", topics[name]) if _is_prose(p)
        ]
        if paragraphs:
            records.append("\n\n".join(paragraphs[:PROSE_PARAGRAPHS]))
    return records


def code_records() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for mod in MODULES:
        lines = (root / f"{mod}.py").read_text(encoding="utf-8").splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(("def ", "class ")))
        records.append("\n".join(lines[start : start + CODE_LINES]) + "\n")
    return records


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def probe_argv(data: Path, stem: Path, args: argparse.Namespace) -> list[str]:
    return [
        "probe", MODEL, "--data", str(data), "--kind", "both", "--tokens", str(args.tokens),
        "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--bootstrap", str(args.bootstrap),
        "--lambda", str(args.damping), "--output", f"{stem}.json", "--csv", f"{stem}.csv",
        "--plot", f"{stem}.png",
    ]  # fmt: skip


# --------------------------------------------------------------------------- summary


def _num(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def _cell(c: dict[str, Any]) -> str:
    if c["estimate"] is None:
        return "n/a"
    return f"{_num(c['estimate'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"


def _table(report: dict[str, Any], measure: str) -> list[str]:
    cors = [c for c in report["correlations"] if c["measure"] == measure]
    kinds = report["settings"]["kinds"]
    head = "| group | n | " + " | ".join(f"{k} Spearman | {k} Kendall" for k in kinds) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(kinds))]
    for g in dict.fromkeys(c["group"] for c in cors):
        by = {(c["kind"], c["method"]): c for c in cors if c["group"] == g}
        cells = [_cell(by[(k, m)]) for k in kinds for m in ("spearman", "kendall")]
        lines.append(f"| {g} | {by[(kinds[0], 'spearman')]['n']} | " + " | ".join(cells) + " |")
    return lines


def _spectral_table(report: dict[str, Any]) -> list[str]:
    """Spearman between kappa, Spectrum's SNR and each Fisher kind, all matrices and per type."""
    cors = [c for c in report.get("spectral_correlations", []) if c["method"] == "spearman"]
    if not cors:
        return []
    pairs = list(dict.fromkeys((c["x"], c["y"]) for c in cors))
    lines = [
        "Where kappa stands among the spectral scores (Spearman, 95 % intervals; `snr` is"
        " Spectrum's signal-to-noise ratio"
        + (
            "; computed by `--summarize-only` from the stored Fisher rows and a fresh analysis"
            " of the same model"
            if report.get("spectral_added")
            else ""
        )
        + "):",
        "",
        "| group | n | " + " | ".join(f"{x} vs {y}" for x, y in pairs) + " |",
        "|" + "---|" * (2 + len(pairs)),
    ]
    for g in dict.fromkeys(c["group"] for c in cors):
        by = {(c["x"], c["y"]): c for c in cors if c["group"] == g}
        n = by[pairs[0]]["n"]
        lines.append(f"| {g} | {n} | " + " | ".join(_cell(by[p]) for p in pairs) + " |")
    return [*lines, ""]


def _cross_data(reports: dict[str, dict[str, Any]], kind: str, bootstrap: int, seed: int) -> str:
    """Spearman between the Fisher rankings of the two texts (kappa does not see the data)."""
    a, b = (reports[n]["rows"] for n in ("english", "code"))
    x = [r["fisher"][kind]["mean"] for r in a]
    y = [r["fisher"][kind]["mean"] for r in b]
    rc = rank_correlation(x, y, "spearman", bootstrap=bootstrap, seed=seed)
    return f"{rc.estimate:+.3f} [{rc.ci_low:+.2f}, {rc.ci_high:+.2f}] (n={rc.n})"


def _verdict(reports: dict[str, dict[str, Any]]) -> list[str]:
    """Counted from the tables: the overall sign, and module types whose interval excludes 0."""
    out = ["## Verdict (Fisher mean per parameter, Spearman, 95 % intervals)", ""]
    for name, report in reports.items():
        for kind in report["settings"]["kinds"]:
            cors = [
                c for c in report["correlations"]
                if c["kind"] == kind and c["measure"] == "mean" and c["method"] == "spearman"
                and c["estimate"] is not None
            ]  # fmt: skip
            overall = next(c for c in cors if c["group"] == "all")
            types = [c for c in cors if c["group"] != "all"]
            pos = [c["group"] for c in types if c["ci_low"] > 0]
            neg = [c["group"] for c in types if c["ci_high"] < 0]
            out.append(
                f"- {name}, {kind} Fisher: all tensors {_cell(overall)}; within module types,"
                f" interval above 0: {', '.join(pos) or 'none'}; below 0: {', '.join(neg) or 'none'};"
                f" containing 0: {len(types) - len(pos) - len(neg)} of {len(types)}"
            )
    out.append("")
    return out


def summary(
    reports: dict[str, dict[str, Any]], command: str, args: argparse.Namespace, wall: float
) -> str:
    any_report = next(iter(reports.values()))
    out = [
        "# kappa against Fisher information: Gemma 3 270M",
        "",
        f"Command: `{command}` (wall time {wall / 60:.1f} min on this machine, shared CPU).",
        "",
        f"Python {platform.python_version()}, model `{MODEL}` (Q4_K_M GGUF dequantized to float32),"
        f" {len(any_report['rows'])} matrices, fingerprint `{any_report['model_fingerprint'][:16]}`.",
        f"Fisher over {args.tokens} predicted tokens ({args.tokens // (args.seq_len - 1)} sequences of"
        f" {args.seq_len} tokens, BOS first), seed {args.seed}; correlations with {args.bootstrap}"
        f" bootstrap resamples, 95 % percentile intervals; log-volume lambda {args.damping:g}.",
        "",
        "Positive = tensors with a higher condition number carry more Fisher information per"
        " parameter (what KappaTune assumes when it protects high-kappa tensors).",
        "",
    ]
    for name, report in reports.items():
        t = report["timings_s"]
        out += [
            f"## {name} ({report['data']['sequences']} sequences available,"
            f" Fisher {t['fisher']:.0f} s, kappa {t['kappa']:.0f} s)",
            "",
            "Fisher mean per parameter:",
            "",
            *_table(report, "mean"),
            "",
            "Fisher log-volume 1/2 sum log(F + lambda) (grows with the number of parameters):",
            "",
            *_table(report, "logvol"),
            "",
            *_spectral_table(report),
        ]
    out += _verdict(reports)
    if set(reports) == {"english", "code"}:
        out += [
            "## Does the Fisher ranking depend on the data?",
            "",
            "Spearman between the per-tensor Fisher (mean per parameter) on English and on code:",
            "",
        ]
        for kind in any_report["settings"]["kinds"]:
            out.append(f"- {kind}: {_cross_data(reports, kind, args.bootstrap, args.seed)}")
        out.append("")
    out += [
        "Files: " + ", ".join(f"`probe_gemma_{n}.{{json,csv,png}}`" for n in reports),
        "",
    ]
    return "\n".join(out)


def add_spectral(report: dict[str, Any]) -> None:
    """For a report written before the probe compared kappa with Spectrum's SNR: the probe's
    own table (:func:`kappatune.probe.run.spectral_correlations`, with the report's settings)
    from its stored rows (kappa, Fisher) and a fresh analysis of the same model for the SNR."""
    from kappatune.analysis.spectra import analyze
    from kappatune.probe.run import ProbeRow, ProbeSettings, spectral_correlations

    analysis = analyze(MODEL)
    rows = [
        ProbeRow(r["name"], r["expert"], r["layer"], r["module_type"], int(r["numel"]),
                 float(r["kappa"]), r["fisher"])
        for r in report["rows"]
    ]  # fmt: skip
    fresh = {t.key: t.kappa for t in analysis.tensors}
    worst = max(
        abs(fresh[(r.name, -1 if r.expert is None else r.expert)] / r.kappa - 1) for r in rows
    )
    if worst > 1e-6:  # the stored fingerprint is of the loaded model, so compare the kappas
        raise SystemExit(f"{MODEL}'s kappas differ from the stored probe's (by {worst:.1e})")
    settings = ProbeSettings.from_json(report["settings"])
    report["spectral_added"] = True
    report["spectral_correlations"] = spectral_correlations(analysis, rows, settings)


def resummarize(args: argparse.Namespace) -> int:
    """Rewrite probe_gemma.md from the JSON files already in ``args.out_dir`` (adding the
    kappa/SNR/Fisher agreement to reports written before the probe computed it)."""
    reports = {
        n: json.loads((args.out_dir / f"probe_gemma_{n}.json").read_text(encoding="utf-8"))
        for n in ("english", "code")
        if (args.out_dir / f"probe_gemma_{n}.json").is_file()
    }
    for report in reports.values():
        if "spectral_correlations" not in report:
            add_spectral(report)
    old = (args.out_dir / "probe_gemma.md").read_text(encoding="utf-8")
    m = re.search(r"Command: `([^`]*)` \(wall time ([0-9.]+) min", old)
    command, wall = (
        (m.group(1), float(m.group(2)) * 60) if m else ("python benchmarks/probe_gemma.py", 0.0)
    )
    text = summary(reports, command, args, wall)
    atomic_write_text(args.out_dir / "probe_gemma.md", text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=16 * 127)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--lambda", dest="damping", type=float, default=1e-8)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--only", choices=("english", "code"), help="run one text only")
    p.add_argument(
        "--summarize-only", action="store_true",
        help="rewrite probe_gemma.md from the JSON files in --out-dir (no probe runs)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.summarize_only:
        return resummarize(args)
    command = " ".join(
        ["python", "benchmarks/probe_gemma.py", *map(shlex.quote, argv or sys.argv[1:])]
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="kappatune-probe-") as tmp:
        texts = {"english": english_records, "code": code_records}
        for name, build in texts.items():
            if args.only and name != args.only:
                continue
            data = write_jsonl(Path(tmp) / f"{name}.jsonl", build())
            stem = args.out_dir / f"probe_gemma_{name}"
            argv_probe = probe_argv(data, stem, args)
            print("kappatune " + " ".join(map(shlex.quote, argv_probe)), flush=True)
            rc = kappatune_main(argv_probe)
            if rc != 0:
                return rc
            reports[name] = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))
    text = summary(reports, command, args, time.perf_counter() - start)
    atomic_write_text(args.out_dir / "probe_gemma.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
