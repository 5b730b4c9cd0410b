"""Run the benchmark: scenarios x arms x learning rates x seeds, evaluated at checkpoints.

Everything the user can get wrong (splits, options, budgets, arm names, learning rates,
knowledge questions) is checked before the first training step. The base model is evaluated
once per scenario (its control log-probabilities are shared by every arm's KL); each
(arm, lr, seed) trains a fresh copy of the base weights and is evaluated in place at each
checkpoint; its result file is rewritten atomically after each checkpoint, so a rerun skips
what is done and recomputes what a changed setting made stale.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from kappatune.bench import arms as arms_mod
from kappatune.bench import run_state
from kappatune.bench.arm_training import SparseLossLM, train_with_checkpoints
from kappatune.bench.arms import Arm, ArmContext
from kappatune.bench.config import (  # declared without torch, for the CLI's flags
    DTYPE_NAMES,
    PER_ARM,
    BenchSettings,
)
from kappatune.bench.config import NOT_IN_KEY as NOT_IN_KEY
from kappatune.bench.config import EvalSizes as EvalSizes
from kappatune.bench.config import lr_grid_around as lr_grid_around
from kappatune.bench.dictd import missing_packages
from kappatune.bench.evaluate import BaseReference, ControlResult, control_eval, label_accuracy
from kappatune.bench.fronts import accuracy_noise_floor, ppl_noise_floor
from kappatune.bench.knowledge import BUILTIN as BUILTIN_KNOWLEDGE
from kappatune.bench.knowledge import (
    McResult,
    Question,
    TokenizedQuestion,
    builtin_questions,
    mc_accuracy,
    read_questions,
    single_token,
    tokenize_questions,
)
from kappatune.bench.peers import PreprocessCache
from kappatune.bench.scenarios import Scenario, ScenarioData
from kappatune.bench.store import (
    BaseResult,
    Metrics,
    Point,
    ResultStore,
    RunResult,
    config_hash,
)
from kappatune.bench.tokenized import PreparedScenario, evenly, prepare
from kappatune.devices import resolve_device
from kappatune.errors import KappaTuneError
from kappatune.selection.policies import policy_spec
from kappatune.settings import key_fields
from kappatune.training.data import special_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kappatune.analysis.spectra import SpectrumRow

Scores = dict[tuple[str, int], float]  # Fisher-type scores by (tensor, expert or -1)

log = logging.getLogger(__name__)

RUN_FORMAT = 2
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16), strict=True))


def run_key_fields(settings: BenchSettings, arm: str) -> dict[str, Any]:
    """The settings that determine a run of ``arm``: every field but :data:`NOT_IN_KEY`."""
    out = key_fields(settings)
    for name in PER_ARM:
        out[name] = dict(getattr(settings, name)).get(arm)
    return out


def run_key(
    base_hash: str,
    arm: Arm,
    lr: float,
    seed: int,
    settings: BenchSettings,
    keep_digest: str = "",
) -> str:
    extra = {"keep": keep_digest} if arm.uses_keep_data else {}  # others' keys unchanged
    return config_hash(
        {
            **extra,
            "format": RUN_FORMAT,
            "base": base_hash,
            "arm": arm.to_json(),
            "lr": lr,
            "seed": seed,
            "settings": run_key_fields(settings, arm.name),
        }
    )


class Reporter(Protocol):
    """Progress callbacks; the CLI draws bars, the library default does nothing."""

    def message(self, text: str) -> None: ...

    def run_started(self, scenario: str, arm: str, lr: float, seed: int, horizon: int) -> None: ...

    def step(self, step: int, loss: float) -> None: ...

    def run_finished(self, result: RunResult, reused: bool) -> None: ...


class QuietReporter:
    def message(self, text: str) -> None:
        log.info("%s", text)

    def run_started(self, scenario: str, arm: str, lr: float, seed: int, horizon: int) -> None:
        log.info("training %s / %s / lr %g / seed %d", scenario, arm, lr, seed)

    def step(self, step: int, loss: float) -> None:
        pass

    def run_finished(self, result: RunResult, reused: bool) -> None:
        pass


@dataclass(frozen=True)
class Outcome:
    bases: dict[str, BaseResult]
    runs: tuple[RunResult, ...]
    metrics: dict[str, str]
    notes: tuple[str, ...]


# --------------------------------------------------------------------------- evaluation

MIN_CONTROL_SEQUENCES = 10  # fewer cannot give a bootstrap noise floor worth the name


@dataclass
class Evaluator:
    """Evaluates a model on one prepared scenario: task, control (ppl + KL against the base
    model, whose log-probabilities are shared by every arm) and knowledge questions."""

    prepared: PreparedScenario
    batch_size: int
    base: BaseReference | None
    knowledge: tuple[TokenizedQuestion, ...]

    def task(
        self, model: nn.Module
    ) -> tuple[dict[str, float], tuple[bool, ...], ControlResult | None]:
        p = self.prepared
        if p.metric == "accuracy":
            res = label_accuracy(
                model, p.task_examples, p.options, pad_id=p.pad_id, batch_size=self.batch_size
            )
            hits = tuple(
                pred == ex.label for pred, ex in zip(res.predictions, p.task_examples, strict=True)
            )
            return (
                {
                    "accuracy": res.accuracy,
                    "label_nll": res.label_nll,
                    "examples": float(res.total),
                },
                hits,
                None,
            )
        ctl = control_eval(model, p.task_sequences, pad_id=p.pad_id, batch_size=self.batch_size)
        ppl = ctl.perplexity
        task = {"perplexity": ppl.perplexity, "nll": ppl.mean_nll, "tokens": float(ppl.tokens)}
        return task, (), ctl

    def control(self, model: nn.Module, with_kl: bool = True) -> ControlResult:
        p = self.prepared
        ref = self.base if with_kl else None
        rows = p.rows_per_batch(self.batch_size, p.control)
        return control_eval(model, p.control, pad_id=p.pad_id, batch_size=rows, base=ref)

    def mc(self, model: nn.Module) -> McResult | None:
        if not self.knowledge:
            return None
        return mc_accuracy(model, self.knowledge, pad_id=self.prepared.pad_id,
                           batch_size=4 * self.batch_size)  # fmt: skip

    def __call__(self, model: nn.Module) -> Metrics:
        task, _, task_ctl = self.task(model)
        return _metrics(task, self.control(model), self.mc(model), task_ctl)


def _metrics(
    task: dict[str, float],
    ctl: ControlResult,
    mc: McResult | None,
    task_ctl: ControlResult | None = None,
) -> Metrics:
    ppl = ctl.perplexity
    control = {
        "perplexity": ppl.perplexity,
        "nll": ppl.mean_nll,
        "tokens": float(ppl.tokens),
        "kl": ctl.kl,
    }
    knowledge: dict[str, float] = {}
    if mc is not None:
        knowledge = {
            "accuracy": mc.accuracy,
            "correct": float(sum(mc.correct)),
            "total": float(len(mc.correct)),
        }
    return Metrics(
        task=task,
        control=control,
        knowledge=knowledge,
        control_nlls=ctl.nll_sums,
        task_nlls=task_ctl.nll_sums if task_ctl is not None else (),
    )


def reference_loss(
    model: nn.Module, prepared: PreparedScenario, batch_size: int, rows: int = 16
) -> float:
    """The base model's token-mean training loss on a fixed subset of the training rows."""
    from kappatune.training.loop import evaluate_loss

    subset = prepared.train.subset(evenly(len(prepared.train), rows))
    return evaluate_loss(SparseLossLM(model), subset, batch_size=batch_size)


# --------------------------------------------------------------------------- model set-up


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    rows: tuple[SpectrumRow, ...]
    fingerprint: str
    total_params: int


def load_model(spec: str, settings: BenchSettings) -> Loaded:
    from kappatune.analysis.spectra import AnalyzeOptions, analyze
    from kappatune.training.models import load_causal_lm, total_parameters

    model, tokenizer = load_causal_lm(spec, dtype=DTYPES[settings.dtype])
    model.to(resolve_device(settings.device))
    model.eval()
    names = arms_mod.linear_weight_names(model)
    include = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    analysis = analyze(model, AnalyzeOptions(include=include))
    rows = tuple(arms_mod.candidate_rows(analysis.tensors, model))
    return Loaded(model, tokenizer, rows, analysis.fingerprint, total_parameters(model))


def arm_context(
    loaded: Loaded, settings: BenchSettings, seed: int, fisher: Scores | None = None
) -> ArmContext:
    return ArmContext(
        rows=loaded.rows,
        budget=settings.budget_spec(),
        total_params=loaded.total_params,
        seed=seed,
        lora_fraction=settings.lora_fraction,
        fisher=fisher,
    )


def check_arms(loaded: Loaded, settings: BenchSettings) -> dict[str, Any]:
    """Resolve every arm's selection and LoRA rank now, so a bad budget fails before training."""
    from kappatune.training.loop import LoraSettings
    from kappatune.training.methods import find_method, lora_plan

    info: dict[str, Any] = {}
    for seed in settings.seeds:
        ctx = arm_context(loaded, settings, seed)
        for name in settings.arms:
            arm = settings.arm(name)
            if arm.needs_fisher:
                continue
            sel = arms_mod.arm_selection(arm, ctx)
            entry: dict[str, Any] = {}
            if sel is not None:
                entry["tensors"] = sel.tensor_count
                entry["selected_params"] = sel.param_count
            method = find_method(arm.method)  # None: a PEFT peer
            if method is not None and method.lora:
                targets, r = lora_plan(
                    loaded.model,
                    arm.method,
                    sel,
                    LoraSettings(r=None, budget_params=ctx.budget_params()),
                )
                entry["lora_r"] = r
                entry["lora_modules"] = len(targets.get("target_modules") or [])
            entry.update(arms_mod.check_peer(loaded.model, arm, ctx))  # peers: PEFT and budget
            info.setdefault(name, {})[seed] = entry
    return info


# --------------------------------------------------------------------------- one run


def train_one(
    loaded: Loaded,
    evaluator: Evaluator,
    arm: Arm,
    seed: int,
    settings: BenchSettings,
    fisher: Scores | None,
    reporter: Reporter,
    store: ResultStore,
    want: str,
    done: RunResult | None,
) -> RunResult:
    """Train one (arm, lr, seed), evaluating at every checkpoint; the run file is rewritten
    after each checkpoint. Checkpoints already in ``done`` (an interrupted run) are not
    evaluated again; the training goes on from the state kept at the last of them
    (``--keep-state``, :mod:`kappatune.bench.run_state`), or is repeated from step 0 (it is
    deterministic)."""
    from kappatune.training.loop import TrainConfig

    started = time.perf_counter()
    prepared = evaluator.prepared
    model = copy.deepcopy(loaded.model)
    torch.manual_seed(seed)  # LoRA initialisation
    ctx = arm_context(loaded, settings, seed, fisher)
    ready = arms_mod.prepare_arm(
        model,
        arm,
        ctx,
        weight_decay=settings.weight_decay,
        keep=prepared.keep,
        peer_cache=PreprocessCache(
            store.root / "cache",
            config_hash(
                [loaded.fingerprint, prepared.keep_digest, settings.dtype, settings.device]
            ),
        ),
    )
    config = TrainConfig(
        steps=settings.steps,
        lr=arm.lr,
        warmup_steps=arm.warmup,
        scheduler="constant",
        batch_size=settings.batch_size,
        seed=seed,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
    )
    trainable = int(ready.trainable_params)
    details: dict[str, Any] = {"method": arm.method, "policy": arm.policy, "warmup": arm.warmup}
    if ready.lora_r is not None:
        details["lora_r"] = ready.lora_r
        details["lora_modules"] = len((ready.lora_targets or {}).get("target_modules") or [])
    sel = arms_mod.arm_selection(arm, ctx)
    if sel is not None:
        details["selected"] = list(sel.names)
    points: list[Point] = []

    def result(losses: tuple[float, ...] = (), per_step: float = math.nan) -> RunResult:
        extra = {"seconds_per_step": round(per_step, 3)} if math.isfinite(per_step) else {}
        return RunResult(
            scenario=prepared.scenario.name, arm=arm.name, lr=arm.lr, seed=seed,
            config_hash=want, trainable_params=trainable,
            points=tuple(sorted(points, key=lambda p: p.step)), losses=losses,
            seconds=time.perf_counter() - started, details={**details, **extra},
        )  # fmt: skip

    def keep(point: Point) -> None:
        points.append(point)
        store.save_run(result())

    previous = {p.step: p for p in done.points} if done is not None else {}
    points.extend(previous.values())
    kept = run_state.state_dir(store.root, prepared.scenario.name, want)
    resume = run_state.load_state(
        kept, ready.model, ready.param_groups, config, sorted(previous)
    ) if previous and settings.keep_state else None  # fmt: skip
    if resume is not None:
        reporter.message(
            f"{prepared.scenario.name} {arm.name} lr {arm.lr:g} seed {seed}: going on from its"
            f" kept state at step {int(resume['step'])}"
        )
    reporter.run_started(prepared.scenario.name, arm.name, arm.lr, seed, settings.steps)
    trained = train_with_checkpoints(
        ready.model,
        ready.param_groups,
        prepared.train,
        config,
        settings.checkpoint_steps(),
        evaluator,
        done=previous,
        on_point=keep,
        on_step=reporter.step,
        autocast=settings.autocast,
        resume=resume,
        on_state=functools.partial(run_state.save_state, kept, ready.model)
        if settings.keep_state
        else None,
    )
    final = result(trained.losses, trained.seconds_per_step)
    store.save_run(final)
    run_state.drop_state(kept)
    del model, ready
    gc.collect()
    return final


# --------------------------------------------------------------------------- the benchmark


def _fisher_scores(
    loaded: Loaded,
    prepared: PreparedScenario,
    settings: BenchSettings,
    policy: str = "fisher",
) -> Scores:
    from kappatune.analysis.fisher import examples_from_tokenized, fisher_scores

    if policy_spec(policy).self_fisher:
        return _self_fisher_scores(loaded, prepared, settings, policy)
    return fisher_scores(
        loaded.model,
        examples_from_tokenized(prepared.train),
        tokens=settings.fisher_tokens,
        rows=loaded.rows,
    )


def knowledge_questions(
    settings: BenchSettings, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[tuple[Question, ...], str | None]:
    """The knowledge control's questions, and why there are none when there are none.

    Built-in questions keep answers that are one token for ``tokenizer`` (when given)."""
    if settings.knowledge == "none":
        return (), None
    if settings.knowledge == BUILTIN_KNOWLEDGE:
        missing = missing_packages()
        if missing:
            return (), (
                f"knowledge control skipped: {', '.join(missing)} not installed"
                f" (apt-get install -y {' '.join(missing)}, or `make setup`)"
            )
        questions = builtin_questions(
            settings.sizes.knowledge_questions,
            settings.knowledge_seed,
            accept=single_token(tokenizer) if tokenizer is not None else lambda _: True,
        )
        return questions, None
    return read_questions(Path(settings.knowledge).expanduser()), None


def _scores_message(name: str, policy: str, settings: BenchSettings) -> str:
    spec = policy_spec(policy)
    if not spec.self_fisher:
        return f"{name}: Fisher scores on {settings.fisher_tokens} training tokens"
    from kappatune.analysis.self_fisher import DEFAULT_TOKENS

    task = f" and {settings.fisher_tokens} training tokens" if spec.task_fisher else ""
    return f"{name}: {policy} scores on {DEFAULT_TOKENS} tokens the model samples{task}"


def _self_fisher_scores(
    loaded: Loaded, prepared: PreparedScenario, settings: BenchSettings, policy: str
) -> Scores:
    """Scores of the self-fisher (model's own samples, default size) and interference arms."""
    from kappatune.analysis.fisher import examples_from_tokenized, fisher_scores
    from kappatune.analysis.self_fisher import bos_of, interference_scores, self_fisher_scores

    own = self_fisher_scores(
        loaded.model, bos=bos_of(loaded.model, loaded.tokenizer), rows=loaded.rows
    )
    if not policy_spec(policy).task_fisher:
        return own
    task = fisher_scores(
        loaded.model, examples_from_tokenized(prepared.train), kind="empirical",
        tokens=settings.fisher_tokens, rows=loaded.rows,
    )  # fmt: skip
    return interference_scores(task, own)


def run_bench(
    scenarios: Sequence[Scenario],
    settings: BenchSettings,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    *,
    train: bool = True,
) -> Outcome:
    """Run (or resume) the benchmark; returns every base and run result. ``train=False``
    (``--report-only``): nothing is trained or evaluated; the runs already stored whole under
    these settings are returned, and the notes say which are missing."""
    reporter = reporter or QuietReporter()
    if not scenarios:
        raise KappaTuneError("no scenario to run")
    store = ResultStore(out_dir)
    loaded_data: dict[str, ScenarioData] = {s.name: s.load() for s in scenarios}  # fail fast
    if settings.knowledge not in ("none", BUILTIN_KNOWLEDGE):
        knowledge_questions(settings)  # a user's file: fail fast, before loading the model
    by_model: dict[str, list[Scenario]] = {}
    for s in scenarios:
        by_model.setdefault(s.model or settings.model, []).append(s)
    bases: dict[str, BaseResult] = {}
    runs: list[RunResult] = []
    notes: list[str] = []
    for spec, group in by_model.items():
        reporter.message(f"loading {spec}")
        loaded = load_model(spec, settings)
        info = check_arms(loaded, settings)
        prepared = {
            s.name: prepare(s, loaded_data[s.name], loaded.tokenizer, settings.sizes) for s in group
        }
        for s in group:
            arms_mod.check_keep_data(
                [settings.arm(a) for a in settings.arms], s.name, prepared[s.name].keep
            )
        questions, skipped = knowledge_questions(settings, loaded.tokenizer)
        if skipped and skipped not in notes:
            reporter.message(skipped)
            notes.append(skipped)
        items = tokenize_questions(
            loaded.tokenizer, questions, special_tokens(loaded.tokenizer).prefix
        )
        for p in prepared.values():
            if len(p.control) < MIN_CONTROL_SEQUENCES:
                raise KappaTuneError(
                    f"scenario {p.scenario.name}: {len(p.control)} control sequences are too few"
                    f" for a noise floor (at least {MIN_CONTROL_SEQUENCES}: more control text or"
                    " --control-sequences)"
                )
        notes.extend(_arm_notes(info, loaded))
        for s in group:
            p = prepared[s.name]
            evaluator = Evaluator(
                p,
                settings.eval_batch_size,
                BaseReference(loaded.model, p.pad_id, settings.kl_cache_mb),
                items,
            )
            base = _base(loaded, evaluator, settings, store, spec, reporter, train=train)
            bases[s.name] = base
            done, missing = _scenario_runs(
                loaded, evaluator, settings, base, store, reporter, train=train
            )
            runs.extend(done)
            if missing:
                shown = "; ".join(missing[:6]) + ("; ..." if len(missing) > 6 else "")
                notes.append(
                    f"{s.name}: report from the stored runs only: {len(missing)} of"
                    f" {len(missing) + len(done)} runs not stored whole yet ({shown})"
                )
        del loaded
        gc.collect()
    metrics = {s.name: s.task_metric for s in scenarios}
    return Outcome(bases, tuple(runs), metrics, tuple(notes))


def _arm_notes(info: dict[str, Any], loaded: Loaded) -> list[str]:
    out = []
    for arm, per_seed in info.items():
        first = next(iter(per_seed.values()))
        if "note" in first:
            out.append(first["note"])
        elif "lora_r" in first:
            out.append(f"{arm}: LoRA rank {first['lora_r']} on {first['lora_modules']} modules")
        elif "tensors" in first:
            counts = sorted({v["tensors"] for v in per_seed.values()})
            shown = "/".join(map(str, counts))
            noun = "matrix" if counts == [1] else "matrices"
            out.append(f"{arm}: {shown} weight {noun} of {len(loaded.rows)} linear layers")
    return out


def _floors(
    ctl: ControlResult,
    hits: Sequence[bool],
    task_ctl: ControlResult | None,
    mc: McResult | None,
    bootstrap: int,
) -> dict[str, float]:
    """The base model's noise floors (half-widths of 95 % bootstrap bands)."""
    floors = {"control_ppl": ppl_noise_floor(ctl.nll_sums, ctl.tokens, bootstrap)}
    if task_ctl is not None:
        floors["task_gain"] = ppl_noise_floor(task_ctl.nll_sums, task_ctl.tokens, bootstrap)
    else:
        floors["task_gain"] = accuracy_noise_floor(hits, bootstrap)
    if mc is not None:
        floors["knowledge"] = accuracy_noise_floor(mc.correct, bootstrap)
    return floors


def _base(
    loaded: Loaded,
    evaluator: Evaluator,
    settings: BenchSettings,
    store: ResultStore,
    spec: str,
    reporter: Reporter,
    *,
    train: bool = True,
) -> BaseResult:
    prepared = evaluator.prepared
    base_hash = config_hash(
        {
            "format": RUN_FORMAT,
            "model": spec,
            "fingerprint": loaded.fingerprint,
            "dtype": settings.dtype,
            "device": settings.device,
            "scenario": prepared.scenario.to_json(),
            "data": prepared.digest,
            "knowledge": [(q.prompt, q.options, q.answer) for q in evaluator.knowledge],
            "eval_batch_size": settings.eval_batch_size,
        }
    )
    base = store.load_base(prepared.scenario.name, base_hash)
    if not train:
        if base is None:
            raise KappaTuneError(
                f"{store.root}: no stored base result of scenario {prepared.scenario.name} under"
                " these settings, so no run to report on (run without --report-only)"
            )
        return base  # its stored floors, whatever --bootstrap says
    if base is not None and base.floors_bootstrap == settings.bootstrap:
        return base
    # the bootstrap count is not in the base's key (the run keys depend on it, and the trained
    # runs do not depend on it): floors made with another count are recomputed, alone
    what = "its noise floors" if base is not None else "the base model and its noise floors"
    reporter.message(f"{prepared.scenario.name}: evaluating {what}")
    started = time.perf_counter()
    model = loaded.model
    task, hits, task_ctl = evaluator.task(model)
    ctl = evaluator.control(model, with_kl=False)
    mc = evaluator.mc(model)
    floors = _floors(ctl, hits, task_ctl, mc, settings.bootstrap)
    if base is not None:
        base = replace(base, floors=floors, floors_bootstrap=settings.bootstrap)
        store.save_base(base)
        return base
    metrics = _metrics(task, ctl, mc, task_ctl)
    metrics.control["kl"] = 0.0  # the base model against itself
    base = BaseResult(
        prepared.scenario.name,
        base_hash,
        metrics,
        loaded.total_params,
        time.perf_counter() - started,
        train_loss=reference_loss(model, prepared, settings.eval_batch_size),
        floors=floors,
        knowledge_correct=mc.correct if mc is not None else (),
        control_tokens=ctl.tokens,
        task_tokens=task_ctl.tokens if task_ctl is not None else (),
        floors_bootstrap=settings.bootstrap,
    )
    store.save_base(base)
    return base


def _scenario_runs(
    loaded: Loaded,
    evaluator: Evaluator,
    settings: BenchSettings,
    base: BaseResult,
    store: ResultStore,
    reporter: Reporter,
    *,
    train: bool = True,
) -> tuple[list[RunResult], list[str]]:
    """The scenario's runs (trained or reused) and, with ``train=False``, the ones not stored
    whole (``arm lr seed``)."""
    out: list[RunResult] = []
    missing: list[str] = []
    fisher: dict[str | None, Scores] = {}  # policy -> its scores
    prepared = evaluator.prepared
    name = prepared.scenario.name
    want_steps = set(settings.checkpoint_steps())
    # seed by seed, so an interrupted sweep leaves whole seeds behind (rerun with --seeds to
    # report on them from the stored runs)
    for seed in settings.seeds:
        for arm_name in settings.arms:
            for lr in settings.lrs_for(arm_name):
                arm = settings.arm(arm_name, lr)
                want = run_key(base.config_hash, arm, lr, seed, settings, prepared.keep_digest)
                done = store.load_run(name, arm.name, lr, seed, want)
                if done is not None and {p.step for p in done.points} >= want_steps and done.losses:
                    reporter.run_finished(done, reused=True)
                    out.append(done)
                    continue
                if not train:
                    missing.append(f"{arm.name} lr {lr:g} seed {seed}")
                    continue
                if arm.policy is not None and arm.needs_fisher and arm.policy not in fisher:
                    reporter.message(_scores_message(name, arm.policy, settings))
                    fisher[arm.policy] = _fisher_scores(loaded, prepared, settings, arm.policy)
                result = train_one(
                    loaded,
                    evaluator,
                    arm,
                    seed,
                    settings,
                    fisher.get(arm.policy),
                    reporter,
                    store,
                    want,
                    done,
                )
                reporter.run_finished(result, reused=False)
                out.append(result)
    return out, missing
