"""``kappatune bench``: does KappaTune forget less? Scenarios x arms x seeds, with controls."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kappatune.bench.config import PRESETS as PRESETS  # declared with the settings
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
    add(
        "--report-only",
        action="store_true",
        help="train and evaluate nothing: report on the runs already stored whole in --output"
        " under these settings, and say which are missing",
    )
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

    from kappatune.bench import report
    from kappatune.bench.conclude import conclude, console_lines, write
    from kappatune.bench.run import run_bench

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
    outcome = run_bench(scenarios, settings, out, reporter, train=not args.report_only)
    if not outcome.runs:
        raise KappaTuneError(
            f"{out}: no run is stored whole under these settings: nothing to report"
        )
    c = conclude(outcome, settings)
    meta = {
        "command": command,
        "preset": args.preset,
        "settings": settings.resolved_json(),
        "scenarios": [s.to_json() for s in scenarios],
    }
    files = write(c, out, meta)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(report.rich_table(list(c.rows), f"kappatune bench: {settings.model}", c.floors))
    for line in console_lines(c):  # plain text: "[...]" is not markup
        console.print(f"  {line}", markup=False)
    console.print(f"wrote {', '.join(str(f) for f in files[1:])}", markup=False)
    console.print(f"conclusion: {c.line}", soft_wrap=True, markup=False)
    return 0
