"""The whole KappaTune path in one call: analyze, select, fine-tune, measure what was forgotten.

:func:`run_demo` loads a causal LM, computes the exact condition number of every linear layer,
selects the lowest-kappa matrices under a trainable-parameter budget (a prefix of the kappa
order), fine-tunes only those on Python standard-library source (the new task) and measures
perplexity on held-out standard-library modules (the task) and on English prose from
``pydoc_data.topics`` (the control: what the model already knew), before and after. All data
is built in and offline: the bench's ``code`` scenario. The library prints nothing; a
:class:`DemoReporter` sees each stage as it finishes.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kappatune.devices import DEVICES
from kappatune.errors import KappaTuneError
from kappatune.settings import setting

if TYPE_CHECKING:  # importing this module stays light: `kappatune --help` reads the defaults
    from collections.abc import Sequence

    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from kappatune.analysis.spectra import Analysis
    from kappatune.bench.tokenized import PreparedScenario
    from kappatune.selection.budget import Budget
    from kappatune.selection.core import Selection
    from kappatune.training.loop import TrainResult

DEFAULT_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and measures (see the README for how long the defaults take)."""

    model: str = setting(
        DEFAULT_MODEL,
        flag="model",
        help="causal LM: built-in name, directory, .gguf or cached HF id",
    )
    budget: str = setting(
        "2%",
        flag="--budget-params",
        metavar="N|P%",
        help="parameters to train: a count or a percentage of the model",
    )
    steps: int = setting(60, help="optimizer steps")
    lr: float = setting(1e-4, help="learning rate")
    batch_size: int = setting(2, help="rows per step")
    seq_len: int = setting(64, help="tokens per row")
    eval_sequences: int = setting(12, help="sequences in each of the task and control sets")
    seed: int = setting(0, help="data order seed")
    device: str = setting("auto", help=f"{', '.join(DEVICES[:-1])} or {DEVICES[-1]}")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_sequences"):
            if getattr(self, name) < 1:
                raise KappaTuneError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.seq_len < 4:
            raise KappaTuneError(f"--seq-len must be at least 4, got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KappaTuneError(f"--lr must be a positive number, got {self.lr}")
        self.budget_spec()

    def budget_spec(self) -> Budget:
        from kappatune.selection.budget import Budget

        return Budget.parse_params(self.budget)


@dataclass(frozen=True)
class Perplexities:
    """Token-weighted perplexity on the held-out task text and on the control text."""

    task: float
    control: float


def change(before: float, after: float) -> float:
    """Relative change in percent (negative: perplexity went down, i.e. better)."""
    return 100.0 * (after - before) / before


@dataclass(frozen=True)
class DemoResult:
    """Everything the demo measured; :meth:`sentence` says it in one plain sentence."""

    model: str
    matrices: int
    selection: Selection
    total_params: int
    steps: int
    first_loss: (
        float  # mean training loss of the first tenth of the steps (single batches are noisy)
    )
    final_loss: float  # and of the last tenth
    before: Perplexities
    after: Perplexities
    frozen_changed: tuple[str, ...]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def task_change(self) -> float:
        return change(self.before.task, self.after.task)

    @property
    def control_change(self) -> float:
        return change(self.before.control, self.after.control)

    def sentence(self) -> str:
        sel = self.selection
        share = 100 * sel.param_count / max(1, self.total_params)
        learned = "it learned the task" if self.task_change < 0 else "it did not learn the task"
        forgot = (
            "no forgetting there; the prose is Python's documentation, so part of this is"
            " transfer from the task, and `kappatune bench` measures forgetting properly"
            if self.control_change <= 0
            else "that much was forgotten"
        )
        return (
            f"Training only the {sel.entry_count} lowest-kappa of {self.matrices} matrices"
            f" ({share:.1f}% of the weights) for {self.steps} steps on Python source changed the"
            f" perplexity on unseen Python code from {self.before.task:.2f} to {self.after.task:.2f}"
            f" ({self.task_change:+.1f}%: {learned}) and on English prose, which the model knew"
            f" before, from {self.before.control:.2f} to {self.after.control:.2f}"
            f" ({self.control_change:+.1f}%: {forgot})."
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "kappatune.demo",
            "model": self.model,
            "matrices": self.matrices,
            "selection": self.selection.to_json(),
            "total_params": self.total_params,
            "trained_params": self.selection.param_count,
            "steps": self.steps,
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "before": {"task": self.before.task, "control": self.before.control},
            "after": {"task": self.after.task, "control": self.after.control},
            "task_change_percent": self.task_change,
            "control_change_percent": self.control_change,
            "frozen_changed": list(self.frozen_changed),
            "seconds": dict(self.seconds),
            "sentence": self.sentence(),
        }


class DemoReporter(Protocol):
    """Sees each stage as it finishes (the CLI prints; the library default is silent)."""

    def stage(self, text: str) -> None: ...
    def analysed(self, analysis: Analysis) -> None: ...
    def selected(self, selection: Selection) -> None: ...
    def step(self, step: int, total: int, loss: float) -> None: ...
    def measured(self, when: str, ppl: Perplexities) -> None: ...


class QuietReporter:
    def stage(self, text: str) -> None:
        pass

    def analysed(self, analysis: Analysis) -> None:
        pass

    def selected(self, selection: Selection) -> None:
        pass

    def step(self, step: int, total: int, loss: float) -> None:
        pass

    def measured(self, when: str, ppl: Perplexities) -> None:
        pass


# --------------------------------------------------------------------------- the steps


def analyze_linear(model: nn.Module) -> Analysis:
    """Exact spectra of the model's linear layers (the output head excluded), cached."""
    from kappatune.analysis.spectra import AnalyzeOptions, analyze
    from kappatune.bench.arms import linear_weight_names

    names = linear_weight_names(model)
    include = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return analyze(model, AnalyzeOptions(include=include))


def choose(analysis: Analysis, model: nn.Module, settings: DemoSettings) -> Selection:
    """The lowest-kappa prefix of the linear layers that fits the parameter budget."""
    from kappatune.bench.arms import candidate_rows
    from kappatune.selection.core import select
    from kappatune.training.models import total_parameters

    rows = candidate_rows(analysis.tensors, model)
    return select(
        rows,
        "lowest-kappa",
        settings.budget_spec(),
        total_params=total_parameters(model),
        source=settings.model,
        fingerprint=analysis.fingerprint,
    )


def demo_data(tokenizer: PreTrainedTokenizerBase, settings: DemoSettings) -> PreparedScenario:
    """The bench's built-in ``code`` scenario, tokenized (training rows and both eval sets),
    with Python's own English documentation as control text: it ships with the interpreter, so
    the demo needs nothing beyond the package (the bench's dictionary control needs dict-gcide)."""
    from dataclasses import replace

    from kappatune.bench.scenarios import DataSpec, builtin_scenario
    from kappatune.bench.tokenized import EvalSizes, prepare

    scenario = replace(builtin_scenario("code"), control=DataSpec("builtin:python-docs-prose"))
    sizes = EvalSizes(
        seq_len=settings.seq_len,
        task_sequences=settings.eval_sequences,
        control_sequences=settings.eval_sequences,
        control_seq_len=settings.seq_len,
    )
    return prepare(scenario, scenario.load(), tokenizer, sizes)


def measure(model: nn.Module, prepared: PreparedScenario, batch_size: int) -> Perplexities:
    from kappatune.bench.evaluate import perplexity

    task = perplexity(model, prepared.task_sequences, pad_id=prepared.pad_id, batch_size=batch_size)
    ctl = perplexity(model, prepared.control, pad_id=prepared.pad_id, batch_size=batch_size)
    return Perplexities(task=task.perplexity, control=ctl.perplexity)


def fine_tune(
    model: nn.Module,
    selection: Selection,
    prepared: PreparedScenario,
    settings: DemoSettings,
    reporter: DemoReporter,
    device: torch.device,
) -> tuple[TrainResult, tuple[str, ...]]:
    """Selective fine-tuning of ``selection``; returns the loop's result and any frozen tensor
    whose bytes changed (none, unless something is broken)."""
    from kappatune.training.freezing import check_frozen, frozen_digests
    from kappatune.training.loop import StopRule, TrainConfig, prepare_model, train_loop

    ready = prepare_model(model, "selective", selection)
    before = frozen_digests(model)
    config = TrainConfig(
        steps=settings.steps,
        lr=settings.lr,
        warmup_steps=1,
        batch_size=settings.batch_size,
        seed=settings.seed,
    )
    result = train_loop(
        ready.model,
        prepared.train,
        config,
        StopRule(max_steps=settings.steps),
        param_groups=ready.param_groups,
        on_step=lambda s: reporter.step(s.step, settings.steps, s.losses[-1]),
        device=device,
    )
    model.eval()
    return result, tuple(check_frozen(model, before))


def loss_window(steps: int) -> int:
    """Steps averaged for the first and last training loss: a tenth of the run, at least one."""
    return max(1, steps // 10)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def run_demo(settings: DemoSettings, reporter: DemoReporter | None = None) -> DemoResult:
    """Load, analyze, select, measure, fine-tune, measure again."""
    from kappatune.devices import resolve_device
    from kappatune.training.models import load_causal_lm, total_parameters

    rep = reporter or QuietReporter()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = seconds.get(name, 0.0) + now - clock
        clock = now

    device = resolve_device(settings.device)
    rep.stage(f"loading {settings.model}")
    model, tokenizer = load_causal_lm(settings.model)
    model.to(device)
    lap("load")
    rep.stage("analyzing every linear layer (exact singular values)")
    analysis = analyze_linear(model)
    rep.analysed(analysis)
    selection = choose(analysis, model, settings)
    rep.selected(selection)
    lap("analyze_select")
    prepared = demo_data(tokenizer, settings)
    lap("data")
    rep.stage("measuring perplexity before training")
    before = measure(model, prepared, settings.batch_size)
    rep.measured("before", before)
    lap("evaluate")
    rep.stage(f"fine-tuning the selection for {settings.steps} steps")
    result, changed = fine_tune(model, selection, prepared, settings, rep, device)
    lap("train")
    after = measure(model, prepared, settings.batch_size)
    rep.measured("after", after)
    lap("evaluate")
    seconds["total"] = sum(seconds.values())
    return DemoResult(
        model=settings.model,
        matrices=len(analysis.tensors),
        selection=selection,
        total_params=total_parameters(model),
        steps=result.steps,
        first_loss=_mean(result.losses[: loss_window(result.steps)]),
        final_loss=_mean(result.losses[-loss_window(result.steps) :]),
        before=before,
        after=after,
        frozen_changed=changed,
        seconds=seconds,
    )
