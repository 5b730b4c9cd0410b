"""How many control rows `kappatune bench` needs for a noise floor below 1 % control perplexity.

On Gemma 3 270M and the built-in ``code`` scenario, with the cpu preset's settings (``--preset
cpu``: 8 steps, batch 4, 64-token training rows), this

* trains one KappaTune run with the bench's own ``train_one`` (seed 0, the arm's usual learning
  rate, the preset's 8 steps) and, at its end, scores control rows with the base and the tuned
  model: per-row NLL sums only (the bench's ``control_eval`` without the KL, whose 262k-token
  vocabulary is the expensive part);
* draws the control set once per row length (64 and 256 tokens) at the largest size asked for,
  as the bench picks it (evenly spaced in the control text), and scores it in stages of nested
  subsets spread evenly over that draw (24, 64, 128, 256 rows ...), stopping at a wall-time
  budget: sizes not reached are reported as such;
* computes, with the bench's own functions, the base model's floor (``fronts.ppl_noise_floor``:
  which text was drawn) and the paired floor of the control perplexity change
  (``fronts.paired_ppl_noise``: base and tuned model on the same resamples; the floor 'within
  noise' uses, there as the median over the points).

    python benchmarks/bench_floor.py [--stages 64:24,64:64,64:128,256:24,64:256,256:64]
                                     [--budget-minutes 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from kappatune.bench.config import BenchSettings
    from kappatune.bench.evaluate import EvalSequence
    from kappatune.bench.store import Metrics

RESULTS = Path(__file__).parent / "results"
TARGET = 1.0  # % control perplexity: the floor the default sizes must stay below
STAGES = "64:24,64:64,64:128,256:24,64:256,256:64,256:128"


def spread_order(n: int) -> list[int]:
    """``range(n)`` in bit-reversed order: every prefix of 2**m indices is evenly spaced, so
    the first k of them are a nested subset spread over the whole range."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))


@dataclass(frozen=True)
class FloorRow:
    """The floors of the first ``rows`` scored control rows."""

    seq_len: int
    rows: int
    tokens: int
    base_ppl: float
    base_floor: float  # % perplexity, base model over resamples of the rows
    changes: tuple[tuple[str, float], ...]  # tuned point -> control perplexity change, %
    paired: tuple[tuple[str, float], ...]  # tuned point -> paired floor of that change, %

    @property
    def paired_median(self) -> float:
        return statistics.median(v for _, v in self.paired)


def floor_rows(
    seq_len: int,
    base_nlls: Sequence[float],
    tuned: Mapping[str, Sequence[float]],
    tokens: Sequence[int],
    sizes: Sequence[int],
    resamples: int = 1000,
) -> list[FloorRow]:
    """The floors of the first ``k`` rows for each size ``k`` (ascending; sizes above the rows
    scored are dropped). Rows come in nested order (see :func:`spread_order`)."""
    from kappatune.bench.fronts import paired_ppl_noise, ppl_noise_floor

    out = []
    for k in sorted(s for s in set(sizes) if s <= len(base_nlls)):
        b, n = list(base_nlls[:k]), list(tokens[:k])
        changes, paired = [], []
        for name, nlls in tuned.items():
            t = list(nlls[:k])
            changes.append((name, math.expm1((sum(t) - sum(b)) / sum(n)) * 100))
            paired.append((name, paired_ppl_noise(b, t, n, resamples)))
        floor = ppl_noise_floor(b, n, resamples)
        ppl = math.exp(sum(b) / sum(n))
        out.append(FloorRow(seq_len, k, sum(n), ppl, floor, tuple(changes), tuple(paired)))
    return out


def smallest_below(rows: Sequence[FloorRow], target: float = TARGET) -> int | None:
    """The fewest rows whose median paired floor is below ``target`` (None: none is)."""
    below = [r.rows for r in rows if r.paired_median < target]
    return min(below) if below else None


def rows_for(floor: float, rows: int, target: float = TARGET) -> int:
    """Rows a floor measured on ``rows`` rows would need to fall to ``target``, if it shrinks
    as 1/sqrt(rows) (an extrapolation, reported as one)."""
    return math.ceil(rows * (floor / target) ** 2)


# --------------------------------------------------------------------------- the measurement


def cpu_settings(arm: str) -> BenchSettings:
    """``kappatune bench --preset cpu --arms ARM``'s settings, read through the CLI itself."""
    from kappatune.cli.bench import add_parser, resolve, settings_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--preset", "cpu", "--arms", arm])
    return settings_from_args(resolve(args))


def parse_stages(text: str) -> list[tuple[int, int]]:
    """``"64:24,256:8"`` -> ``[(64, 24), (256, 8)]`` (row length, rows)."""
    out = []
    for part in text.split(","):
        length, _, rows = part.partition(":")
        out.append((int(length), int(rows)))
    return out


@dataclass
class Scored:
    """Per-row NLL sums of the base and the tuned model on the first rows of one draw."""

    base: list[float] = field(default_factory=list)
    tuned: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0


def score_stages(
    base: nn.Module,
    tuned: nn.Module,
    draws: Mapping[int, Sequence[EvalSequence]],
    stages: Sequence[tuple[int, int]],
    pad_id: int,
    batch: Mapping[int, int],
    deadline: float,
    on_stage: Callable[[dict[int, Scored], list[tuple[int, int]]], None] | None = None,
) -> tuple[dict[int, Scored], list[tuple[int, int]]]:
    """Score the rows each stage adds, in order, with both models; skip a stage whose
    estimated time (from the rate so far) would pass ``deadline``. Returns the scores and
    the stages skipped; ``on_stage`` gets them after each stage scored (the stages still to
    come counted as skipped), so an interrupted measurement keeps what it finished."""
    from kappatune.bench.evaluate import control_eval

    scored = {n: Scored() for n in draws}
    skipped: list[tuple[int, int]] = []
    done_tokens, spent = 0, 0.0
    for i, (length, rows) in enumerate(stages):
        s, draw = scored[length], draws[length]
        new = draw[len(s.base) : min(rows, len(draw))]
        need = sum(len(x.ids) - 1 for x in new)
        rate = done_tokens / spent if spent else math.inf
        if time.perf_counter() + 2 * need / rate > deadline:
            skipped.append((length, rows))
            continue
        began = time.perf_counter()
        for model, into in ((base, s.base), (tuned, s.tuned)):
            res = control_eval(model, new, pad_id=pad_id, batch_size=batch[length]) if new else None
            into.extend(res.nll_sums if res else ())
            if model is base and res is not None:
                s.tokens.extend(res.tokens)
        took = time.perf_counter() - began
        s.seconds += took
        spent += took
        done_tokens += 2 * need
        if on_stage is not None:
            on_stage(scored, [*skipped, *stages[i + 1 :]])
    return scored, skipped


def main() -> int:
    from kappatune.bench.run import Evaluator, QuietReporter, load_model, train_one
    from kappatune.bench.scenarios import builtin_scenario
    from kappatune.bench.store import Metrics, ResultStore
    from kappatune.bench.tokenized import prepare
    from kappatune.jsonio import atomic_write_json, atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--stages",
        type=parse_stages,
        default=parse_stages(STAGES),
        help=f"ROW_TOKENS:ROWS,... scored in this order (default {STAGES})",
    )
    ap.add_argument(
        "--budget-minutes",
        type=float,
        default=20.0,
        help="wall time for the scoring, after loading and training",
    )
    ap.add_argument("--arm", default="kappa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_floor")
    args = ap.parse_args()  # fmt: skip

    started = time.perf_counter()
    settings = dataclasses.replace(cpu_settings(args.arm), checkpoints=1)  # one point: the end
    short = settings.sizes.seq_len
    largest: dict[int, int] = {}
    for length, k in args.stages:
        largest[length] = max(k, largest.get(length, 0))
    loaded = load_model(settings.model, settings)
    scenario = builtin_scenario("code")
    data = scenario.load()
    draws = {}
    for length, k in largest.items():
        sizes = dataclasses.replace(settings.sizes, control_seq_len=length, control_sequences=k)
        control = prepare(scenario, data, loaded.tokenizer, sizes).control
        draws[length] = tuple(control[i] for i in spread_order(len(control)))
    prepared = prepare(scenario, data, loaded.tokenizer, settings.sizes)
    batch = {n: max(1, settings.eval_batch_size * short // n) for n in largest}
    arm = settings.arm(args.arm)
    name = f"{arm.name} lr {arm.lr:g} step {settings.steps}"
    command = shlex.join(["python", "benchmarks/bench_floor.py", *sys.argv[1:]])
    drawn = {n: len(d) for n, d in sorted(draws.items())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text: list[str] = []

    def write(scored: dict[int, Scored], skipped: list[tuple[int, int]], trained: float) -> None:
        rows: list[FloorRow] = []
        for length, s in sorted(scored.items()):
            wanted = [min(k, drawn[length]) for n, k in args.stages if n == length]
            rows += floor_rows(length, s.base, {name: s.tuned}, s.tokens, wanted,
                               settings.bootstrap)  # fmt: skip
        times = {
            "load, prepare, train (s)": trained - started,
            **{f"score {len(s.base)} rows of {n} tokens, both models (s)": s.seconds
               for n, s in sorted(scored.items())},
        }  # fmt: skip
        text[:] = [render(rows, skipped, drawn, times, settings, command, scenario.control.source)]
        atomic_write_text(args.out.with_suffix(".md"), text[0])
        atomic_write_json(args.out.with_suffix(".json"), {
            "command": command, "control": scenario.control.source, "times": times, "resamples": settings.bootstrap, "tuned": name,
            "skipped": [f"{n}:{k}" for n, k in skipped],
            "drawn": {str(n): k for n, k in drawn.items()},
            "smallest_below_1pct": {str(n): smallest_below([r for r in rows if r.seq_len == n])
                                    for n in sorted(scored)},
            "rows": [dataclasses.asdict(r) | {"paired_median": r.paired_median} for r in rows],
        })  # fmt: skip

    @dataclass
    class ScoreAtEnd(Evaluator):
        """Scores the control stages with the base and the tuned model at the run's end,
        writing the results after each stage."""

        def __call__(self, model: nn.Module) -> Metrics:
            trained = time.perf_counter()
            deadline = trained + args.budget_minutes * 60
            scored, skipped = score_stages(
                loaded.model, model, draws, args.stages, prepared.pad_id, batch, deadline,
                lambda sc, sk: write(sc, sk, trained),
            )  # fmt: skip
            write(scored, skipped, trained)
            return Metrics(task={}, control={})  # the scores went to the results files

    evaluator = ScoreAtEnd(prepared, batch[short], None, ())
    with tempfile.TemporaryDirectory() as tmp:
        train_one(loaded, evaluator, arm, args.seed, settings, None, QuietReporter(),
                  ResultStore(tmp), "floor", None)  # fmt: skip
    print(text[0])
    return 0


def render(
    rows: Sequence[FloorRow],
    skipped: Sequence[tuple[int, int]],
    drawn: Mapping[int, int],
    times: Mapping[str, float],
    settings: BenchSettings,
    command: str,
    control: str,
) -> str:
    names = [n for n, _ in rows[0].paired] if rows else []
    head = ["row tokens", "rows", "tokens", "base ppl", "base floor"]
    head += [f"change, {n}" for n in names] + [f"paired floor, {n}" for n in names]
    lines = [
        "# Noise floor of `kappatune bench`'s control perplexity against the control-set size",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()},"
        f" {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Model {settings.model}, scenario code, control text {control}; tuned"
        f" model: one `--preset cpu` run ({settings.steps} steps, batch {settings.batch_size},"
        f" {settings.sizes.seq_len}-token training rows), seed 0. Floors: half-widths of 95 %"
        f" bootstrap bands ({settings.bootstrap} resamples), in % of perplexity. The rows of"
        " each size are the first of one draw in an evenly spread order (nested subsets); the draws: "
        + ", ".join(f"{k} rows of {n} tokens" for n, k in drawn.items())
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [str(r.seq_len), str(r.rows), str(r.tokens), f"{r.base_ppl:.2f}",
                 f"±{r.base_floor:.2f} %"]  # fmt: skip
        cells += [f"{v:+.2f} %" for _, v in r.changes] + [f"±{v:.2f} %" for _, v in r.paired]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in sorted({r.seq_len for r in rows}):
        mine = [r for r in rows if r.seq_len == n]
        least, last = smallest_below(mine), mine[-1]
        if least is not None:
            lines.append(f"- {n}-token rows: paired floor below {TARGET:g} % from {least} rows on.")
        else:
            lines.append(
                f"- {n}-token rows: no measured size has a paired floor below {TARGET:g} %;"
                f" shrinking as 1/sqrt(rows) from {last.rows} rows it would need about"
                f" {rows_for(last.paired_median, last.rows)} (extrapolated, not measured)."
            )
    if skipped:
        shown = ", ".join(f"{k} rows of {n} tokens" for n, k in skipped)
        lines.append(f"- Not measured within the time budget: {shown}.")
    lines += ["", "| time | s |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in times.items()]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
