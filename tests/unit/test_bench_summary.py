import base64
import csv
import io
import json
import math
from pathlib import Path

import pytest

from kappatune.bench import report
from kappatune.bench.store import BaseResult, Metrics, Point, RunResult
from kappatune.bench.summary import mean_std, paired, seed_points, summarize

BASES = {
    "code": BaseResult(
        "code", "b", Metrics({"perplexity": 10.0, "nll": 2.3}, {"perplexity": 20.0}), 100
    ),
    "digits": BaseResult(
        "digits", "b", Metrics({"accuracy": 0.1, "label_nll": 3.0}, {"perplexity": 20.0}), 100
    ),
}
METRICS = {"code": "perplexity", "digits": "accuracy"}


def _run(
    scenario: str, arm: str, seed: int, task: dict, control: float, step: int = 5
) -> RunResult:
    m = Metrics(task, {"perplexity": control})
    pts = (Point("steps", step, 2.0, True, m), Point("loss", step + 1, 1.9, seed == 0, m))
    return RunResult(scenario, arm, seed, "h", 1000 + seed, pts, losses=(3.0, 2.5, 2.0))


RUNS = [
    _run("code", "kappa", 0, {"perplexity": 9.0, "nll": 2.2}, 21.0),
    _run("code", "kappa", 1, {"perplexity": 8.0, "nll": 2.1}, 22.0),
    _run("code", "lora", 0, {"perplexity": 9.5, "nll": 2.25}, 20.0),
    _run("code", "lora", 1, {"perplexity": 9.0, "nll": 2.2}, 20.2),
    _run("digits", "kappa", 0, {"accuracy": 0.4, "label_nll": 1.0}, 20.0),
]


def test_mean_std() -> None:
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    m, s = mean_std([5.0])
    assert m == 5.0 and math.isnan(s)
    assert all(math.isnan(x) for x in mean_std([math.nan]))


def test_summary_against_base() -> None:
    points = seed_points(RUNS, BASES, METRICS)
    rows = summarize(points, BASES, METRICS, ["lora", "kappa"])
    keys = [(r.scenario, r.rule, r.arm) for r in rows]
    assert keys[:3] == [
        ("code", "loss", "base"),
        ("code", "loss", "lora"),
        ("code", "loss", "kappa"),
    ]
    kappa = next(r for r in rows if (r.scenario, r.rule, r.arm) == ("code", "steps", "kappa"))
    assert kappa.task_gain[0] == pytest.approx(15.0)
    assert kappa.task_gain[1] == pytest.approx(math.sqrt(50))
    assert kappa.forgetting[0] == pytest.approx(7.5)
    assert kappa.forgetting[1] == pytest.approx(math.sqrt(12.5))
    assert kappa.trainable_params == 1001 and kappa.seeds == 2
    loss_kappa = next(r for r in rows if (r.scenario, r.rule, r.arm) == ("code", "loss", "kappa"))
    assert loss_kappa.reached == 1 and loss_kappa.steps[0] == 6.0
    digits = next(r for r in rows if (r.scenario, r.rule, r.arm) == ("digits", "steps", "kappa"))
    assert digits.task_gain[0] == pytest.approx(30.0)  # accuracy points
    assert digits.task_nll[0] == 1.0
    base = next(r for r in rows if (r.scenario, r.rule, r.arm) == ("digits", "steps", "base"))
    assert base.task_value[0] == 0.1 and base.forgetting[0] == 0.0


def test_paired_differences_against_kappa() -> None:
    pairs = paired(seed_points(RUNS, BASES, METRICS), "kappa")
    p = next(x for x in pairs if (x.scenario, x.rule, x.arm) == ("code", "steps", "lora"))
    assert p.seeds == 2
    assert p.gain_diff[0] == pytest.approx(-7.5)
    assert p.forgetting_diff[0] == pytest.approx(-7.0)
    assert p.less_forgetting == 0
    assert all(x.scenario == "code" for x in pairs)  # digits has no second arm


def test_reports_hold_the_numbers(tmp_path: Path) -> None:
    points = seed_points(RUNS, BASES, METRICS)
    rows = summarize(points, BASES, METRICS, ["lora", "kappa"])
    pairs = paired(points, "kappa")
    curves = {("code", "kappa"): [[3.0, 2.5]], ("code", "lora"): [[3.0, 2.9]]}
    meta = {"command": "kappatune bench code", "settings": {"steps": 5}}
    files = report.write_report(tmp_path, rows, points, pairs, meta, ["a note"], METRICS, curves)
    names = {f.name for f in files}
    assert names == {
        "gain_vs_forgetting.png", "loss_curves.png", "summary.json", "summary.csv", "seeds.csv",
        "report.md", "report.html",
    }  # fmt: skip
    md = (tmp_path / "report.md").read_text()
    assert "| code | steps | kappa | 1.0k | 5 ± 0 |" in md
    assert "+15.0% ± 7.1%" in md and "+7.50% ± 3.54%" in md
    assert "- a note" in md and "kappatune bench code" in md
    html = (tmp_path / "report.html").read_text()
    png = (tmp_path / "gain_vs_forgetting.png").read_bytes()
    assert png.startswith(b"\x89PNG") and base64.b64encode(png).decode() in html
    table = list(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert len(table) == len(rows)
    seeds = list(csv.DictReader(io.StringIO((tmp_path / "seeds.csv").read_text())))
    assert len(seeds) == 2 * len(RUNS)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["kind"] == "kappatune.bench.summary" and len(data["paired"]) == len(pairs)
    table_text = report.markdown_table(rows)
    assert table_text.count("\n") == len(rows) + 2
