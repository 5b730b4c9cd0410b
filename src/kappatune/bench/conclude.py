"""From a benchmark's raw outcome to its answer: points against the base, summary rows, noise
floors, verdicts per scenario and forgetting measure, the one-line conclusion, and the report
files. Pure but for :func:`write`; reachable from Python without the command line::

    outcome = run_bench(scenarios, settings, "out")
    c = conclude(outcome, settings)
    write(c, "out", meta={"command": "..."})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kappatune.bench import summary, verdict

if TYPE_CHECKING:
    from kappatune.bench.config import BenchSettings
    from kappatune.bench.run import Outcome
    from kappatune.bench.summary import ArmSummary, SeedPoint
    from kappatune.bench.verdict import MeasureVerdict


def reference_arm(settings: BenchSettings) -> str:
    """The arm every other is compared with: ``settings.reference`` when it runs, else the
    first arm."""
    return settings.reference if settings.reference in settings.arms else settings.arms[0]


@dataclass(frozen=True)
class Conclusion:
    points: tuple[SeedPoint, ...]
    rows: tuple[ArmSummary, ...]
    floors: dict[str, dict[str, float]]
    verdicts: tuple[MeasureVerdict, ...]
    line: str  # the one-line conclusion
    metrics: Mapping[str, str]  # scenario -> task metric
    notes: tuple[str, ...]
    curves: dict[tuple[str, str], list[list[float]]] = field(default_factory=dict)


def conclude(outcome: Outcome, settings: BenchSettings) -> Conclusion:
    points = summary.seed_points(outcome.runs, outcome.bases, outcome.metrics)
    rows = summary.summarize(points, outcome.bases, outcome.metrics, settings.arms)
    floors = verdict.with_change_floors(
        points,
        {
            name: {
                **b.floors,
                "control_rows": float(len(b.control_tokens)),
                "control_tokens": float(sum(b.control_tokens)),
            }
            for name, b in outcome.bases.items()
        },
    )
    vs = verdict.verdicts(points, floors, settings.arms, settings.forgetting_budget,
                          settings.bootstrap, reference_arm(settings))  # fmt: skip
    curves: dict[tuple[str, str], list[list[float]]] = {}
    for r in outcome.runs:
        curves.setdefault((r.scenario, r.arm), []).append(list(r.losses))
    return Conclusion(
        tuple(points), tuple(rows), floors, tuple(vs), verdict.one_line(vs), outcome.metrics,
        tuple(outcome.notes), curves,
    )  # fmt: skip


def write(c: Conclusion, out_dir: str | Path, meta: Mapping[str, Any]) -> list[Path]:
    """``bench.json`` (``meta``: the command, settings and scenarios) and every report file."""
    from kappatune.bench import report
    from kappatune.jsonio import atomic_write_json

    out = Path(out_dir)
    atomic_write_json(out / "bench.json", dict(meta))
    return [
        out / "bench.json",
        *report.write_report(
            out, c.rows, c.points, c.verdicts, meta, list(c.notes), c.metrics, c.floors, c.line,
            c.curves,
        ),
    ]  # fmt: skip


def console_lines(c: Conclusion) -> Sequence[str]:
    """What the command prints under its table: floors, notes and the verdict's sentences."""
    from kappatune.bench import report

    return [*report.floor_lines(c.floors), *c.notes, *report.verdict_text(c.verdicts, c.metrics)]
