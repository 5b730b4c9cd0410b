"""Run the benchmark: scenarios x arms x seeds, each result stored as it finishes.

Everything the user can get wrong (splits, options, budgets, arm names, learning rates) is
checked before the first training step. The base model is evaluated once per scenario; each
(arm, seed) trains a fresh copy of the base weights, and its result file is written
atomically, so a rerun skips what is done and recomputes what a changed setting made stale.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kappatune.bench import arms as arms_mod
from kappatune.bench.arms import Arm, ArmContext
from kappatune.bench.evaluate import label_accuracy, perplexity
from kappatune.bench.inputs import EvalSizes, Prepared, evenly, prepare
from kappatune.bench.scenarios import Scenario, ScenarioData
from kappatune.bench.store import BaseResult, Metrics, ResultStore, RunResult, config_hash
from kappatune.bench.trainer import SparseLossLM, StopPlan, train_and_evaluate
from kappatune.devices import resolve_device
from kappatune.errors import KappaTuneError
from kappatune.selection import Budget

log = logging.getLogger(__name__)

RUN_FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchSettings:
    """Everything but the scenarios. Defaults: Gemma 3 270M, both built-in scenarios, 3 seeds in
    about 45 min on a 2-core CPU (43.6 min measured; full fine-tuning is 28 % of it)."""

    model: str = "gemma-3-270m"
    arms: tuple[str, ...] = arms_mod.DEFAULT_ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    stop: str = "both"
    steps: int = 8
    target_loss: str = "5%"
    max_steps: int = 16
    budget: str = "2%"
    batch_size: int = 4
    eval_batch_size: int = 4
    sizes: EvalSizes = field(default_factory=EvalSizes)
    lrs: tuple[tuple[str, float], ...] = ()
    warmups: tuple[tuple[str, int], ...] = ()
    lora_fraction: float = 0.2
    ema_decay: float = 0.8
    fisher_tokens: int = 1024
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.arms:
            raise KappaTuneError("no arms to run (the base model is always measured)")
        dupes = sorted({a for a in self.arms if self.arms.count(a) > 1})
        if dupes:
            raise KappaTuneError(f"arm(s) listed twice: {', '.join(dupes)}")
        for a in self.arms:
            if a == "base":
                raise KappaTuneError("'base' is always measured; do not list it in --arms")
            arms_mod.get_arm(a)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise KappaTuneError(f"--seeds must be distinct integers, got {list(self.seeds)}")
        for label, pairs in (("--lr", self.lrs), ("--warmup", self.warmups)):
            for arm, value in pairs:
                if arm not in self.arms:
                    raise KappaTuneError(f"{label} {arm}={value}: {arm!r} is not among --arms")
        for arm, lr in self.lrs:
            if not (lr > 0 and math.isfinite(lr)):
                raise KappaTuneError(f"--lr {arm}={lr}: a learning rate must be positive")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise KappaTuneError("batch sizes must be at least 1")
        if self.dtype not in DTYPES:
            raise KappaTuneError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise KappaTuneError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.fisher_tokens < 1:
            raise KappaTuneError(f"--fisher-tokens must be at least 1, got {self.fisher_tokens}")
        self.budget_spec()
        self.target_spec()
        self.plan(1.0)

    def budget_spec(self) -> Budget:
        return Budget.parse_params(self.budget)

    def target_spec(self) -> tuple[str, float]:
        """("relative", drop fraction) or ("absolute", loss)."""
        text = self.target_loss.strip()
        try:
            if text.endswith("%"):
                drop = float(text[:-1]) / 100
                if not 0 < drop < 1:
                    raise ValueError
                return "relative", drop
            value = float(text)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError
            return "absolute", value
        except ValueError:
            raise KappaTuneError(
                f"cannot read --target-loss {self.target_loss!r}: give a loss (2.1) or a drop"
                " below the base model's training loss in percent (10%)"
            ) from None

    def target_for(self, reference_loss: float) -> float:
        kind, value = self.target_spec()
        return value if kind == "absolute" else (1.0 - value) * reference_loss

    def plan(self, reference_loss: float) -> StopPlan:
        return StopPlan(
            self.stop, self.steps, self.target_for(reference_loss), self.max_steps, self.ema_decay
        )

    def arm(self, name: str) -> Arm:
        lrs, warm = dict(self.lrs), dict(self.warmups)
        return arms_mod.with_overrides(arms_mod.get_arm(name), lrs.get(name), warm.get(name))

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "arms": list(self.arms),
            "seeds": list(self.seeds),
            "stop": self.stop,
            "steps": self.steps,
            "target_loss": self.target_loss,
            "max_steps": self.max_steps,
            "budget": self.budget,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "seq_len": self.sizes.seq_len,
            "task_sequences": self.sizes.task_sequences,
            "task_examples": self.sizes.task_examples,
            "control_sequences": self.sizes.control_sequences,
            "lrs": {a: self.arm(a).lr for a in self.arms},
            "warmups": {a: self.arm(a).warmup for a in self.arms},
            "lora_fraction": self.lora_fraction,
            "ema_decay": self.ema_decay,
            "dtype": self.dtype,
            "device": self.device,
        }


class Reporter(Protocol):
    """Progress callbacks; the CLI draws bars, the library default does nothing."""

    def message(self, text: str) -> None: ...

    def run_started(self, scenario: str, arm: str, seed: int, horizon: int) -> None: ...

    def step(self, step: int, loss: float) -> None: ...

    def run_finished(self, result: RunResult, reused: bool) -> None: ...


class QuietReporter:
    def message(self, text: str) -> None:
        log.info("%s", text)

    def run_started(self, scenario: str, arm: str, seed: int, horizon: int) -> None:
        log.info("training %s / %s / seed %d", scenario, arm, seed)

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


def evaluate_model(model: nn.Module, prepared: Prepared, batch_size: int) -> Metrics:
    if prepared.metric == "accuracy":
        res = label_accuracy(
            model,
            prepared.task_examples,
            prepared.options,
            pad_id=prepared.pad_id,
            batch_size=batch_size,
        )
        task = {"accuracy": res.accuracy, "label_nll": res.label_nll, "examples": float(res.total)}
    else:
        ppl = perplexity(
            model, prepared.task_sequences, pad_id=prepared.pad_id, batch_size=batch_size
        )
        task = {"perplexity": ppl.perplexity, "nll": ppl.mean_nll, "tokens": float(ppl.tokens)}
    ctl = perplexity(model, prepared.control, pad_id=prepared.pad_id, batch_size=batch_size)
    control = {"perplexity": ctl.perplexity, "nll": ctl.mean_nll, "tokens": float(ctl.tokens)}
    return Metrics(task=task, control=control)


def reference_loss(model: nn.Module, prepared: Prepared, batch_size: int, rows: int = 16) -> float:
    """The base model's token-mean training loss on a fixed subset of the training rows."""
    from kappatune.training import evaluate_loss

    subset = prepared.train.subset(evenly(len(prepared.train), rows))
    return evaluate_loss(SparseLossLM(model), subset, batch_size=batch_size)


# --------------------------------------------------------------------------- model set-up


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    rows: tuple[Any, ...]
    fingerprint: str
    total_params: int


def load_model(spec: str, settings: BenchSettings) -> Loaded:
    from kappatune.models import load_causal_lm, total_parameters
    from kappatune.spectra import AnalyzeOptions, analyze

    model, tokenizer = load_causal_lm(spec, dtype=DTYPES[settings.dtype])
    model.to(resolve_device(settings.device))
    model.eval()
    names = arms_mod.linear_weight_names(model)
    include = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    analysis = analyze(model, AnalyzeOptions(include=include))
    rows = tuple(arms_mod.candidate_rows(analysis.tensors, model))
    return Loaded(model, tokenizer, rows, analysis.fingerprint, total_parameters(model))


def arm_context(
    loaded: Loaded, settings: BenchSettings, seed: int, fisher: Any = None
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
    from kappatune.training import LoraSettings, lora_plan

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
            if arm.method in ("lora", "kappa-lora"):
                targets, r = lora_plan(
                    loaded.model,
                    arm.method,
                    sel,
                    LoraSettings(r=None, budget_params=ctx.budget_params()),
                )
                entry["lora_r"] = r
                entry["lora_modules"] = len(targets.get("target_modules") or [])
            info.setdefault(name, {})[seed] = entry
    return info


# --------------------------------------------------------------------------- one run


def run_hash(base_hash: str, arm: Arm, settings: BenchSettings, plan: StopPlan, seed: int) -> str:
    return config_hash(
        {
            "format": RUN_FORMAT,
            "base": base_hash,
            "arm": arm.to_json(),
            "budget": settings.budget,
            "lora_fraction": settings.lora_fraction if arm.method == "kappa-lora" else None,
            "plan": plan.to_json(),
            "batch_size": settings.batch_size,
            "weight_decay": settings.weight_decay,
            "max_grad_norm": settings.max_grad_norm,
            "seed": seed,
        }
    )


def train_one(
    loaded: Loaded,
    prepared: Prepared,
    arm: Arm,
    seed: int,
    settings: BenchSettings,
    plan: StopPlan,
    fisher: Any,
    reporter: Reporter,
    want_hash: str,
) -> RunResult:
    from kappatune.training import TrainConfig

    started = time.perf_counter()
    model = copy.deepcopy(loaded.model)
    torch.manual_seed(seed)  # LoRA initialisation
    ctx = arm_context(loaded, settings, seed, fisher)
    ready = arms_mod.prepare_arm(model, arm, ctx, weight_decay=settings.weight_decay)
    config = TrainConfig(
        steps=plan.horizon,
        lr=arm.lr,
        warmup_steps=arm.warmup,
        scheduler="constant",
        batch_size=settings.batch_size,
        seed=seed,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
    )
    reporter.run_started(prepared.scenario.name, arm.name, seed, plan.horizon)
    trained = train_and_evaluate(
        ready.model,
        ready.param_groups,
        prepared.train,
        config,
        plan,
        lambda m: evaluate_model(m, prepared, settings.eval_batch_size),
        on_step=reporter.step,
    )
    details: dict[str, Any] = {
        "method": arm.method,
        "policy": arm.policy,
        "lr": arm.lr,
        "warmup": arm.warmup,
        "seconds_per_step": round(trained.seconds_per_step, 3),
        "target_loss": plan.target,
    }
    if ready.lora_r is not None:
        details["lora_r"] = ready.lora_r
        details["lora_modules"] = len((ready.lora_targets or {}).get("target_modules") or [])
    sel = arms_mod.arm_selection(arm, ctx)
    if sel is not None:
        details["selected"] = list(sel.names)
    result = RunResult(
        scenario=prepared.scenario.name,
        arm=arm.name,
        seed=seed,
        config_hash=want_hash,
        trainable_params=int(ready.trainable_params),
        points=trained.points,
        losses=trained.losses,
        seconds=time.perf_counter() - started,
        details=details,
    )
    del model, ready
    gc.collect()
    return result


# --------------------------------------------------------------------------- the benchmark


def _fisher_scores(
    loaded: Loaded, prepared: Prepared, settings: BenchSettings, policy: str | None = "fisher"
) -> Any:
    from kappatune.fisher import examples_from_tokenized, fisher_scores

    if policy in ("self-fisher", "interference"):
        return _self_fisher_scores(loaded, prepared, settings, policy)
    return fisher_scores(
        loaded.model,
        examples_from_tokenized(prepared.train),
        tokens=settings.fisher_tokens,
        rows=loaded.rows,
    )


def _scores_message(name: str, policy: str | None, settings: BenchSettings) -> str:
    if policy == "fisher":
        return f"{name}: Fisher scores on {settings.fisher_tokens} training tokens"
    from kappatune.selffisher import DEFAULT_TOKENS

    task = f" and {settings.fisher_tokens} training tokens" if policy == "interference" else ""
    return f"{name}: {policy} scores on {DEFAULT_TOKENS} tokens the model samples{task}"


def _self_fisher_scores(
    loaded: Loaded, prepared: Prepared, settings: BenchSettings, policy: str
) -> Any:
    """Scores of the self-fisher (model's own samples, default size) and interference arms."""
    from kappatune.fisher import examples_from_tokenized, fisher_scores
    from kappatune.selffisher import bos_of, interference_scores, self_fisher_scores

    own = self_fisher_scores(
        loaded.model, bos=bos_of(loaded.model, loaded.tokenizer), rows=loaded.rows
    )
    if policy == "self-fisher":
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
) -> Outcome:
    """Run (or resume) the benchmark; returns every base and run result."""
    reporter = reporter or QuietReporter()
    if not scenarios:
        raise KappaTuneError("no scenario to run")
    store = ResultStore(out_dir)
    loaded_data: dict[str, ScenarioData] = {s.name: s.load() for s in scenarios}  # fail fast
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
        notes.extend(_arm_notes(info, loaded))
        for s in group:
            base, plan = _base(loaded, prepared[s.name], settings, store, spec, reporter)
            bases[s.name] = base
            runs.extend(
                _scenario_runs(loaded, prepared[s.name], settings, plan, base, store, reporter)
            )
        del loaded
        gc.collect()
    metrics = {s.name: s.task_metric for s in scenarios}
    return Outcome(bases, tuple(runs), metrics, tuple(notes))


def _arm_notes(info: dict[str, Any], loaded: Loaded) -> list[str]:
    out = []
    for arm, per_seed in info.items():
        first = next(iter(per_seed.values()))
        if "lora_r" in first:
            out.append(f"{arm}: LoRA rank {first['lora_r']} on {first['lora_modules']} modules")
        elif "tensors" in first:
            counts = sorted({v["tensors"] for v in per_seed.values()})
            shown = "/".join(map(str, counts))
            noun = "matrix" if counts == [1] else "matrices"
            out.append(f"{arm}: {shown} weight {noun} of {len(loaded.rows)} linear layers")
    return out


def _base(
    loaded: Loaded,
    prepared: Prepared,
    settings: BenchSettings,
    store: ResultStore,
    spec: str,
    reporter: Reporter,
) -> tuple[BaseResult, StopPlan]:
    base_hash = config_hash(
        {
            "format": RUN_FORMAT,
            "model": spec,
            "fingerprint": loaded.fingerprint,
            "dtype": settings.dtype,
            "scenario": prepared.scenario.to_json(),
            "data": prepared.digest,
        }
    )
    base = store.load_base(prepared.scenario.name, base_hash)
    if base is None:
        reporter.message(f"{prepared.scenario.name}: evaluating the base model")
        started = time.perf_counter()
        metrics = evaluate_model(loaded.model, prepared, settings.eval_batch_size)
        ref = reference_loss(loaded.model, prepared, settings.eval_batch_size)
        base = BaseResult(
            prepared.scenario.name,
            base_hash,
            metrics,
            loaded.total_params,
            time.perf_counter() - started,
            train_loss=ref,
        )
        store.save_base(base)
    return base, settings.plan(base.train_loss)


def _scenario_runs(
    loaded: Loaded,
    prepared: Prepared,
    settings: BenchSettings,
    plan: StopPlan,
    base: BaseResult,
    store: ResultStore,
    reporter: Reporter,
) -> list[RunResult]:
    out: list[RunResult] = []
    fisher: dict[str | None, Any] = {}  # policy -> its scores
    name = prepared.scenario.name
    for arm_name in settings.arms:
        arm = settings.arm(arm_name)
        for seed in settings.seeds:
            want = run_hash(base.config_hash, arm, settings, plan, seed)
            done = store.load_run(name, arm.name, seed, want)
            if done is not None:
                reporter.run_finished(done, reused=True)
                out.append(done)
                continue
            if arm.needs_fisher and arm.policy not in fisher:
                reporter.message(_scores_message(name, arm.policy, settings))
                fisher[arm.policy] = _fisher_scores(loaded, prepared, settings, arm.policy)
            scores = fisher.get(arm.policy)
            result = train_one(loaded, prepared, arm, seed, settings, plan, scores, reporter, want)
            store.save_run(result)
            reporter.run_finished(result, reused=False)
            out.append(result)
    return out
