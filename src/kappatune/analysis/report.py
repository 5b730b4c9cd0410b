"""Readable views of an Analysis: orderings, summaries, CSV and plots (no printing here)."""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from statistics import median

from kappatune.analysis.metrics import METRIC_FIELDS
from kappatune.analysis.spectra import Analysis, SpectrumRow

CSV_FIELDS = (
    "name",
    "expert",
    "layer",
    "module_type",
    "shape",
    "dtype",
    "numel",
    *METRIC_FIELDS,
    "method",
)


def kappa_order(rows: tuple[SpectrumRow, ...] | list[SpectrumRow]) -> list[SpectrumRow]:
    """Ascending kappa with a deterministic tie-break on (name, expert); inf sorts last."""
    return sorted(rows, key=lambda r: (r.kappa, r.name, -1 if r.expert is None else r.expert))


@dataclass(frozen=True)
class ModuleSummary:
    module_type: str
    count: int
    params: int
    kappa_min: float
    kappa_median: float
    kappa_max: float


def module_summary(analysis: Analysis) -> list[ModuleSummary]:
    groups: dict[str, list[SpectrumRow]] = defaultdict(list)
    for r in analysis.tensors:
        groups[r.module_type].append(r)
    out = []
    for mtype, rows in groups.items():
        ks = sorted(r.kappa for r in rows)
        out.append(
            ModuleSummary(mtype, len(rows), sum(r.numel for r in rows), ks[0], median(ks), ks[-1])
        )
    return sorted(out, key=lambda s: (s.kappa_median, s.module_type))


def skip_summary(analysis: Analysis) -> list[tuple[str, int, list[str]]]:
    """(reason, count, first names) grouped by reason, most frequent first."""
    groups: dict[str, list[str]] = defaultdict(list)
    for s in analysis.skipped:
        groups[s.reason].append(s.name)
    return sorted(((r, len(n), n[:3]) for r, n in groups.items()), key=lambda x: (-x[1], x[0]))


def format_kappa(k: float) -> str:
    if math.isinf(k):
        return "inf"
    return f"{k:.4g}" if k < 1e5 else f"{k:.3e}"


def to_csv(analysis: Analysis) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in analysis.tensors:
        d = r.to_json()
        d["shape"] = "x".join(map(str, r.shape))
        writer.writerow(["" if d[f] is None else d[f] for f in CSV_FIELDS])
    return buf.getvalue()


NO_LAYER = "no layer"


@dataclass(frozen=True)
class Heatmap:
    """Mean log10 kappa per (module type, layer); matrices without a layer index (embeddings,
    the output head) get their own last column."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]  # NaN where no matrix of that type is in that layer
    title: str


def kappa_heatmap(analysis: Analysis) -> Heatmap:
    finite = [r for r in analysis.tensors if math.isfinite(r.kappa)]
    layers = sorted({r.layer for r in finite if r.layer is not None})
    columns = [str(x) for x in layers] + (
        [NO_LAYER] if any(r.layer is None for r in finite) else []
    )
    present = {r.module_type for r in finite}
    mtypes = [s.module_type for s in module_summary(analysis) if s.module_type in present]
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in finite:
        column = NO_LAYER if r.layer is None else str(r.layer)
        cells[(r.module_type, column)].append(math.log10(r.kappa))
    values = tuple(
        tuple(
            sum(cells[(m, c)]) / len(cells[(m, c)]) if cells[(m, c)] else math.nan for c in columns
        )
        for m in mtypes
    )
    title = "log10 kappa by layer and module type"
    if any(r.expert is not None for r in finite):
        title += " (experts averaged)"
    return Heatmap(tuple(mtypes), tuple(columns), values, title)


def plot_png(analysis: Analysis) -> bytes:
    """PNG bytes: log10 kappa over layer x module type, and its distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in analysis.tensors if math.isfinite(r.kappa)]
    heat = kappa_heatmap(analysis)
    grid = np.array(heat.values, dtype=float).reshape(len(heat.rows), len(heat.columns))
    if grid.size == 0:  # no finite kappa at all: an empty panel
        grid = np.full((1, 1), np.nan)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    im = ax1.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax1.set_yticks(range(len(heat.rows)), heat.rows)
    ax1.set_xticks(range(len(heat.columns)), heat.columns, fontsize=7)
    ax1.set_xlabel("layer")
    ax1.set_title(heat.title)
    fig.colorbar(im, ax=ax1, label="log10 kappa")
    finite = np.log10([r.kappa for r in rows]) if rows else np.array([])
    ax2.hist(finite, bins=40, color="#4c72b0")
    n_inf = sum(1 for r in analysis.tensors if math.isinf(r.kappa))
    ax2.set_xlabel("log10 kappa")
    ax2.set_ylabel("matrices")
    ax2.set_title(f"distribution ({len(rows)} finite, {n_inf} singular)")
    fig.suptitle(f"{analysis.source}  [{analysis.fingerprint[:12]}]", fontsize=9)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()
