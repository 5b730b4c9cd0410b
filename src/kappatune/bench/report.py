"""Render benchmark summaries: terminal table (rich), Markdown, CSV, JSON, PNG plots, HTML.

Everything is rendered in memory first and written with atomic writes at the end, so an
error never leaves half a report behind.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kappatune.bench.summary import ArmSummary, Paired, SeedPoint
from kappatune.jsonio import atomic_write_bytes, atomic_write_json, atomic_write_text, encode_float

SCHEMA_VERSION = 1
COLUMNS = (
    "scenario",
    "stop",
    "arm",
    "trainable",
    "steps",
    "train loss",
    "task",
    "task gain",
    "control ppl",
    "forgetting",
    "reached",
)


def _pm(mean_std: tuple[float, float], fmt: str, unit: str = "", signed: bool = False) -> str:
    m, s = mean_std
    if not math.isfinite(m):
        return "-"
    text = format(m, ("+" if signed else "") + fmt) + unit
    return text if not math.isfinite(s) else f"{text} ± {format(s, fmt)}{unit}"


def _params(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f}B"
    if n >= 10**6:
        return f"{n / 1e6:.2f}M"
    if n >= 10**3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _label(arm: str) -> str:
    from kappatune.bench.arms import arm_label  # marks arms that use data of what to keep

    return arm_label(arm)


def cells(row: ArmSummary) -> list[str]:
    acc = row.task_metric == "accuracy"
    task = (
        _pm((100 * row.task_value[0], 100 * row.task_value[1]), ".1f", "%")
        if acc
        else "ppl " + _pm(row.task_value, ".2f")
    )
    return [
        row.scenario,
        row.rule,
        _label(row.arm),
        _params(row.trainable_params) if row.arm != "base" else "0",
        _pm(row.steps, ".0f") if row.arm != "base" else "0",
        _pm(row.train_loss, ".3f"),
        task,
        _pm(row.task_gain, ".1f", " pp" if acc else "%", signed=True),
        _pm(row.control_ppl, ".2f"),
        _pm(row.forgetting, ".2f", "%", signed=True),
        "-" if row.arm == "base" or row.rule == "steps" else f"{row.reached}/{row.seeds}",
    ]


def rich_table(rows: Sequence[ArmSummary], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("scenario", "stop", "arm") else "right")
    previous: tuple[str, str] | None = None
    for row in rows:
        if previous is not None and previous != (row.scenario, row.rule):
            table.add_section()
        previous = (row.scenario, row.rule)
        table.add_row(*cells(row))
    return table


def markdown_table(rows: Sequence[ArmSummary]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def paired_markdown(pairs: Sequence[Paired]) -> str:
    if not pairs:
        return ""
    head = "| scenario | stop | arm | seeds | gain − ref | forgetting − ref | ref forgot less |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(
            f"| {p.scenario} | {p.rule} | {_label(p.arm)} | {p.seeds} | {_pm(p.gain_diff, '.2f', signed=True)}"
            f" | {_pm(p.forgetting_diff, '.2f', '%', signed=True)} | {p.less_forgetting}/{p.seeds} |"
        )
    return "\n".join(lines) + "\n"


def summary_csv(rows: Sequence[ArmSummary]) -> str:
    buf = io.StringIO()
    records = [r.to_json() for r in rows]
    writer = csv.DictWriter(
        buf, fieldnames=list(records[0]) if records else [], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def seeds_csv(points: Sequence[SeedPoint]) -> str:
    buf = io.StringIO()
    fields = list(asdict(points[0])) if points else []
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow(
            {k: (encode_float(v) if isinstance(v, float) else v) for k, v in asdict(p).items()}
        )
    return buf.getvalue()


def summary_json(
    rows: Sequence[ArmSummary],
    points: Sequence[SeedPoint],
    pairs: Sequence[Paired],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "kappatune.bench.summary",
        "meta": dict(meta),
        "arms": [r.to_json() for r in rows],
        "seeds": [
            {k: (encode_float(v) if isinstance(v, float) else v) for k, v in asdict(p).items()}
            for p in points
        ],
        "paired": [p.to_json() for p in pairs],
    }


# --------------------------------------------------------------------------- plots

_MARKERS = "os^vD<>Pp*hX"


def gain_forgetting_png(points: Sequence[SeedPoint], metrics: Mapping[str, str]) -> bytes:
    """Task gain (x) against forgetting (y), one point per arm and seed; one panel per scenario x rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(p.scenario, p.rule) for p in points})
    arms = list(dict.fromkeys(p.arm for p in points))
    cols = max(1, min(len(panels), 2))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (scenario, rule) in zip(axes.flat, panels, strict=False):
        for i, arm in enumerate(arms):
            sel = [p for p in points if (p.scenario, p.rule, p.arm) == (scenario, rule, arm)]
            if sel:
                ax.scatter(
                    [p.task_gain for p in sel],
                    [p.forgetting for p in sel],
                    label=arm,
                    color=cmap(i % 10),
                    marker=_MARKERS[i % len(_MARKERS)],
                    s=45,
                    alpha=0.85,
                )
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.axvline(0.0, color="0.6", lw=0.8)
        unit = (
            "accuracy change, pp" if metrics.get(scenario) == "accuracy" else "held-out ppl drop, %"
        )
        ax.set_xlabel(f"task gain ({unit})")
        ax.set_ylabel("forgetting (control ppl rise, %)")
        ax.set_title(f"{scenario}, stop at equal {rule}")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def loss_curves_png(curves: Mapping[tuple[str, str], Sequence[Sequence[float]]]) -> bytes:
    """Training loss per step, one panel per scenario, one line per (arm, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({s for s, _ in curves})
    arms = list(dict.fromkeys(a for _, a in curves))
    fig, axes = plt.subplots(
        1, max(1, len(scenarios)), figsize=(6 * max(1, len(scenarios)), 4), squeeze=False
    )
    cmap = plt.get_cmap("tab10")
    for ax, scenario in zip(axes.flat, scenarios, strict=False):
        for i, arm in enumerate(arms):
            for j, losses in enumerate(curves.get((scenario, arm), ())):
                ax.plot(range(1, len(losses) + 1), losses, color=cmap(i % 10), lw=1, alpha=0.8,
                        label=arm if j == 0 else None)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(scenario)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- documents


def markdown_report(
    rows: Sequence[ArmSummary],
    pairs: Sequence[Paired],
    meta: Mapping[str, Any],
    notes: Sequence[str],
) -> str:
    parts = ["# kappatune bench\n"]  # blocks, joined by blank lines
    parts.append(f"Command: `{meta.get('command', '')}`\n")
    setting = ", ".join(f"{k}={v}" for k, v in meta.get("settings", {}).items())
    parts.append(f"Settings: {setting}\n")
    parts.append(
        "Task gain: held-out perplexity drop in % (perplexity tasks) or accuracy change in"
        " percentage points (label tasks). Forgetting: control perplexity rise in %. Mean ±"
        " sample std over seeds.\n"
    )
    parts.append(markdown_table(rows))
    if pairs:
        ref = pairs[0].reference
        parts.append(f"## Paired against `{ref}` (same seed = same data order)\n")
        parts.append(paired_markdown(pairs))
    if notes:
        parts.append("## Notes\n")
        parts.append("".join(f"- {n}\n" for n in notes))
    parts.append("![task gain vs forgetting](gain_vs_forgetting.png)\n")
    parts.append("![training loss](loss_curves.png)\n")
    return "\n".join(parts)


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def html_report(
    rows: Sequence[ArmSummary],
    pairs: Sequence[Paired],
    meta: Mapping[str, Any],
    notes: Sequence[str],
    images: Mapping[str, bytes],
) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}td:nth-child(-n+3),th:nth-child(-n+3){text-align:left}"
        "code{background:#f4f4f4;padding:2px 4px}"
    )
    body = [
        f"<h1>kappatune bench</h1><p>Command: <code>{html.escape(str(meta.get('command', '')))}</code></p>"
    ]
    settings = ", ".join(f"{k}={v}" for k, v in meta.get("settings", {}).items())
    body.append(f"<p>Settings: {html.escape(settings)}</p>")
    body.append(
        "<p>Task gain: held-out perplexity drop in % (perplexity tasks) or accuracy change in"
        " percentage points (label tasks). Forgetting: control perplexity rise in %."
        " Mean ± sample std over seeds.</p>"
    )
    body.append(_html_table(COLUMNS, [cells(r) for r in rows]))
    if pairs:
        body.append(f"<h2>Paired against {html.escape(pairs[0].reference)}</h2>")
        body.append(
            _html_table(
                (
                    "scenario",
                    "stop",
                    "arm",
                    "seeds",
                    "gain − ref",
                    "forgetting − ref",
                    "ref forgot less",
                ),
                [
                    [
                        p.scenario,
                        p.rule,
                        _label(p.arm),
                        str(p.seeds),
                        _pm(p.gain_diff, ".2f", signed=True),
                        _pm(p.forgetting_diff, ".2f", "%", signed=True),
                        f"{p.less_forgetting}/{p.seeds}",
                    ]
                    for p in pairs
                ],
            )
        )
    if notes:
        body.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
        )
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        body.append(
            f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
        )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>kappatune bench</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def write_report(
    out_dir: Path,
    rows: Sequence[ArmSummary],
    points: Sequence[SeedPoint],
    pairs: Sequence[Paired],
    meta: Mapping[str, Any],
    notes: Sequence[str],
    metrics: Mapping[str, str],
    curves: Mapping[tuple[str, str], Sequence[Sequence[float]]],
) -> list[Path]:
    """Render everything, then write it; returns the files written."""
    files: dict[str, bytes | str | dict[str, Any]] = {}
    images: dict[str, bytes] = {}
    if points:
        images["task gain vs forgetting"] = gain_forgetting_png(points, metrics)
        files["gain_vs_forgetting.png"] = images["task gain vs forgetting"]
    if curves:
        images["training loss"] = loss_curves_png(curves)
        files["loss_curves.png"] = images["training loss"]
    files["summary.json"] = summary_json(rows, points, pairs, meta)
    files["summary.csv"] = summary_csv(rows)
    files["seeds.csv"] = seeds_csv(points)
    files["report.md"] = markdown_report(rows, pairs, meta, notes)
    files["report.html"] = html_report(rows, pairs, meta, notes, images)
    written = []
    for name, content in files.items():
        path = out_dir / name
        if isinstance(content, bytes):
            atomic_write_bytes(path, content)
        elif isinstance(content, str):
            atomic_write_text(path, content)
        else:
            atomic_write_json(path, content)
        written.append(path)
    return written
