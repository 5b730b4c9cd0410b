"""``kappatune select SOURCE|ANALYSIS.json``: choose tensors to train and export them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kappatune.cli.command import add_command
from kappatune.constants import KAPPA_LORA_FRACTION
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import BUDGET_FLAGS  # declared without torch
from kappatune.selection.policies import policy_names, policy_spec  # no torch (the registry)

if TYPE_CHECKING:
    from rich.console import Console

    from kappatune.analysis.fisher import Key
    from kappatune.analysis.self_fisher import SelfFisherOptions
    from kappatune.analysis.spectra import Analysis, SpectrumRow
    from kappatune.selection.budget import Budget, SelectOptions
    from kappatune.selection.core import Selection

FORMATS = {"json": (".json",), "axolotl": (".yaml", ".yml"), "peft": (".json",)}
DEFAULT_FRACTION = KAPPA_LORA_FRACTION

EPILOG = """examples:
  kappatune select gemma-3-270m --budget-params 10% --format peft --output targets.json
  kappatune select spectra.json --budget-tensors 20 --format axolotl --output unfrozen.yaml
  kappatune select ./ckpt --module-types q_proj v_proj --quota v_proj=4 --quota q_proj=2 -o sel.json
  kappatune select gemma-3-270m --policy random --seed 3 --budget-params 5M -o random.json
  kappatune select gemma-3-270m --policy last-layers --last-layers 2 -o last2.json
  kappatune select gemma-3-270m --policy snr --budget-fraction 0.5 -o spectrum.json
  kappatune select gemma-3-270m --policy fisher --fisher-data task.txt --budget-tensors 20 -o f.json
  kappatune select gemma-3-270m --policy self-fisher --budget-tensors 20 -o self.json
  kappatune select gemma-3-270m --policy interference --fisher-data task.txt -o inter.json

Without a budget flag, {keeps_all} and --quota keep every candidate they pass;
the other policies keep the first 20% of the candidates (PEFT's default).
"""


def _needing(what: str) -> str:
    """The registered policies whose spec sets ``what``, as help text ("a, b or c")."""
    names = [f"'{n}'" for n in policy_names(lambda spec: bool(getattr(spec, what)))]
    return " or ".join(", ".join(names).rsplit(", ", 1)) if names else "(none)"


def add_selection_flags(p: argparse.ArgumentParser, lora_note: bool = False) -> None:
    """Policy, budget and filter flags shared by ``select`` and ``train``."""
    from kappatune.selection.budget import SelectOptions
    from kappatune.settings import add_flags

    g = p.add_argument_group("selection policy")
    g.add_argument(
        "--policy",
        default="lowest-kappa",
        choices=policy_names(),
        metavar="POLICY",
        help=f"one of {', '.join(policy_names())} (default: lowest-kappa)",
    )
    add_flags(p, SelectOptions, only=("seed", "last_layers"))
    task = _needing("task_fisher")
    g.add_argument(
        "--fisher-scores", type=Path, metavar="FILE", help=f"Fisher result JSON for --policy {task}"
    )
    g.add_argument(
        "--fisher-data",
        nargs="+",
        metavar="FILE",
        help=f"data to compute Fisher scores on for --policy {task}",
    )
    from kappatune.constants import FISHER_TOKENS
    from kappatune.constants import SELF_FISHER_TOKENS as DEFAULT_TOKENS

    g.add_argument(
        "--fisher-tokens",
        type=int,
        default=FISHER_TOKENS,
        help=f"tokens for --fisher-data (default: {FISHER_TOKENS})",
    )

    g.add_argument(
        "--self-fisher-tokens",
        type=int,
        default=DEFAULT_TOKENS,
        metavar="N",
        help=f"tokens the model samples itself for --policy {_needing('self_fisher')}"
        f" (default: {DEFAULT_TOKENS})",
    )
    b = p.add_argument_group("budget (one of)").add_mutually_exclusive_group()
    lora = "; with lora/kappa-lora, the adapter's size (see below)" if lora_note else ""
    for flag in BUDGET_FLAGS:
        b.add_argument(
            f"--{flag.name}",
            type=flag.type,
            metavar=flag.metavar,
            help=flag.help + (lora if flag.name == "budget-params" else ""),
        )
    add_flags(p, SelectOptions, only=("fill",))
    add_flags(p, SelectOptions, only=("include", "exclude", "module_types", "quotas"))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = add_command(
        sub,
        "select",
        help="choose the tensors to fine-tune (policy + budget) and export them",
        description="Order the candidate matrices with a policy (lowest kappa by default), keep a "
        "budget of them, and write a manifest, Axolotl YAML or PEFT target JSON.",
        epilog=EPILOG.format(keeps_all=_needing("keeps_all")),
    )
    p.add_argument(
        "source", help="analysis JSON from 'kappatune analyze', or anything 'analyze' accepts"
    )
    add_selection_flags(p)
    p.add_argument(
        "--format", default="json", choices=tuple(FORMATS), help="output format (default: json)"
    )
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        help="write the export here (atomically); '-' or no --output: standard output, with the"
        " summary on standard error",
    )
    p.add_argument("--top", type=int, default=25, help="rows of the selection table (default: 25)")
    p.set_defaults(run=run)


# --------------------------------------------------------------------------- shared helpers


def budget_from_args(args: argparse.Namespace) -> Budget | None:
    from kappatune.selection.budget import Budget, budget_from_flags

    budget = budget_from_flags(vars(args))
    if budget is not None:
        return budget
    if policy_spec(args.policy).keeps_all or args.quota:
        return None
    return Budget(fraction=DEFAULT_FRACTION)


def options_from_args(args: argparse.Namespace) -> SelectOptions:
    from kappatune.selection.budget import SelectOptions
    from kappatune.settings import from_args

    return from_args(SelectOptions, args)


@dataclass(frozen=True)
class SelectionFlags:
    """What the selection flags ask for, checked: built once, then used."""

    policy: str
    budget: Budget | None
    options: SelectOptions
    self_fisher: SelfFisherOptions | None  # for a policy that needs self-Fisher scores


def validate_selection_args(args: argparse.Namespace) -> SelectionFlags:
    """Everything about the selection flags that can be checked without reading weights."""
    spec = policy_spec(args.policy)
    if spec.task_fisher and not (args.fisher_scores or args.fisher_data):
        raise KappaTuneError(
            f"--policy {args.policy} needs --fisher-scores FILE or --fisher-data FILE..."
        )
    if not spec.task_fisher and (args.fisher_scores or args.fisher_data):
        raise KappaTuneError(
            "--fisher-scores/--fisher-data only apply to --policy "
            + _needing("task_fisher").replace("'", "")
        )
    self_fisher = None
    if spec.self_fisher:
        from kappatune.analysis.self_fisher import SelfFisherOptions

        self_fisher = SelfFisherOptions(tokens=args.self_fisher_tokens, seed=args.seed)
    if args.fisher_scores and args.fisher_data:
        raise KappaTuneError("give --fisher-scores or --fisher-data, not both")
    if spec.last_layers and args.last_layers is None:
        raise KappaTuneError(f"--policy {args.policy} needs --last-layers N")
    if args.fisher_scores and not args.fisher_scores.is_file():
        raise KappaTuneError(f"no such Fisher file: {args.fisher_scores}")
    for f in args.fisher_data or ():
        if not Path(f).exists():
            raise KappaTuneError(f"no such data file: {f}")
    return SelectionFlags(args.policy, budget_from_args(args), options_from_args(args), self_fisher)


def load_analysis(
    source: str, progress_desc: str = "analyzing", policy: str | None = None
) -> Analysis:
    """An Analysis from a JSON file, or computed (cached) from a checkpoint.

    Most policies need kappa only, so they take the faster kappa-only route (rows leave the
    other metrics null); those whose spec says ``full_spectrum`` (``snr``) get every singular
    value."""
    from tqdm import tqdm

    from kappatune.analysis.spectra import Analysis, AnalyzeOptions, analyze

    path = Path(source)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise KappaTuneError(f"no such analysis file: {source}")
        return Analysis.load(path)
    bar = tqdm(unit="tensor", desc=progress_desc, disable=None, leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        full = policy is not None and policy_spec(policy).full_spectrum
        options = AnalyzeOptions(kappa_only=not full)
        return analyze(source, options, progress=progress)
    finally:
        bar.close()


def _read_fisher_scores(path: Path) -> dict[Key, float]:
    from kappatune.analysis import fisher

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KappaTuneError(f"cannot read Fisher file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise KappaTuneError(f"{path} is not a Fisher result JSON object")
    return fisher.FisherResult.from_json(data).scores("mean")


def _self_fisher_scores(
    args: argparse.Namespace,
    options: SelfFisherOptions,
    model_spec: str,
    rows: Sequence[SpectrumRow],
) -> dict[Key, float]:
    from kappatune.analysis.self_fisher import policy_scores_for
    from kappatune.cli.quiet import quiet_transformers

    quiet_transformers()
    return policy_scores_for(
        args.policy,
        model_spec,
        options,
        rows=rows,
        task_files=args.fisher_data or (),
        task_scores=_read_fisher_scores(args.fisher_scores) if args.fisher_scores else None,
        task_tokens=args.fisher_tokens,
    )


def _fisher_scores(
    args: argparse.Namespace, model_spec: str, rows: Sequence[SpectrumRow]
) -> dict[Key, float]:
    from kappatune.analysis import fisher

    if args.fisher_scores:
        return _read_fisher_scores(args.fisher_scores)
    return fisher.fisher_scores_for(
        model_spec, args.fisher_data, tokens=args.fisher_tokens, seed=args.seed, rows=rows
    )


def check_scoring_model(args: argparse.Namespace, flags: SelectionFlags) -> None:
    """Refuse, before any analysis, a source that cannot be loaded as the causal LM a policy's
    scores need (self-Fisher samples from it; task Fisher runs it on --fisher-data)."""
    from kappatune.training.models import resolve_model

    spec = policy_spec(flags.policy)
    computes = flags.self_fisher is not None or (spec.task_fisher and not args.fisher_scores)
    if computes and not args.source.endswith(".json"):
        resolve_model(args.source)  # reads no weights


def selection_from_args(
    args: argparse.Namespace,
    analysis: Analysis,
    model_spec: str | None = None,
    budget: Budget | None = None,
    flags: SelectionFlags | None = None,
) -> Selection:
    """The selection the flags ask for (``flags``: as :func:`validate_selection_args` returned
    them, else checked now); ``budget`` (a Budget) replaces the budget flags."""
    from kappatune.selection.core import select

    flags = flags if flags is not None else validate_selection_args(args)
    scores = None
    spec = policy_spec(flags.policy)
    if flags.self_fisher is not None:  # with task_fisher too: the task's gradient over it
        spec_model = model_spec or analysis.source
        scores = _self_fisher_scores(args, flags.self_fisher, spec_model, analysis.tensors)
    elif spec.task_fisher:
        scores = _fisher_scores(args, model_spec or analysis.source, analysis.tensors)
    budget = budget if budget is not None else flags.budget
    return select(analysis, flags.policy, budget, flags.options, scores=scores)


def print_selection(console: Console, selection: Selection, top: int) -> None:
    from rich.table import Table
    from rich.text import Text

    from kappatune.printable import printable

    console.print(f"[bold]{selection.source}[/bold]  {selection.describe()}")
    console.print(f"the selection is {selection.describe_order()}")
    shown = max(0, min(top, selection.entry_count))
    hidden = selection.entry_count - shown
    if shown == 0:
        console.print(f"({hidden} selected rows not shown; --top N shows them)")
        return
    title = f"selected, in training priority order: {shown} of {selection.entry_count} rows"
    title += (
        f" ({hidden} more not shown; --top {selection.entry_count} shows all)" if hidden else ""
    )
    t = Table(title=title, title_justify="left")
    for col in ("#", "name", "expert", "type", "layer", "kappa", "params", "cum. %"):
        t.add_column(col, justify="left" if col in ("name", "type") else "right")
    cum = 0
    for i, e in enumerate(selection.entries[:top], start=1):
        cum += e.numel
        t.add_row(
            str(i),
            Text(printable(e.name)),
            "" if e.expert is None else str(e.expert),
            Text(printable(e.module_type)),
            "" if e.layer is None else str(e.layer),
            f"{e.kappa:.4g}",
            f"{e.numel:,}",
            f"{100 * cum / max(1, selection.total_params):.2f}",
        )
    console.print(t)
    counts: dict[str, list[int]] = {}
    for e in selection.entries:
        c = counts.setdefault(e.module_type, [0, 0])
        c[0] += 1
        c[1] += e.numel
    s = Table(title="by module type", title_justify="left")
    for col in ("type", "matrices", "params"):
        s.add_column(col, justify="left" if col == "type" else "right")
    for kind in sorted(counts, key=lambda k: (-counts[k][1], k)):
        s.add_row(Text(printable(kind)), str(counts[kind][0]), f"{counts[kind][1]:,}")
    console.print(s)


def to_stdout(path: Path | None) -> bool:
    return path is None or str(path) == "-"


def check_output(path: Path | None, fmt: str) -> None:
    from kappatune.outputs import check_file

    if to_stdout(path):
        return
    assert path is not None
    if not path.is_dir() and path.suffix.lower() not in FORMATS[fmt]:
        raise KappaTuneError(
            f"--output {path} should end in {' or '.join(FORMATS[fmt])} for --format {fmt}"
        )
    check_file(path, "--output")


def run(args: argparse.Namespace) -> int:
    from kappatune.cli.console import wide_console
    from kappatune.outputs import write_all
    from kappatune.selection.exports import render

    flags = validate_selection_args(args)
    check_output(args.output, args.format)
    check_scoring_model(args, flags)
    analysis = load_analysis(args.source, policy=args.policy)
    model_spec = None if args.source.endswith(".json") else args.source
    selection = selection_from_args(args, analysis, model_spec=model_spec, flags=flags)
    from kappatune.training.layout import model_type_of

    model_type = None if args.source.endswith(".json") else model_type_of(args.source)
    text = render(selection, args.format, model_type)
    stdout = to_stdout(args.output)
    console = wide_console(stderr=stdout)  # the export alone on stdout
    print_selection(console, selection, args.top)
    if stdout:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_all([(args.output, text.encode("utf-8"))])
        console.print(f"wrote {args.format}: {args.output}", markup=False)
        from kappatune.selection.exports import next_steps

        for line in next_steps(selection, args.format, str(args.output), args.source):
            text_line = f"next: {line}" if not line.startswith("  ") else line
            console.print(text_line, markup=False, soft_wrap=True)  # whole, to copy
    return 0
