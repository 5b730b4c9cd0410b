"""``kappatune bench``: does KappaTune forget less? Scenarios x arms x seeds, with controls."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kappatune.cli.command import add_command
from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from tqdm import tqdm

    from kappatune.bench.run import BenchSettings
    from kappatune.bench.scenarios import Scenario
    from kappatune.bench.store import RunResult

EPILOG = """examples:
  kappatune bench --preset cpu                     # gemma-3-270m, 4 arms x 3 lrs x 3 seeds, code (~2.5 h, 2 cores)
  kappatune bench --preset cpu-long code           # 256-step runs, 5 checkpoints each (resumable)
  kappatune bench --preset gpu --device cuda       # every arm, 5 lrs, longer runs, larger evaluations
  kappatune bench code --lr-grid full=1e-5,3e-5,1e-4 kappa=3e-5,1e-4,3e-4 --checkpoints 4
  kappatune bench --config configs/bench-example.yaml --model ./my-model --knowledge my-mc.jsonl
  kappatune bench --train train.jsonl --heldout test.jsonl --control builtin:gcide-definitions \\
      --task-metric accuracy --options negative positive --template "{text}\\nSentiment: "

Each arm trains at several learning rates (default 3 over 10x around its usual rate) and is
evaluated at --checkpoints points of each run. Forgetting is measured three ways against the base
model: control perplexity, KL divergence on the control text, and general-knowledge questions
(built from Debian's dict-elements and dict-gcide, or --knowledge FILE.jsonl with lines
{"question": ..., "options": [...], "answer": ...}). The report compares arms on their
learning/forgetting fronts at a matched task gain.
Results are saved per (arm, lr, seed) after each checkpoint: rerun the same command to resume.
"""


def _defaults() -> dict[str, Any]:
    """The flags' built-in values (:class:`BenchSettings`' defaults); the arms stay unset, so
    the canonical command keeps meaning "the default arms"."""
    from kappatune.bench.config import BenchSettings, EvalSizes
    from kappatune.settings import flag_defaults

    return {**flag_defaults(BenchSettings), **flag_defaults(EvalSizes), "arms": None}


# Built-in defaults, then presets: a flag given on the command line always wins.
PRESETS: dict[str, dict[str, Any]] = {
    # 4 arms x 3 lrs x 3 seeds = 36 runs of 8 steps, each evaluated twice: 210-250 s a run on a
    # quiet 2-core CPU, about 2.5 h in all; an evaluation is ~75 s, ~55 of them the control's
    # 6120 tokens over a 262k vocabulary, what a paired floor under 1 % takes
    # (benchmarks/results/bench_cpu_gcide/RUN.md: the runs' timings)
    "cpu": {
        "scenarios": ["code"], "model": "gemma-3-270m", "arms": ["full", "lora", "kappa", "random"],
        "seeds": [0, 1, 2], "steps": 8, "checkpoints": 2, "lr_count": 3, "seq_len": 64,
        "batch_size": 4, "eval_batch_size": 8, "task_sequences": 12, "control_sequences": 24,
        "control_seq_len": 256, "knowledge_questions": 400, "kl_cache_mb": 6400.0,
    },
    # the long-run verdict: 256 steps (65,536 training tokens) per run, evaluated at 16, 32, 64,
    # 128 and 256 steps, each arm at two rates: its cpu-grid lowest and 1/sqrt(10) of it (at 8
    # steps the lowest rates gave every arm's best points; the lower one reaches the matched gain
    # only late). 5 arms x 2 lrs x 3 seeds x 2 scenarios = 60 runs, 12-30 min each on 2 cores:
    # it resumes per checkpoint (--keep-state), so spread it over sittings.
    "cpu-long": {
        "scenarios": ["code", "digits"], "model": "gemma-3-270m",
        "arms": ["full", "lora", "kappa", "corda-kpm", "osf"], "seeds": [0, 1, 2],
        "steps": 256, "checkpoints": 5, "checkpoint_at": [16, 32, 64, 128, 256],
        "lr_grid": ["full=1e-06,3.16e-06", "lora=3e-05,9.49e-05", "kappa=1e-05,3.16e-05",
                    "corda-kpm=2e-06,6.32e-06", "osf=5e-06,1.58e-05"],
        "keep_state": True, "seq_len": 64, "batch_size": 4, "eval_batch_size": 8,
        "task_sequences": 12, "control_sequences": 24, "control_seq_len": 256,
        "knowledge_questions": 400, "kl_cache_mb": 6400.0,
    },
    # one GPU: every arm, 5 learning rates over 30x, longer runs, larger evaluation sets
    "gpu": {
        "scenarios": ["code", "digits"], "model": "gemma-3-270m",
        "arms": ["full", "lora", "kappa", "kappa-lora", "random", "highest", "fisher"],
        "seeds": [0, 1, 2], "steps": 200, "checkpoints": 5, "lr_count": 5, "seq_len": 256,
        "control_seq_len": 256,
        "batch_size": 16, "eval_batch_size": 16, "task_sequences": 256, "task_examples": 500,
        "control_sequences": 512, "knowledge_questions": 1000, "fisher_tokens": 16384,
        "device": "cuda",
    },
}  # fmt: skip


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every unset flag from the preset (if any), then from the settings' defaults."""
    preset = PRESETS[args.preset] if args.preset else {}
    out = argparse.Namespace(**vars(args))
    for dest, value in _defaults().items():
        if getattr(out, dest, None) is None:
            setattr(out, dest, preset.get(dest, value))
    if not out.scenarios and not out.config and not out.train and "scenarios" in preset:
        out.scenarios = list(preset["scenarios"])
    return out


def _grid(values: Sequence[str], arms: Sequence[str]) -> list[tuple[str, tuple[float, ...]]]:
    """``["1e-4,3e-4", "full=1e-5,3e-5"]`` -> per-arm grids (an unnamed grid is for every arm)."""
    everyone: tuple[float, ...] | None = None
    named: list[tuple[str, tuple[float, ...]]] = []
    for v in values:
        arm, eq, raw = v.rpartition("=")
        try:
            grid = tuple(float(x) for x in raw.split(",") if x.strip())
        except ValueError:
            raise KappaTuneError(
                f"cannot read --lr-grid {v!r}: use ARM=LR,LR,... or LR,LR,..."
            ) from None
        if not grid:
            raise KappaTuneError(f"--lr-grid {v!r}: no learning rate given")
        if eq:
            named.append((arm.strip(), grid))
        else:
            everyone = grid
    if everyone is not None:
        given = {a for a, _ in named}
        named = [(a, everyone) for a in arms if a not in given] + named
    return named


def _arms_help() -> str:
    """The registered arms (--arms), with what each trains; the default ones marked."""
    from kappatune.bench.arms import arm_names, get_arm
    from kappatune.bench.config import DEFAULT_ARMS

    width = max(map(len, arm_names()))
    lines = [f"  {n:<{width}}  {'*' if n in DEFAULT_ARMS else ' '} {get_arm(n).description}"
             for n in arm_names()]  # fmt: skip
    return "arms (* = default):\n" + "\n".join(lines) + "\n"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "bench",
        help="forgetting benchmark: KappaTune against full FT, LoRA, random and highest-kappa",
        description="Fine-tune each arm at several learning rates on a new task and measure what it"
        " learned (held-out task metric) and what it forgot (control perplexity, KL from the base"
        " model, general-knowledge questions), against the untouched base model; compare arms on"
        " their learning/forgetting fronts at a matched task gain.",
        epilog=EPILOG + _arms_help(),
    )
    from kappatune.bench.scenarios import BUILTIN_SCENARIOS, TASK_METRICS

    add = p.add_argument
    add(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"built-in scenarios: {', '.join(BUILTIN_SCENARIOS)} (default: all of them)",
    )
    add(
        "--preset",
        choices=tuple(PRESETS),
        help="cpu: about 2.5 h on a quiet 2-core CPU; cpu-long: 256-step runs, about 20 h,"
        " resumable; gpu: the full grid on one GPU",
    )
    add("--config", type=Path, help="YAML/JSON file describing scenarios")
    from kappatune.bench.config import BenchSettings, EvalSizes
    from kappatune.settings import add_flags

    add_flags(p, BenchSettings, defaults=False)  # unset flags come from --preset, then defaults
    add_flags(p, EvalSizes, defaults=False)
    add(
        "--output",
        type=Path,
        default=Path("kappatune-bench"),
        help="results directory (default ./kappatune-bench)",
    )
    g = p.add_argument_group("a scenario from flags")
    g.add_argument("--name", default="custom", help="scenario name (default custom)")
    g.add_argument(
        "--train",
        help="task training data: file, directory, builtin:NAME or hf:NAME[/CONFIG]:SPLIT",
    )
    g.add_argument("--heldout", help="task held-out data")
    g.add_argument("--control", help="control data (what the model should not forget)")
    g.add_argument("--task-metric", choices=TASK_METRICS, default=TASK_METRICS[0])
    g.add_argument("--options", nargs="+", default=[], help="label options of an accuracy task")
    g.add_argument(
        "--template", help="prompt template of label records (default '{text}\\nLabel: ')"
    )
    p.set_defaults(run=run)


def scenarios_from_args(args: argparse.Namespace) -> tuple[Scenario, ...]:
    from kappatune.bench.scenarios import (
        BUILTIN_SCENARIOS,
        builtin_scenario,
        load_config,
        scenario_from_mapping,
    )

    out: list[Scenario] = [builtin_scenario(n) for n in args.scenarios]
    if args.config is not None:
        out.extend(load_config(args.config))
    flags = (args.train, args.heldout, args.control)
    if any(flags):
        if not all(flags):
            raise KappaTuneError("a scenario from flags needs --train, --heldout and --control")
        spec: dict[str, Any] = {
            "name": args.name,
            "train": args.train,
            "heldout": args.heldout,
            "control": args.control,
            "task_metric": args.task_metric,
            "options": list(args.options),
        }
        if args.template is not None:
            spec["template"] = args.template
        out.append(scenario_from_mapping(spec, None))
    elif args.options or args.template:
        raise KappaTuneError(
            "--options/--template describe a scenario from flags: add --train, --heldout, --control"
        )
    if not out:
        out = list(BUILTIN_SCENARIOS.values())
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KappaTuneError(f"scenario(s) given twice: {', '.join(dupes)}")
    return tuple(out)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Settings from resolved arguments (see :func:`resolve`)."""
    from kappatune.bench.config import DEFAULT_ARMS, BenchSettings, EvalSizes
    from kappatune.settings import from_args

    arms = tuple(args.arms) if args.arms else DEFAULT_ARMS
    warm_all: str | None = None
    warmups: list[tuple[str, int]] = []
    for v in args.warmup:
        arm, eq, raw = v.rpartition("=")
        try:
            if eq:
                warmups.append((arm.strip(), int(raw)))
            else:
                warm_all = str(int(v))
        except ValueError:
            raise KappaTuneError(f"cannot read --warmup {v!r}: use N or ARM=N") from None
    if warm_all is not None:
        warmups = [(a, int(warm_all)) for a in arms if a not in dict(warmups)] + warmups
    return from_args(
        BenchSettings,
        args,
        arms=arms,
        lr_grid=tuple(_grid(args.lr_grid, arms)),
        warmups=tuple(warmups),
        sizes=from_args(EvalSizes, args),
    )


_SCENARIO_FLAGS = ("output", "name", "train", "heldout", "control", "task_metric", "options",
                   "template")  # fmt: skip


def canonical_command(args: argparse.Namespace) -> str:
    """The command with every setting spelled out (what reproduces this run, preset resolved)."""
    words = ["kappatune", "bench", *args.scenarios]
    for dest in ("config", *_defaults(), *_SCENARIO_FLAGS):
        value = getattr(args, dest, None)
        if value is None or value == [] or value is False:  # False: a switch left off
            continue
        words.append("--" + dest.replace("_", "-"))
        if value is True:
            continue
        if isinstance(value, list):
            words.extend(str(v) for v in value)
        else:
            words.append(str(value))
    return shlex.join(words)


class BarReporter:
    """tqdm progress: one bar per training run, messages above it. Not on a terminal (a log
    file, CI), plain lines instead: one when a run starts, one every eighth of it, one when it
    ends."""

    def __init__(self, total_runs: int, plain: bool | None = None) -> None:
        self.total = total_runs
        self.done = 0
        self.bar: tqdm | None = None
        self.plain = not sys.stderr.isatty() if plain is None else plain
        self.horizon = 0
        self.label = ""

    def message(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"kappatune: {text}", file=sys.stderr)

    def run_started(self, scenario: str, arm: str, lr: float, seed: int, horizon: int) -> None:
        from tqdm import tqdm

        self.horizon = horizon
        self.label = f"[{self.done + 1}/{self.total}] {scenario} {arm} lr {lr:g} seed {seed}"
        if self.plain:
            self.message(f"{self.label}: training {horizon} steps")
            return
        self.bar = tqdm(
            total=horizon,
            desc=f"[{self.done + 1}/{self.total}] {scenario} {arm} lr {lr:g} seed {seed}",
            unit="step",
            file=sys.stderr,
            leave=False,
        )

    def step(self, step: int, loss: float) -> None:
        if self.plain:
            every = max(1, self.horizon // 8)
            if step % every == 0 or step == self.horizon:
                self.message(f"{self.label}: step {step}/{self.horizon}, loss {loss:.3f}")
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.refresh()

    def run_finished(self, result: RunResult, reused: bool) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        how = "reused" if reused else f"{result.seconds:.0f} s"
        steps = ", ".join(str(p.step) for p in result.points)
        self.message(
            f"[{self.done}/{self.total}] {result.scenario} {result.arm} lr {result.lr:g}"
            f" seed {result.seed}: evaluated at steps {steps} ({how})"
        )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kappatune.bench import report, summary, verdict
    from kappatune.bench.run import run_bench
    from kappatune.jsonio import atomic_write_json

    args = resolve(args)
    scenarios = scenarios_from_args(args)
    settings = settings_from_args(args)
    command = canonical_command(args)
    out = Path(args.output)
    from kappatune.outputs import check_dir

    check_dir(out, "--output")
    runs = sum(len(settings.lrs_for(a)) for a in settings.arms) * len(settings.seeds)
    reporter = BarReporter(len(scenarios) * runs)
    if reporter.plain:  # transformers' own loading bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    outcome = run_bench(scenarios, settings, out, reporter)
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
    reference = "kappa" if "kappa" in settings.arms else settings.arms[0]
    vs = verdict.verdicts(points, floors, settings.arms, settings.forgetting_budget,
                          settings.bootstrap, reference)  # fmt: skip
    conclusion = verdict.one_line(vs)
    meta = {
        "command": command,
        "preset": args.preset,
        "settings": settings.resolved_json(),
        "scenarios": [s.to_json() for s in scenarios],
    }
    curves: dict[tuple[str, str], list[list[float]]] = {}
    for r in outcome.runs:
        curves.setdefault((r.scenario, r.arm), []).append(list(r.losses))
    notes = list(outcome.notes)
    atomic_write_json(out / "bench.json", meta)
    files = report.write_report(
        out, rows, points, vs, meta, notes, outcome.metrics, floors, conclusion, curves
    )
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(report.rich_table(rows, f"kappatune bench: {settings.model}", floors))
    for line in [*report.floor_lines(floors), *notes]:  # plain text: "[...]" is not markup
        console.print(f"  {line}", markup=False)
    for line in report.verdict_text(vs, outcome.metrics):
        console.print(f"  {line}", markup=False)
    console.print(f"wrote {', '.join(str(f) for f in files)}", markup=False)
    console.print(f"conclusion: {conclusion}", soft_wrap=True, markup=False)
    return 0
