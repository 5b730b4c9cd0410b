"""The probe as a library: Fisher information in the weights against kappa.

Per candidate tensor (or expert) the probe puts kappa next to the diagonal Fisher measures
(true and/or empirical; sum, mean per parameter, log-volume) and reports how well the two
rankings agree: Spearman and Kendall tau-b with bootstrap intervals, over all tensors and per
module type, plus the pairwise agreement of kappa, Spectrum's SNR and Fisher.

    from kappatune import ProbeSettings, run_probe

    report = run_probe("gemma-3-270m", ["notes.txt"], ProbeSettings(tokens=2048))
    print(report.conclusion())
    report.save_json("probe.json"); report.save_csv("probe.csv"); report.plot("probe.png")

``kappatune probe`` parses its flags into :class:`ProbeSettings`, calls :func:`run_probe` and
prints the report.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kappatune import settings
from kappatune.errors import KappaTuneError
from kappatune.settings import setting

if TYPE_CHECKING:  # the CLI imports this module for its defaults: torch stays unloaded
    from kappatune.analysis.fisher import FisherOptions, FisherResult
    from kappatune.analysis.spectra import Analysis

SCHEMA_VERSION = 1
REPORT_KIND = "kappatune.probe.run"
MEASURES = ("mean", "sum", "logvol")

#: ``progress(stage, done, total)``; stage is ``"kappa"`` (tensors) or ``"fisher"`` (tokens).
ProbeProgress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- settings


KIND_CHOICES = {"true": ("true",), "empirical": ("empirical",), "both": ("true", "empirical")}


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe measures; the defaults are ``kappatune probe``'s."""

    kinds: tuple[str, ...] = setting(
        ("true", "empirical"),
        flag="--kind",
        choices=KIND_CHOICES,
        help="labels sampled from the model (true), the data's labels (empirical), or both"
        " (default)",
    )
    tokens: int = setting(2048, help="predicted tokens to use")
    seq_len: int = setting(128, help="tokens per sequence, BOS included")
    damping: float = setting(
        1e-8,
        flag="--lambda",
        dest="damping",
        json="lambda",
        help="damping of the log-volume 1/2 sum log(F_ii + lambda)",
    )
    samples: int = setting(1, help="label draws per sequence for the true Fisher")
    seed: int = setting(0, help="seed of label sampling and bootstrap")
    bootstrap: int = setting(1000, help="bootstrap resamples for intervals")
    confidence: float = setting(0.95, help="interval coverage")

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise KappaTuneError(
                f"--seq-len must be at least 2 (BOS and one target), got {self.seq_len}"
            )
        if self.bootstrap < 0:
            raise KappaTuneError(f"--bootstrap must be 0 or more, got {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise KappaTuneError(f"--confidence must be between 0 and 1, got {self.confidence}")
        _ = self.fisher_options  # validates kinds, tokens, lambda and samples; kept for the run

    @cached_property
    def fisher_options(self) -> FisherOptions:
        from kappatune.analysis.fisher import FisherOptions

        return FisherOptions(
            kinds=self.kinds,
            tokens=self.tokens,
            seed=self.seed,
            damping=self.damping,
            samples=self.samples,
        )

    def to_json(self) -> dict[str, Any]:
        return settings.to_json(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ProbeSettings:
        return settings.from_json(cls, d, "probe settings")


def check_data(files: Sequence[Path]) -> None:
    """Raise unless every data file exists and is a file."""
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
    """kappa, Spectrum's SNR and the Fisher measures of one matrix (or expert)."""

    name: str
    expert: int | None
    layer: int | None
    module_type: str
    numel: int
    kappa: float
    fisher: Mapping[str, Mapping[str, float]]  # kind -> measure -> value
    snr: float = math.nan  # nan: undefined (1 x N) or an analysis without SNR (schema 1)

    def to_json(self) -> dict[str, Any]:
        from kappatune.jsonio import encode_float

        return {
            "name": self.name,
            "expert": self.expert,
            "layer": self.layer,
            "module_type": self.module_type,
            "numel": self.numel,
            "kappa": encode_float(self.kappa),
            "snr": encode_float(self.snr),
            "fisher": {
                k: {m: encode_float(v) for m, v in d.items()} for k, d in self.fisher.items()
            },
        }


def join_rows(analysis: Analysis, results: Mapping[str, FisherResult]) -> list[ProbeRow]:
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
        snr = math.nan if s.snr is None else float(s.snr)
        rows.append(
            ProbeRow(s.name, s.expert, s.layer, s.module_type, s.numel, s.kappa, fisher, snr)
        )
    return rows


def correlate(rows: Sequence[ProbeRow], settings: ProbeSettings) -> list[dict[str, Any]]:
    """Correlations of kappa with each kind x measure, over all tensors then per module type."""
    from kappatune.probe.correlation import grouped_correlations

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


def spectral_scores(
    analysis: Analysis, rows: Sequence[ProbeRow], kinds: Sequence[str]
) -> dict[str, list[float]]:
    """Per matrix, in ``rows`` order: kappa, Spectrum's SNR and each kind's Fisher mean."""
    snr = {r.key: r.snr for r in analysis.tensors}
    keys = [(r.name, -1 if r.expert is None else r.expert) for r in rows]
    out: dict[str, list[float]] = {
        "kappa": [r.kappa for r in rows],
        "snr": [math.nan if (v := snr.get(k)) is None else float(v) for k in keys],
    }
    for kind in kinds:
        out[f"fisher-{kind}"] = [r.fisher[kind]["mean"] for r in rows]
    return out


def spectral_correlations(
    analysis: Analysis, rows: Sequence[ProbeRow], settings: ProbeSettings
) -> list[dict[str, Any]]:
    """Rank correlations between kappa, SNR and Fisher (not Fisher with Fisher), all and per type."""
    from kappatune.probe.correlation import pairwise_correlations

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


def _spearman_all(correlations: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any]:
    return next(
        c for c in correlations
        if (c["kind"], c["measure"], c["group"], c["method"]) == (kind, "mean", "all", "spearman")
    )  # fmt: skip


def conclusion(correlations: Sequence[Mapping[str, Any]], kinds: Sequence[str]) -> str:
    """One plain sentence: do kappa and Fisher (mean per parameter, all matrices) agree?"""
    kind = "true" if "true" in kinds else kinds[0]
    c = _spearman_all(correlations, kind)
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


# --------------------------------------------------------------------------- renderings


def csv_text(rows: Sequence[ProbeRow], kinds: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["name", "expert", "layer", "module_type", "numel", "kappa", "snr"]
        + [f"{k}_{m}" for k in kinds for m in MEASURES]
    )
    for r in rows:
        w.writerow(
            [r.name, "" if r.expert is None else r.expert, "" if r.layer is None else r.layer,
             r.module_type, r.numel, repr(r.kappa), repr(r.snr)]
            + [repr(r.fisher[k][m]) for k in kinds for m in MEASURES]
        )  # fmt: skip
    return buf.getvalue()


def _signed(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.3f}"


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
        rho = _spearman_all(correlations, kind)
        ax.set_title(
            f"{kind} Fisher  (Spearman {_signed(rho['estimate'])}, n={rho['n']})", fontsize=10
        )
        ax.grid(True, which="both", alpha=0.25)
    axes[0][-1].legend(fontsize=7, loc="best", markerscale=0.8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class ProbeReport:
    """Everything the probe measured; rendered by :meth:`to_json`, :meth:`csv_text`, :meth:`png`."""

    model: str
    data_files: tuple[Path, ...]
    data_stats: Mapping[str, int]
    settings: ProbeSettings
    analysis: Analysis
    results: Mapping[str, FisherResult]  # kind -> its Fisher estimate
    rows: tuple[ProbeRow, ...]
    correlations: list[dict[str, Any]]
    spectral: list[dict[str, Any]]  # kappa, Spectrum's SNR and Fisher, pairwise
    timings: Mapping[str, float] = field(default_factory=dict)

    @property
    def sequences(self) -> int:
        return int(next(iter(self.results.values())).examples)

    def to_json(self) -> dict[str, Any]:
        from kappatune._version import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "kind": REPORT_KIND,
            "kappatune_version": __version__,
            "model": self.model,
            "model_fingerprint": self.analysis.fingerprint,
            "data": {"files": [_file_info(f) for f in self.data_files], **self.data_stats},
            "settings": self.settings.to_json(),
            "fisher": {
                k: {"tokens": r.tokens, "examples": r.examples} for k, r in self.results.items()
            },
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "rows": [r.to_json() for r in self.rows],
            "correlations": self.correlations,
            "spectral_correlations": self.spectral,
        }

    def csv_text(self) -> str:
        return csv_text(self.rows, self.settings.kinds)

    def title(self) -> str:
        names = ", ".join(f.name for f in self.data_files)
        return f"{self.model}: {self.settings.tokens} tokens of {names}"

    def png(self, title: str | None = None) -> bytes:
        return plot_png(self.rows, self.correlations, self.settings.kinds, title or self.title())

    def conclusion(self) -> str:
        return conclusion(self.correlations, self.settings.kinds)

    def save_json(self, path: str | os.PathLike[str]) -> None:
        from kappatune.jsonio import json_bytes

        _write(path, ".json", json_bytes(self.to_json()))

    def save_csv(self, path: str | os.PathLike[str]) -> None:
        _write(path, ".csv", self.csv_text().encode("utf-8"))

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> None:
        _write(path, ".png", self.png(title))


def _write(path: str | os.PathLike[str], suffix: str, payload: bytes) -> None:
    from kappatune.outputs import check_file, write_all

    check_file(Path(path), "path", (suffix,))
    write_all([(Path(path), payload)])


# --------------------------------------------------------------------------- run


def run_probe(
    model: str,
    data: Sequence[str | os.PathLike[str]],
    settings: ProbeSettings | None = None,
    *,
    progress: ProbeProgress | None = None,
) -> ProbeReport:
    """Load ``model``, measure kappa and Fisher on ``data`` and correlate them.

    ``model`` is anything :func:`kappatune.load_causal_lm` accepts; ``data`` are text (one
    document per file) or JSONL (a ``text`` field per line) files. Bad input raises
    :class:`~kappatune.errors.KappaTuneError` before any heavy work.
    """
    from kappatune.analysis import fisher
    from kappatune.analysis.spectra import AnalyzeOptions, analyze

    settings = settings or ProbeSettings()
    files = tuple(Path(f) for f in data)
    check_data(files)
    hook = progress or (lambda stage, done, total: None)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    net, examples, stats = fisher.load_model_and_examples(model, files, seq_len=settings.seq_len)
    fisher.plan_examples(examples, fisher.CausalLMObjective(), settings.tokens)  # too little data
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    analysis = analyze(net, AnalyzeOptions(), progress=lambda d, t: hook("kappa", d, t))
    if not analysis.tensors:
        raise KappaTuneError(
            f"the model {model} has no candidate tensors (floating-point, ndim >= 2;"
            f" {len(analysis.skipped)} tensors skipped)"
        )
    timings["kappa"] = time.perf_counter() - start

    start = time.perf_counter()
    results = fisher.compute_fisher(
        net, examples, settings.fisher_options, only=[r.name for r in analysis.tensors],
        progress=lambda d, t: hook("fisher", d, t),
    )  # fmt: skip
    timings["fisher"] = time.perf_counter() - start

    rows = join_rows(analysis, results)
    return ProbeReport(
        model=model, data_files=files, data_stats=dict(stats), settings=settings,
        analysis=analysis, results=results, rows=tuple(rows),
        correlations=correlate(rows, settings),
        spectral=spectral_correlations(analysis, rows, settings), timings=timings,
    )  # fmt: skip
