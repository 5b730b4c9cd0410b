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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kappatune.bench.summary import ArmSummary, SeedPoint
from kappatune.bench.verdict import MeasureVerdict, interval_text, paired_text, sentences
from kappatune.jsonio import atomic_write_bytes, atomic_write_json, atomic_write_text, encode_float

if TYPE_CHECKING:  # rich and matplotlib are imported when a table or a plot is made
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from rich.table import Table

SCHEMA_VERSION = 2
COLUMNS = (
    "scenario",
    "arm",
    "lr",
    "step",
    "trainable",
    "train loss",
    "task",
    "task gain ↑",
    "control ppl",
    "forgetting ↓",
    "KL ↓",
    "knowledge Δ ↑",
)
WITHIN_NOISE = " (within noise)"


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


def _noise(text: str, value: float, floor: float) -> str:
    if text == "-" or not math.isfinite(floor) or not math.isfinite(value):
        return text
    return text + WITHIN_NOISE if abs(value) < floor else text


def cells(row: ArmSummary, floors: Mapping[str, float] | None = None) -> list[str]:
    floors = floors or {}
    acc = row.task_metric == "accuracy"
    task = (
        _pm((100 * row.task_value[0], 100 * row.task_value[1]), ".1f", "%")
        if acc
        else "ppl " + _pm(row.task_value, ".2f")
    )
    base = row.arm == "base"
    nan = math.nan
    return [
        row.scenario,
        _label(row.arm),
        "-" if base else f"{row.lr:g}",
        str(row.step),
        _params(row.trainable_params) if not base else "0",
        _pm(row.train_loss, ".3f"),
        task,
        _noise(_pm(row.task_gain, ".1f", " pp" if acc else "%", signed=True),
               nan if base else row.task_gain[0],
               _first_finite(row.task_gain_noise[0], floors.get("task_gain_change", nan),
                             floors.get("task_gain", nan) if acc else nan)),
        _pm(row.control_ppl, ".2f"),
        _noise(_pm(row.forgetting, ".2f", "%", signed=True), nan if base else row.forgetting[0],
               _first_finite(row.forgetting_noise[0], floors.get("control_ppl_change", nan))),
        _pm(row.kl, ".4f"),
        "-" if base else _knowledge(row, floors.get("knowledge_n", nan)),
    ]  # fmt: skip


def _first_finite(*xs: float) -> float:
    return next((x for x in xs if math.isfinite(x)), math.nan)


def _knowledge(row: ArmSummary, n: float) -> str:
    """Accuracy change with its binomial 95 % interval; "within noise" when it covers zero."""
    change, p1 = row.knowledge_change[0], row.knowledge[0]
    if not (math.isfinite(change) and math.isfinite(p1) and math.isfinite(n) and n > 0):
        return _pm(row.knowledge_change, ".1f", " pp", signed=True)
    p0 = p1 - change / 100
    half = 196 * math.sqrt(max(0.0, p0 * (1 - p0) + p1 * (1 - p1)) / n)
    text = f"{change:+.1f} pp [{change - half:+.1f}, {change + half:+.1f}]"
    return text + WITHIN_NOISE if abs(change) < half else text


def rich_table(
    rows: Sequence[ArmSummary], title: str, floors: Mapping[str, Mapping[str, float]] | None = None
) -> Table:
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("scenario", "arm") else "right")
    previous: tuple[str, str] | None = None
    for row in rows:
        if previous is not None and previous != (row.scenario, row.arm):
            table.add_section()
        previous = (row.scenario, row.arm)
        table.add_row(*cells(row, (floors or {}).get(row.scenario)))
    return table


def markdown_table(
    rows: Sequence[ArmSummary], floors: Mapping[str, Mapping[str, float]] | None = None
) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r, (floors or {}).get(r.scenario))) + " |" for r in rows]
    return "\n".join(lines) + "\n"


HEADLINE_COLUMNS = (
    "scenario", "forgetting measure", "arm", "on joint front", "forgetting at matched gain",
    "bootstrap (mean front)", "best gain within budget", "how it is read (mean front)",
    "grid edge",
)  # fmt: skip


def headline_rows(vs: Sequence[MeasureVerdict], gain_units: Mapping[str, str]) -> list[list[str]]:
    rows = []
    for v in vs:
        unit = gain_units.get(v.scenario, "")
        for a in v.arms:
            within = "-"
            if v.measure == "control ppl":
                within = (
                    "not reached" if a.within_budget is None else f"{a.within_budget:+.2f}{unit}"
                )
            rows.append([
                v.scenario, v.measure, _label(a.arm), "yes" if a.arm in v.joint else "no",
                paired_text(a.seedwise, v.unit).replace("paired t", "t"),
                interval_text(a.at_matched, v.unit), within, a.reading or "-", a.edge or "-",
            ])  # fmt: skip
    return rows


COMPARISON_COLUMNS = (
    "scenario",
    "forgetting measure",
    "compared",
    "difference at matched gain (per-seed, paired t)",
    "bootstrap (mean fronts)",
    "reading (from the t-interval)",
)


def comparison_rows(vs: Sequence[MeasureVerdict]) -> list[list[str]]:
    rows = []
    for v in vs:
        for c in v.comparisons:
            reading = {
                "forgets less": f"{v.reference} forgets less",
                "forgets more": f"{v.reference} forgets more",
                "within noise": "within noise",
            }.get(c.verdict, c.verdict)
            rows.append([v.scenario, v.measure, f"{v.reference} − {c.arm}",
                         paired_text(c.test, v.unit), interval_text(c.diff, v.unit),
                         reading])  # fmt: skip
    return rows


LENGTH_COLUMNS = ("scenario", "forgetting measure", "after steps", "matched gain", "forgetting",
                  "least to most forgetting")  # fmt: skip


def length_rows(vs: Sequence[MeasureVerdict], gain_units: Mapping[str, str]) -> list[list[str]]:
    """The comparison as it stood at each checkpoint step (fronts from the points up to it)."""
    rows = []
    for v in vs:
        unit = gain_units.get(v.scenario, "")
        for ln in v.lengths:
            gain = "not reached" if ln.matched_gain is None else f"{ln.matched_gain:.2f}{unit}"
            values = ", ".join(f"{a} {'-' if x is None else f'{x:+.3g}'}" for a, x in ln.forgetting)
            rows.append([v.scenario, v.measure, str(ln.steps), gain, values,
                         " < ".join(ln.order) or "-"])  # fmt: skip
    return rows


RANGE_COLUMNS = ("scenario", "forgetting measure", "compared", "gain", "difference (paired t)")


def range_rows(vs: Sequence[MeasureVerdict], gain_units: Mapping[str, str]) -> list[list[str]]:
    """The comparisons repeated over the range of gains below the matched one."""
    rows = []
    for v in vs:
        unit = gain_units.get(v.scenario, "")
        for lv in v.levels:
            for arm, test in lv.diffs:
                rows.append([v.scenario, v.measure, f"{v.reference} − {arm}",
                             f"{lv.gain:.2f}{unit} ({lv.fraction * 100:.0f} %)",
                             paired_text(test, v.unit)])  # fmt: skip
    return rows


def _md(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
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
    vs: Sequence[MeasureVerdict],
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
        "verdicts": [v.to_json() for v in vs],
    }


# --------------------------------------------------------------------------- plots

_MARKERS = "os^vD<>Pp*hX"


def _gain_unit(metric: str | None) -> str:
    return "accuracy change, pp" if metric == "accuracy" else "held-out ppl drop, %"


def _panels(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A figure of ``rows`` x ``cols`` panels drawn off-screen, its axes in reading order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, list(axes.flat)


def _png(fig: Figure, axes: Sequence[Axes], used: int) -> bytes:
    """The figure as PNG bytes (axes past the first ``used`` hidden); closes the figure."""
    import matplotlib.pyplot as plt

    for ax in axes[used:]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def pareto_png(vs: Sequence[MeasureVerdict], metrics: Mapping[str, str]) -> bytes:
    """One panel per (scenario, forgetting measure): every arm's mean points, its front as a
    line; arrows mark the better direction on both axes."""
    from matplotlib import colormaps

    cols = max(1, min(len(vs), 3))
    rows = max(1, math.ceil(len(vs) / cols))
    fig, axes = _panels(rows, cols, (5.5 * cols, 4.6 * rows))
    cmap = colormaps["tab10"]
    arms = list(dict.fromkeys(a.arm for v in vs for a in v.arms))
    for ax, v in zip(axes, vs, strict=False):
        for a in v.arms:
            i = arms.index(a.arm)
            xs = [p.gain for p in a.front]
            ys = [p.forgetting for p in a.front]
            ax.plot(xs, ys, color=cmap(i % 10), marker=_MARKERS[i % len(_MARKERS)], lw=1.5,
                    label=a.arm)  # fmt: skip
        if v.matched_gain is not None:
            ax.axvline(v.matched_gain, color="0.4", ls="--", lw=0.8, label="matched gain")
        if math.isfinite(v.floor):
            ax.axhspan(-v.floor, v.floor, color="0.9", zorder=0, label="noise floor")
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_xlabel(f"task gain ({_gain_unit(metrics.get(v.scenario))})  → better")
        ax.set_ylabel(f"forgetting: {v.measure} ({v.unit.strip()})  ↓ better")
        ax.set_title(f"{v.scenario}: fronts, {v.measure}")
        ax.annotate("better", xy=(0.97, 0.05), xytext=(0.75, 0.25), xycoords="axes fraction",
                    arrowprops={"arrowstyle": "->", "color": "green"}, color="green",
                    fontsize=9)  # fmt: skip
        ax.legend(fontsize=7)
    return _png(fig, axes, len(vs))


def gain_forgetting_png(points: Sequence[SeedPoint], metrics: Mapping[str, str]) -> bytes:
    """Every (arm, lr, seed, checkpoint) point: task gain (x) against control ppl rise (y)."""
    from matplotlib import colormaps

    panels = sorted({p.scenario for p in points})
    arms = list(dict.fromkeys(p.arm for p in points))
    cols = max(1, min(len(panels), 2))
    fig, axes = _panels(1, cols, (6 * cols, 4.5))
    cmap = colormaps["tab10"]
    for ax, scenario in zip(axes, panels, strict=False):
        for i, arm in enumerate(arms):
            sel = [p for p in points if (p.scenario, p.arm) == (scenario, arm)]
            if sel:
                ax.scatter([p.task_gain for p in sel], [p.forgetting for p in sel], label=arm,
                           color=cmap(i % 10), marker=_MARKERS[i % len(_MARKERS)], s=20,
                           alpha=0.7)  # fmt: skip
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.axvline(0.0, color="0.6", lw=0.8)
        ax.set_xlabel(f"task gain ({_gain_unit(metrics.get(scenario))})  → better")
        ax.set_ylabel("forgetting (control ppl rise, %)  ↓ better")
        ax.set_title(f"{scenario}: every seed, lr and checkpoint")
        ax.legend(fontsize=8)
    return _png(fig, axes, len(panels))


def loss_curves_png(curves: Mapping[tuple[str, str], Sequence[Sequence[float]]]) -> bytes:
    """Training loss per step, one panel per scenario, one line per (arm, seed)."""
    from matplotlib import colormaps

    scenarios = sorted({s for s, _ in curves})
    arms = list(dict.fromkeys(a for _, a in curves))
    fig, axes = _panels(1, max(1, len(scenarios)), (6 * max(1, len(scenarios)), 4))
    cmap = colormaps["tab10"]
    for ax, scenario in zip(axes, scenarios, strict=False):
        for i, arm in enumerate(arms):
            for j, losses in enumerate(curves.get((scenario, arm), ())):
                ax.plot(range(1, len(losses) + 1), losses, color=cmap(i % 10), lw=1, alpha=0.8,
                        label=arm if j == 0 else None)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(scenario)
        ax.legend(fontsize=8)
    return _png(fig, axes, max(1, len(scenarios)))


# --------------------------------------------------------------------------- documents

EXPLAIN = (
    "Task gain (↑ better): held-out perplexity drop in % (perplexity tasks) or accuracy change in"
    " percentage points (label tasks). Forgetting (↓ better), each against the base model:"
    " control perplexity rise in %; mean per-token KL divergence from the base model's"
    " next-token distribution on the control text; change of accuracy on general-knowledge"
    " multiple-choice questions (Δ, ↑ better). Every (arm, learning rate, seed, checkpoint) is"
    " one point; tables show mean ± sample std over seeds. Fronts pool each arm's learning rates"
    " and checkpoints. The matched gain is the highest task gain every arm reaches on every"
    " seed's own front; each arm is read there seed by seed, and arms are compared by their"
    " per-seed differences: the verdict rests on the paired 95 % t-interval over seeds, shown"
    " with the exact sign-flip permutation p-value (with n seeds never below 2/2^n) and a 95 %"
    " bootstrap over seeds on the mean fronts (with 3 seeds only 10 distinct resamples: it"
    " covers well under 95 %). The comparison is repeated at 25-100 % of the matched gain, since"
    " its sign can change with the gain. Noise floors: the base"
    " model's 95 % bootstrap band over resamples of each evaluation set (how much the number"
    " moves with the text drawn), and for a control perplexity change the same band with the"
    " base and the tuned model scored on each resample (paired). A change inside its floor (or,"
    " for knowledge questions, whose binomial 95 % interval covers zero) is marked"
    " 'within noise'."
)


def floor_lines(floors: Mapping[str, Mapping[str, float]]) -> list[str]:
    out = []
    for scenario, f in sorted(floors.items()):
        bits = []
        if "control_ppl" in f:
            size = ""
            if f.get("control_rows"):
                size = f"; {f['control_rows']:.0f} rows, {f['control_tokens']:.0f} tokens"
            bits.append(
                f"control perplexity ±{f['control_ppl']:.2f} % (base model, which text{size})"
            )
        if "control_ppl_change" in f:
            bits.append(
                f"control perplexity change ±{f['control_ppl_change']:.2f} % (paired, median"
                " over the points; used for 'within noise')"
            )
        if "task_gain" in f:
            bits.append(f"task ±{f['task_gain']:.2f} (base model, which text or examples)")
        if "task_gain_change" in f:
            bits.append(f"task perplexity change ±{f['task_gain_change']:.2f} % (paired, median)")
        if "knowledge" in f:
            bits.append(f"knowledge accuracy ±{f['knowledge']:.2f} pp")
        out.append(f"{scenario}: noise floors {', '.join(bits)}")
    return out


def verdict_text(vs: Sequence[MeasureVerdict], metrics: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for v in vs:
        unit = " pp" if metrics.get(v.scenario) == "accuracy" else " %"
        out.extend(sentences(v, unit))
    return out


@dataclass(frozen=True)
class ReportContent:
    """What the Markdown and the HTML report both show."""

    rows: Sequence[ArmSummary]
    vs: Sequence[MeasureVerdict]
    meta: Mapping[str, Any]
    notes: Sequence[str]
    metrics: Mapping[str, str]
    floors: Mapping[str, Mapping[str, float]]
    conclusion: str

    def command(self) -> str:
        return str(self.meta.get("command", ""))

    def settings(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.meta.get("settings", {}).items())

    def gain_units(self) -> dict[str, str]:
        return {s: (" pp" if m == "accuracy" else " %") for s, m in self.metrics.items()}

    def headline_rows(self) -> list[list[str]]:
        return headline_rows(self.vs, self.gain_units())

    def tables(self) -> list[tuple[str, Sequence[str], list[list[str]]]]:
        """The verdict's tables, in order, as (title, header, rows); the headline table always,
        the others when they have rows."""
        units = self.gain_units()
        out = [
            ("Headline numbers", HEADLINE_COLUMNS, self.headline_rows()),
            ("Differences at matched gain (negative: the reference forgets less)",
             COMPARISON_COLUMNS, comparison_rows(self.vs)),
            ("The differences over a range of gains", RANGE_COLUMNS, range_rows(self.vs, units)),
            ("As training goes on (fronts from the points up to each step)", LENGTH_COLUMNS,
             length_rows(self.vs, units)),
        ]  # fmt: skip
        return [t for i, t in enumerate(out) if i == 0 or t[2]]


def markdown_report(c: ReportContent) -> str:
    parts = ["# kappatune bench\n", f"**Verdict.** {c.conclusion}\n"]
    parts.append("".join(f"- {s}\n" for s in verdict_text(c.vs, c.metrics)))
    parts.append("![Pareto fronts](pareto.png)\n")
    parts.append(f"Command: `{c.command()}`\n")
    parts.append(f"Settings: {c.settings()}\n")
    parts.append(EXPLAIN + "\n")
    parts.append("".join(f"- {line}\n" for line in floor_lines(c.floors)))
    for title, header, body in c.tables():
        parts.append(f"## {title}\n")
        parts.append(_md(header, body))
    parts.append("## Every point (mean over seeds)\n")
    parts.append(markdown_table(c.rows, c.floors))
    if c.notes:
        parts.append("## Notes\n")
        parts.append("".join(f"- {n}\n" for n in c.notes))
    parts.append("![task gain vs forgetting](gain_vs_forgetting.png)\n")
    parts.append("![training loss](loss_curves.png)\n")
    return "\n".join(parts)


def _html_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def html_report(c: ReportContent, images: Mapping[str, bytes]) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}"
        "code{background:#f4f4f4;padding:2px 4px}"
    )
    esc = html.escape
    body = [f"<h1>kappatune bench</h1><p><b>Verdict.</b> {esc(c.conclusion)}</p>"]
    body.append(
        "<ul>" + "".join(f"<li>{esc(s)}</li>" for s in verdict_text(c.vs, c.metrics)) + "</ul>"
    )
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        body.append(
            f'<h2>{esc(name)}</h2><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
        )
    body.append(f"<p>Command: <code>{esc(c.command())}</code></p>")
    body.append(f"<p>Settings: {esc(c.settings())}</p><p>{esc(EXPLAIN)}</p>")
    body.append("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in floor_lines(c.floors)) + "</ul>")
    for title, header, rows in c.tables():
        body.append(f"<h2>{esc(title)}</h2>" + _html_table(header, rows))
    body.append("<h2>Every point (mean over seeds)</h2>")
    body.append(_html_table(COLUMNS, [cells(r, c.floors.get(r.scenario)) for r in c.rows]))
    if c.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in c.notes) + "</ul>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>kappatune bench</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(
    out_dir: Path,
    rows: Sequence[ArmSummary],
    points: Sequence[SeedPoint],
    vs: Sequence[MeasureVerdict],
    meta: Mapping[str, Any],
    notes: Sequence[str],
    metrics: Mapping[str, str],
    floors: Mapping[str, Mapping[str, float]],
    conclusion: str,
    curves: Mapping[tuple[str, str], Sequence[Sequence[float]]],
) -> list[Path]:
    """Render everything, then write it; returns the files written."""
    files: dict[str, bytes | str | dict[str, Any]] = {}
    images: dict[str, bytes] = {}
    if vs:
        images["Pareto fronts"] = pareto_png(vs, metrics)
        files["pareto.png"] = images["Pareto fronts"]
    if points:
        images["task gain vs forgetting"] = gain_forgetting_png(points, metrics)
        files["gain_vs_forgetting.png"] = images["task gain vs forgetting"]
    if curves:
        images["training loss"] = loss_curves_png(curves)
        files["loss_curves.png"] = images["training loss"]
    files["summary.json"] = summary_json(rows, points, vs, meta)
    files["summary.csv"] = summary_csv(rows)
    files["seeds.csv"] = seeds_csv(points)
    shown = ReportContent(rows, vs, meta, notes, metrics, floors, conclusion)
    files["report.md"] = markdown_report(shown)
    files["report.html"] = html_report(shown, images)
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
