"""One training recipe: data, selection and model in, a finished run directory out.

:func:`run_training` trains a :class:`~kappatune.training.run_settings.RunSettings` into its run directory
(:mod:`kappatune.training.run_dir`) on one process or, under ``accelerate launch`` /
``torchrun``, on all of them: :func:`make_engine` picks the engine, the one place that
decides. Rerunning the same settings resumes from the last checkpoint;
:func:`resume_training` does that from the run directory alone. The recipe is quiet: it
tells a :class:`RunReporter` (on the main rank only) what a command line would print.

    from pathlib import Path
    from kappatune import RunSettings, resume_training, run_training
    from kappatune.training.loop import TrainConfig

    settings = RunSettings("gemma-3-270m", ("task.txt",), "selective", Path("runs/sel"),
                           TrainConfig(steps=100), selection=Path("sel.json"))
    run_training(settings)          # interrupted? either call again, or:
    resume_training("runs/sel")
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kappatune.errors import KappaTuneError
from kappatune.selection.core import Selection
from kappatune.training.loop import LoraSettings, TrainConfig
from kappatune.training.methods import TrainingMethod
from kappatune.training.run_dir import CHECKPOINT, RunStatus
from kappatune.training.run_report import RunReporter, SilentReporter
from kappatune.training.run_settings import RunSettings

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from kappatune.training.data import TokenizedData
    from kappatune.training.loop import Engine, TrainResult
    from kappatune.training.methods import PreparedModel
    from kappatune.training.run_log import StepWatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """What :func:`run_training` did. ``status`` is ``done`` when ``output`` already held the
    finished run (nothing trained); ``target`` is the saved ``model/`` or ``adapter/``."""

    output: Path
    status: RunStatus
    result: TrainResult | None = None
    target: Path | None = None
    is_main: bool = True


# --------------------------------------------------------------------------- engines


def make_engine(settings: RunSettings) -> Engine:
    """The engine for this process: accelerate's under ``accelerate launch`` / ``torchrun``
    (or when accelerate was told to use FSDP or DeepSpeed), else one local process."""
    from kappatune.devices import resolve_device
    from kappatune.training.accelerate_engine import AccelerateEngine, launched, make_accelerator
    from kappatune.training.loop import LocalEngine

    if not launched():
        return LocalEngine(resolve_device(settings.device))
    if settings.eval_data is not None:
        raise KappaTuneError(
            "--eval-data runs in a single process only (not under accelerate launch or torchrun)"
        )
    accelerator = make_accelerator(settings.train.grad_accum, settings.device)
    return AccelerateEngine(accelerator, settings.train.batch_size, settings.train.max_grad_norm)


def _processes(engine: Engine) -> int | None:
    """The world size a launched run records (None: a local run records none)."""
    from kappatune.training.loop import LocalEngine

    return None if isinstance(engine, LocalEngine) else engine.world


def _where(engine: Engine) -> str:
    from kappatune.training.accelerate_engine import AccelerateEngine
    from kappatune.training.loop import LocalEngine

    if isinstance(engine, LocalEngine):
        return str(engine.device)
    if isinstance(engine, AccelerateEngine):
        acc = engine.accelerator
        return f"{engine.world} processes ({acc.distributed_type.value}, {acc.device})"
    return f"{engine.world} processes"


def _note(engine: Engine) -> str | None:
    from kappatune.training.accelerate_engine import AccelerateEngine, engine_note

    return engine_note(engine.accelerator) if isinstance(engine, AccelerateEngine) else None


# --------------------------------------------------------------------------- the recipe


def run_training(
    settings: RunSettings, *, engine: Engine | None = None, reporter: RunReporter | None = None
) -> RunOutcome:
    """Train ``settings`` into ``settings.output``: a new run, the rest of an interrupted one
    (same settings), or nothing when the directory holds the finished run. ``engine``
    defaults to :func:`make_engine`'s choice."""
    from kappatune.training.accelerate_engine import broadcast_from_main
    from kappatune.training.run_dir import (
        read_record,
        run_record,
        run_status,
        steps_grown,
        write_run_files,
    )

    if engine is None:
        engine = make_engine(settings)
    events: RunReporter = reporter if reporter is not None and engine.is_main else SilentReporter()
    method, out = settings.training_method, settings.output
    inputs = _load(settings, engine, events)
    lora = _lora(settings, inputs.model) if method.lora else None
    record = run_record(
        model=settings.model, method=method.name, data=settings.data, pack=settings.pack,
        train=settings.train, lora=lora, selection=inputs.selection,
        checkpoint_every=settings.checkpoint_every, eval_data=settings.eval_data,
        processes=_processes(engine), bf16=settings.bf16,
        gradient_checkpointing=settings.gradient_checkpointing,
    )  # fmt: skip
    status: RunStatus = broadcast_from_main(lambda: run_status(out, record), str, _status)
    if status == "resume" and engine.is_main:
        grown = steps_grown(read_record(out), record)
        if grown is not None:
            schedule = "" if settings.train.scheduler == "constant" else (
                f"; the {settings.train.scheduler} schedule is recomputed for {grown[1]} steps"
            )  # fmt: skip
            events.note(f"--steps grows from {grown[0]} to {grown[1]}{schedule}")
    if status == "done":
        events.finished(out)
        return RunOutcome(out, status, is_main=engine.is_main)
    events.header(settings.model, method.name, inputs.data, _where(engine))
    if (note := _note(engine)) is not None:
        events.note(note)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(inputs.model)
    prepared = _prepare(inputs.model, method, inputs.selection, lora, settings.train)
    if engine.is_main:
        write_run_files(out, record, inputs.selection)
    engine.wait()
    session = _Session(
        settings, engine, events, prepared, inputs.tokenizer, inputs.data, inputs.eval_data,
        inputs.selection,
    )  # fmt: skip
    return _train(session, status, record)


@dataclass(frozen=True)
class _Inputs:
    data: TokenizedData
    eval_data: TokenizedData | None
    selection: Selection | None
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase


def _load(settings: RunSettings, engine: Engine, events: RunReporter) -> _Inputs:
    """Data, selection (made on the main rank), model and tokenizer, checked against each other."""
    from kappatune.training.data import load_examples, tokenize
    from kappatune.training.layout import locate
    from kappatune.training.models import check_seq_len, load_causal_lm
    from kappatune.training.selection_fit import check_selection_fits

    examples = load_examples(list(settings.data))
    eval_examples = None if settings.eval_data is None else load_examples(list(settings.eval_data))
    selection = _selection(settings)
    model, tokenizer = load_causal_lm(settings.model, trust_remote_code=settings.trust_remote_code)
    check_seq_len(settings.pack.seq_len, model, tokenizer)
    data = tokenize(tokenizer, examples, settings.pack)
    if data.dropped or data.truncated:
        events.unfit(data, settings.pack.seq_len)
    eval_data = None if eval_examples is None else tokenize(tokenizer, eval_examples, settings.pack)
    if selection is not None:
        check_selection_fits(
            model, selection, locate(model, selection), other_weights=settings.other_weights
        )
    _log_placement(engine, model, selection)
    return _Inputs(data, eval_data, selection, model, tokenizer)


def _status(value: str) -> RunStatus:
    assert value in ("new", "resume", "done")
    return cast("RunStatus", value)


def _selection(settings: RunSettings) -> Selection | None:
    """The run's selection, made on the main rank and sent to the others."""
    from kappatune.training.accelerate_engine import broadcast_selection

    source = settings.selection
    if source is None:
        return None
    if isinstance(source, Selection):
        return source
    if isinstance(source, Path):
        return broadcast_selection(lambda: Selection.load(source))
    return broadcast_selection(source)


def _lora(settings: RunSettings, model: nn.Module) -> LoraSettings:
    from kappatune.training.freezing import param_numel

    if settings.lora is None:
        return LoraSettings()
    if isinstance(settings.lora, LoraSettings):
        return settings.lora
    return settings.lora(sum(param_numel(p) for p in model.parameters()))


def _log_placement(engine: Engine, model: nn.Module, selection: Selection | None) -> None:
    """What each rank of a launched run holds (``-v`` shows it)."""
    from kappatune.training.freezing import is_partitioned

    if _processes(engine) is None:
        return
    if selection is not None:
        log.info(
            "rank %d of %d: selection of %d tensors, %s",
            engine.rank, engine.world, len(selection.names), ",".join(selection.names),
        )  # fmt: skip
    partitioned = sum(is_partitioned(p) for p in model.parameters())
    log.info("rank %d: %d parameters partitioned by ZeRO-3 at load", engine.rank, partitioned)


def _prepare(
    model: nn.Module,
    method: TrainingMethod,
    selection: Selection | None,
    lora: LoraSettings | None,
    train: TrainConfig,
) -> PreparedModel:
    import torch

    torch.manual_seed(train.seed)  # LoRA initialisation
    return method.prepare(model, selection, lora, train.weight_decay)


@dataclass(frozen=True)
class _Session:
    """Everything one training session of a run works with."""

    settings: RunSettings
    engine: Engine
    events: RunReporter
    prepared: PreparedModel
    tokenizer: PreTrainedTokenizerBase
    data: TokenizedData
    eval_data: TokenizedData | None
    selection: Selection | None


def _watch(s: _Session, total: int, start: int, record: dict[str, Any]) -> StepWatch:
    """The step log (trimmed to ``start``), trackers, evaluation and display: main rank only."""
    from kappatune.training.loop import evaluate_loss
    from kappatune.training.run_log import RunLog, StepWatch, make_reporters

    out = s.settings.output
    evaluate = None
    if s.eval_data is not None:
        model, eval_data, batch = s.prepared.model, s.eval_data, s.settings.train.batch_size

        def evaluate() -> float:
            return evaluate_loss(model, eval_data, batch_size=batch)

    reporters = make_reporters(s.settings.report_to, out, record)
    run_log = RunLog(out, start_step=start, reporters=reporters)
    display = s.events.progress(total, start)
    return StepWatch(run_log, evaluate=evaluate, eval_every=s.settings.eval_every, display=display)


def _train(s: _Session, status: RunStatus, record: dict[str, Any]) -> RunOutcome:
    from kappatune.training.loop import LoopState, StopRule, train_loop
    from kappatune.training.stop import StopRequested, stop_requests

    settings, engine, prepared = s.settings, s.engine, s.prepared
    config, ckpt = settings.train, settings.output / CHECKPOINT
    total = config.total_steps(len(s.data), engine.world)
    resume = engine.load_checkpoint(ckpt, prepared, config, total) if status == "resume" else None
    start = 0 if resume is None else int(resume["step"])
    s.events.start(prepared, None if resume is None else start, total, ckpt)
    watch = _watch(s, total, start, record) if engine.is_main else None

    def on_step(state: LoopState) -> None:
        if state.step >= total:
            return
        if state.step % settings.checkpoint_every == 0 or stop:
            engine.save_checkpoint(ckpt, state)
        if stop:  # Ctrl-C or SIGTERM during this step: its checkpoint is written, stop here
            if engine.is_main:
                s.events.note(
                    f"stopped after step {state.step} of {total}: its checkpoint is in {ckpt};"
                    " rerun the same command to go on from there"
                )
            raise StopRequested(state.step)

    try:
        with stop_requests(enabled=engine.world == 1) as stop, _autocast(settings, engine):
            result = train_loop(
                prepared.model, s.data, config, StopRule(), param_groups=prepared.param_groups,
                resume=resume, on_step=on_step, engine=engine, observer=watch,
            )  # fmt: skip
    finally:
        if watch is not None:
            watch.close()
    evals = {} if watch is None else watch.eval_summary()
    target = _save(s, result, evals)
    engine.wait()
    s.events.done(result, settings.output, _processes(engine))
    return RunOutcome(settings.output, status, result, target, engine.is_main)


def _autocast(settings: RunSettings, engine: Engine) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast of the training steps (``--bf16``): weights, gradients and AdamW state
    stay float32, frozen tensors are never written."""
    import torch

    if not settings.bf16:
        return contextlib.nullcontext()
    device = "cuda" if str(settings.device).startswith("cuda") or (
        settings.device == "auto" and torch.cuda.is_available()
    ) else "cpu"  # fmt: skip
    return torch.autocast(device, dtype=torch.bfloat16)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activations recomputed in the backward pass (transformers' own switch), non-reentrant
    so that frozen inputs (a frozen embedding under selective training or LoRA) still pass
    gradients through."""
    switch = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(switch) or not getattr(model, "supports_gradient_checkpointing", False):
        raise KappaTuneError(
            f"--gradient-checkpointing: {type(model).__name__} does not support gradient"
            " checkpointing"
        )
    switch(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        config.use_cache = False  # a cache is useless in training and clashes with recomputation


def _save(s: _Session, result: TrainResult, evals: dict[str, Any]) -> Path:
    """``model/`` or ``adapter/`` (portable base name, dtype to keep) with its card, then
    ``result.json``; the checkpoint goes."""
    from kappatune.training.model_card import write_run_card
    from kappatune.training.publish import name_base_model, output_dtype
    from kappatune.training.run_dir import finish, unfit_counts

    settings, engine, prepared = s.settings, s.engine, s.prepared
    method = settings.training_method
    target = settings.output / method.output_name
    if method.lora:
        name_base_model(prepared.model, settings.model)
    dtype = output_dtype(method.lora, settings.model, settings.save_dtype)
    if engine.is_main:  # a large model takes a while to write: say so first
        s.events.note(f"saving the {'adapter' if method.lora else 'model'} to {target}")
    engine.save_model(target, s.tokenizer, dtype=dtype)
    if engine.is_main:
        write_run_card(
            target, model_spec=settings.model, method=method.name, adapter=method.lora,
            data=settings.data, result=result, prepared=prepared, selection=s.selection,
            final_eval=evals.get("final_eval_loss"),
        )  # fmt: skip
        processes = _processes(engine)
        report = (
            result.to_json()
            | evals
            | {"method": method.name, "trainable_params": prepared.trainable_params}
            | ({} if processes is None else {"processes": processes})
            | unfit_counts(s.data)
        )
        finish(settings.output, report)
    return target


# --------------------------------------------------------------------------- resume


def resume_training(
    run_dir: str | Path,
    *,
    engine: Engine | None = None,
    reporter: RunReporter | None = None,
    **options: Any,
) -> RunOutcome:
    """Continue the run in ``run_dir`` from its last checkpoint (or start it over when it has
    none; nothing when it is finished), with the settings its ``run.json`` records.
    ``options``: those :func:`settings_from_run` takes (device, trust_remote_code, ...)."""
    from kappatune.training.run_settings import settings_from_run

    return run_training(settings_from_run(run_dir, **options), engine=engine, reporter=reporter)
