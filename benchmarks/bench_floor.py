"""How many control rows `kappatune bench` needs for a noise floor below 1 % control perplexity.

On Gemma 3 270M and the built-in ``code`` scenario, with the cpu preset's settings (``--preset
cpu``: 8 steps, batch 4, 64-token rows), this

* builds the control set at the largest size asked for, once per row length (64 and 256 tokens);
* scores every control row once with the base model and with one KappaTune run (the bench's own
  ``train_one``, seed 0, the arm's usual learning rate, evaluated at the preset's checkpoints):
  per-row NLL sums only (no KL, whose 262k-token vocabulary is the expensive part);
* takes nested, evenly spaced subsets of that one draw (24, 64, 128, 256 rows ...) and computes,
  with the bench's own functions, the base model's floor (``fronts.ppl_noise_floor``: which text
  was drawn) and the paired floor of a control perplexity change (``fronts.paired_ppl_noise``:
  base and tuned model on the same resamples; the floor 'within noise' uses, as the median over
  the points).

    python benchmarks/bench_floor.py [--sizes 24,64,128,256] [--long-sizes 24,64,128]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from kappatune.bench.config import BenchSettings
    from kappatune.bench.store import Metrics

RESULTS = Path(__file__).parent / "results"
TARGET = 1.0  # % control perplexity: the floor the default sizes must stay below


@dataclass(frozen=True)
class FloorRow:
    """The floors of one control-set size: the first ``rows`` of an evenly spaced subset."""

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
    """The floors of nested subsets of one scored draw: for each size (ascending, sizes above
    the draw dropped), the rows ``evenly(len(draw), size)`` of it."""
    import math

    from kappatune.bench.fronts import paired_ppl_noise, ppl_noise_floor
    from kappatune.bench.tokenized import evenly

    out = []
    for k in sorted(s for s in set(sizes) if s <= len(base_nlls)):
        idx = evenly(len(base_nlls), k)
        b = [base_nlls[i] for i in idx]
        n = [tokens[i] for i in idx]
        changes, paired = [], []
        for name, nlls in tuned.items():
            t = [nlls[i] for i in idx]
            changes.append((name, math.expm1((sum(t) - sum(b)) / sum(n)) * 100))
            paired.append((name, paired_ppl_noise(b, t, n, resamples)))
        out.append(
            FloorRow(
                seq_len,
                k,
                sum(n),
                math.exp(sum(b) / sum(n)),
                ppl_noise_floor(b, n, resamples),
                tuple(changes),
                tuple(paired),
            )
        )
    return out


def smallest_below(rows: Sequence[FloorRow], target: float = TARGET) -> int | None:
    """The fewest rows whose median paired floor is below ``target`` (None: none is)."""
    below = [r.rows for r in rows if r.paired_median < target]
    return min(below) if below else None


# --------------------------------------------------------------------------- the measurement


def cpu_settings(arm: str) -> BenchSettings:
    """``kappatune bench --preset cpu --arms ARM``'s settings, read through the CLI itself."""
    from kappatune.cli.bench import add_parser, resolve, settings_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return settings_from_args(
        resolve(parser.parse_args(["bench", "--preset", "cpu", "--arms", arm]))
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    from kappatune.bench.evaluate import ControlResult, control_eval
    from kappatune.bench.run import Evaluator, QuietReporter, load_model, train_one
    from kappatune.bench.scenarios import builtin_scenario
    from kappatune.bench.store import Metrics, ResultStore
    from kappatune.bench.tokenized import prepare
    from kappatune.jsonio import atomic_write_json, atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_ints, default=[24, 64, 128, 256], help="rows, 64 tokens")
    ap.add_argument("--long-sizes", type=_ints, default=[24, 64, 128], help="rows, 256 tokens")
    ap.add_argument("--long-seq-len", type=int, default=256)
    ap.add_argument("--arm", default="kappa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_floor")
    args = ap.parse_args()

    settings = cpu_settings(args.arm)
    short = settings.sizes.seq_len
    wanted = {short: args.sizes, args.long_seq_len: args.long_sizes}
    times: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(settings.model, settings)
    times["load + analyze (s)"] = time.perf_counter() - start
    scenario = builtin_scenario("code")
    data = scenario.load()
    prepared = {}
    for length, sizes in wanted.items():
        eval_sizes = dataclasses.replace(
            settings.sizes, seq_len=length, control_sequences=max(sizes)
        )
        prepared[length] = prepare(scenario, data, loaded.tokenizer, eval_sizes)
    # about the same tokens per forward pass at every row length
    batch = {n: max(1, settings.eval_batch_size * short // n) for n in wanted}

    def score(model: nn.Module, length: int) -> ControlResult:
        p = prepared[length]
        began = time.perf_counter()
        res = control_eval(model, p.control, pad_id=p.pad_id, batch_size=batch[length])
        times[f"score {len(p.control)} rows of {length} ({sum(res.tokens)} tokens) (s)"] = (
            time.perf_counter() - began
        )
        return res

    base = {n: score(loaded.model, n) for n in wanted}
    scored: list[dict[int, ControlResult]] = []

    @dataclass
    class ControlOnly(Evaluator):
        """The bench's evaluator, scoring only the control rows at every row length."""

        def __call__(self, model: nn.Module) -> Metrics:
            res = {n: score(model, n) for n in wanted}
            scored.append(res)
            ppl = res[short].perplexity
            return Metrics(task={}, control={"perplexity": ppl.perplexity, "nll": ppl.mean_nll},
                           control_nlls=res[short].nll_sums)  # fmt: skip

    arm = settings.arm(args.arm)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = train_one(loaded, ControlOnly(prepared[short], batch[short], None, ()), arm,
                        args.seed, settings, None, QuietReporter(), ResultStore(tmp), "floor",
                        None)  # fmt: skip
    times[f"train {settings.steps} steps + evaluate (s)"] = time.perf_counter() - began
    names = [f"{arm.name} lr {arm.lr:g} step {p.step}" for p in run.points]
    rows: list[FloorRow] = []
    for n in wanted:
        tuned = {name: res[n].nll_sums for name, res in zip(names, scored, strict=True)}
        rows += floor_rows(
            n, base[n].nll_sums, tuned, base[n].tokens, wanted[n], settings.bootstrap
        )

    command = shlex.join(["python", "benchmarks/bench_floor.py", *sys.argv[1:]])
    text = render(rows, names, times, settings, command, short)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".md"), text)
    atomic_write_json(args.out.with_suffix(".json"), {
        "command": command, "times": times, "resamples": settings.bootstrap,
        "smallest_below_1pct": {str(n): smallest_below([r for r in rows if r.seq_len == n])
                                for n in wanted},
        "rows": [dataclasses.asdict(r) | {"paired_median": r.paired_median} for r in rows],
    })  # fmt: skip
    return 0


def render(
    rows: Sequence[FloorRow],
    names: Sequence[str],
    times: Mapping[str, float],
    settings: BenchSettings,
    command: str,
    short: int,
) -> str:
    head = ["row tokens", "rows", "tokens", "base ppl", "base floor"]
    head += [f"change, {n}" for n in names] + [f"paired floor, {n}" for n in names]
    head += ["paired floor, median"]
    lines = [
        "# Noise floor of `kappatune bench`'s control perplexity against the control-set size",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()},"
        f" {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Model {settings.model}, scenario code, control text builtin:python-docs-prose;"
        f" tuned: `--preset cpu` ({settings.steps} steps, batch {settings.batch_size},"
        f" {short}-token training rows), seed 0; {settings.bootstrap} bootstrap resamples."
        " Floors are half-widths of 95 % bands, in % of perplexity; the subsets are nested and"
        " evenly spaced in one scored draw.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [str(r.seq_len), str(r.rows), str(r.tokens), f"{r.base_ppl:.2f}",
                 f"±{r.base_floor:.2f} %"]  # fmt: skip
        cells += [f"{v:+.2f} %" for _, v in r.changes] + [f"±{v:.2f} %" for _, v in r.paired]
        cells.append(f"±{r.paired_median:.2f} %")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for n in sorted({r.seq_len for r in rows}):
        mine = [r for r in rows if r.seq_len == n]
        least = smallest_below(mine)
        measured = ", ".join(str(r.rows) for r in mine)
        lines.append(
            f"- {n}-token rows: the paired floor (median over the tuned points) is below"
            f" {TARGET:g} % from {least} rows on." if least is not None else
            f"- {n}-token rows: no measured size ({measured}) has a paired floor below {TARGET:g} %."
        )  # fmt: skip
    lines += ["", "| time | s |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in times.items()]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
