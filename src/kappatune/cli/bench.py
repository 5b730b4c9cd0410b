"""``kappatune bench``: does KappaTune forget less? Scenarios x arms x seeds, with controls."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kappatune.errors import KappaTuneError

EPILOG = """examples:
  kappatune bench                                  # code + digits on gemma-3-270m (~45 min, 2-core CPU)
  kappatune bench code --seeds 0 1 2 3 4 --stop loss --target-loss 15%%
  kappatune bench --config configs/bench-example.yaml --model ./my-model
  kappatune bench --train train.jsonl --heldout test.jsonl --control builtin:python-docs-prose \\
      --task-metric accuracy --options negative positive --template "{text}\\nSentiment: "
  kappatune bench --steps 200 --max-steps 600 --seq-len 256 --batch-size 16 \\
      --task-sequences 128 --control-sequences 128 --task-examples 360   # on a GPU

arms: full, lora, kappa, kappa-lora, random, highest (default) and fisher (data-dependent).
Results are saved per (arm, seed) as they finish: rerun the same command to resume.
"""


def _keyed(values: Sequence[str], flag: str, cast: Any) -> tuple[str | None, list[tuple[str, Any]]]:
    """``["3e-4", "full=1e-5"]`` -> (default for all arms, per-arm pairs)."""
    default: str | None = None
    pairs: list[tuple[str, Any]] = []
    for v in values:
        arm, eq, raw = v.partition("=")
        try:
            if eq:
                pairs.append((arm.strip(), cast(raw)))
            else:
                cast(v)
                default = v
        except ValueError:
            raise KappaTuneError(f"cannot read {flag} {v!r}: use VALUE or ARM=VALUE") from None
    return default, pairs


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="forgetting benchmark: KappaTune against full FT, LoRA, random and highest-kappa",
        description="Fine-tune each arm on a new task and measure what it learned (held-out task"
        " metric) and what it forgot (control perplexity), against the untouched base model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="built-in scenarios: code, digits (default: both)",
    )
    p.add_argument("--config", type=Path, help="YAML/JSON file describing scenarios")
    p.add_argument(
        "--model",
        default="gemma-3-270m",
        help="causal LM: built-in name, directory, .gguf, cached hub id",
    )
    p.add_argument(
        "--arms",
        nargs="+",
        help="arms to train (default: full lora kappa kappa-lora random highest)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument(
        "--stop", choices=("steps", "loss", "both"), default="both", help="stopping rule(s)"
    )
    p.add_argument("--steps", type=int, default=8, help="steps of the equal-steps rule (default 8)")
    p.add_argument(
        "--target-loss",
        default="5%",
        help="loss target: a value, or a drop below the base model's training loss (default 5%%)",
    )
    p.add_argument(
        "--max-steps", type=int, default=16, help="step cap of the equal-loss rule (default 16)"
    )
    p.add_argument(
        "--budget-params",
        default="2%",
        help="trainable-parameter budget shared by all arms: N, 2.5M or P%% of the model (default 2%%)",
    )
    p.add_argument(
        "--seq-len", type=int, default=64, help="tokens per packed text row (default 64)"
    )
    p.add_argument(
        "--max-row-len",
        type=int,
        default=512,
        help="longest prompt+completion row allowed (default 512)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="training rows per step (default 4)")
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=4,
        help="rows per evaluation forward pass (default 4)",
    )
    p.add_argument(
        "--task-sequences",
        type=int,
        default=8,
        help="held-out rows for perplexity tasks (default 8)",
    )
    p.add_argument(
        "--task-examples",
        type=int,
        default=40,
        help="held-out examples for label tasks (default 40)",
    )
    p.add_argument("--control-sequences", type=int, default=8, help="control rows (default 8)")
    p.add_argument(
        "--lr",
        nargs="+",
        default=[],
        metavar="[ARM=]LR",
        help="learning rates, e.g. --lr full=1e-5 kappa=2e-4",
    )
    p.add_argument(
        "--warmup",
        nargs="+",
        default=[],
        metavar="[ARM=]N",
        help="warm-up steps, e.g. --warmup full=4",
    )
    p.add_argument(
        "--lora-fraction",
        type=float,
        default=0.2,
        help="fraction of linear layers KappaTune-LoRA adapts (default 0.2)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.8,
        help="EMA decay of the training loss for the loss rule (default 0.8)",
    )
    p.add_argument(
        "--fisher-tokens",
        type=int,
        default=1024,
        help="training tokens for the fisher arm's scores",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
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
    g.add_argument("--task-metric", choices=("perplexity", "accuracy"), default="perplexity")
    g.add_argument("--options", nargs="+", default=[], help="label options of an accuracy task")
    g.add_argument(
        "--template", help="prompt template of label records (default '{text}\\nLabel: ')"
    )
    p.set_defaults(run=run)


def scenarios_from_args(args: argparse.Namespace) -> tuple[Any, ...]:
    from kappatune.bench.scenarios import (
        BUILTIN_SCENARIOS,
        builtin_scenario,
        load_config,
        scenario_from_mapping,
    )

    out: list[Any] = [builtin_scenario(n) for n in args.scenarios]
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


def settings_from_args(args: argparse.Namespace) -> Any:
    from kappatune.bench.arms import DEFAULT_ARMS
    from kappatune.bench.inputs import EvalSizes
    from kappatune.bench.run import BenchSettings

    arms = tuple(args.arms) if args.arms else DEFAULT_ARMS
    lr_all, lrs = _keyed(args.lr, "--lr", float)
    warm_all, warmups = _keyed(args.warmup, "--warmup", int)
    if lr_all is not None:
        lrs = [(a, float(lr_all)) for a in arms if a not in dict(lrs)] + lrs
    if warm_all is not None:
        warmups = [(a, int(warm_all)) for a in arms if a not in dict(warmups)] + warmups
    sizes = EvalSizes(
        seq_len=args.seq_len,
        task_sequences=args.task_sequences,
        task_examples=args.task_examples,
        control_sequences=args.control_sequences,
        max_row_len=args.max_row_len,
    )
    return BenchSettings(
        model=args.model,
        arms=arms,
        seeds=tuple(args.seeds),
        stop=args.stop,
        steps=args.steps,
        target_loss=args.target_loss,
        max_steps=args.max_steps,
        budget=args.budget_params,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        sizes=sizes,
        lrs=tuple(lrs),
        warmups=tuple(warmups),
        lora_fraction=args.lora_fraction,
        ema_decay=args.ema,
        fisher_tokens=args.fisher_tokens,
        dtype=args.dtype,
        device=args.device,
    )


_FLAGS = (
    "config", "model", "arms", "seeds", "stop", "steps", "target_loss", "max_steps", "budget_params",
    "seq_len", "max_row_len", "batch_size", "eval_batch_size", "task_sequences", "task_examples",
    "control_sequences", "lr", "warmup", "lora_fraction", "ema", "fisher_tokens", "dtype", "device",
    "output", "name", "train", "heldout", "control", "task_metric", "options", "template",
)  # fmt: skip


def canonical_command(args: argparse.Namespace) -> str:
    """The command with every setting spelled out (what reproduces this run)."""
    words = ["kappatune", "bench", *args.scenarios]
    for dest in _FLAGS:
        value = getattr(args, dest, None)
        if value is None or value == []:
            continue
        words.append("--" + dest.replace("_", "-"))
        if isinstance(value, list):
            words.extend(str(v) for v in value)
        else:
            words.append(str(value))
    return shlex.join(words)


class BarReporter:
    """tqdm progress: one bar per training run, messages above it."""

    def __init__(self, total_runs: int) -> None:
        self.total = total_runs
        self.done = 0
        self.bar: Any = None

    def message(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"kappatune: {text}", file=sys.stderr)

    def run_started(self, scenario: str, arm: str, seed: int, horizon: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=horizon,
            desc=f"[{self.done + 1}/{self.total}] {scenario} {arm} seed {seed}",
            unit="step",
            file=sys.stderr,
            leave=False,
        )

    def step(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.refresh()

    def run_finished(self, result: Any, reused: bool) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        pts = ", ".join(
            f"{p.rule}@{p.step}{'' if p.reached else ' (target not reached)'}"
            for p in result.points
        )
        how = "reused" if reused else f"{result.seconds:.0f} s"
        self.message(
            f"[{self.done}/{self.total}] {result.scenario} {result.arm} seed {result.seed}: {pts} ({how})"
        )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kappatune.bench import report, summary
    from kappatune.bench.run import run_bench
    from kappatune.jsonio import atomic_write_json

    scenarios = scenarios_from_args(args)
    settings = settings_from_args(args)
    command = canonical_command(args)
    out = Path(args.output)
    from kappatune.outputs import check_dir

    check_dir(out, "--output")
    reporter = BarReporter(len(scenarios) * len(settings.arms) * len(settings.seeds))
    outcome = run_bench(scenarios, settings, out, reporter)
    points = summary.seed_points(outcome.runs, outcome.bases, outcome.metrics)
    rows = summary.summarize(points, outcome.bases, outcome.metrics, settings.arms)
    pairs = summary.paired(points, "kappa") if "kappa" in settings.arms else []
    meta = {
        "command": command,
        "settings": settings.to_json(),
        "scenarios": [s.to_json() for s in scenarios],
    }
    curves: dict[tuple[str, str], list[list[float]]] = {}
    for r in outcome.runs:
        curves.setdefault((r.scenario, r.arm), []).append(list(r.losses))
    notes = list(outcome.notes)
    atomic_write_json(out / "bench.json", meta)
    files = report.write_report(out, rows, points, pairs, meta, notes, outcome.metrics, curves)
    console = Console() if sys.stdout.isatty() else Console(width=180)
    console.print(report.rich_table(rows, f"kappatune bench: {settings.model}"))
    for note in notes:
        console.print(f"  {note}")
    console.print(f"wrote {', '.join(str(f) for f in files)}")
    return 0
