"""One training recipe: data, selection and model in, a finished run directory out.

:func:`run_training` trains a :class:`RunSettings` into its run directory
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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kappatune.errors import KappaTuneError
from kappatune.selection.core import Selection
from kappatune.training.data import PackConfig
from kappatune.training.loop import LoraSettings, TrainConfig
from kappatune.training.methods import TrainingMethod, get_method
from kappatune.training.publish import SAVE_DTYPES
from kappatune.training.run_dir import CHECKPOINT, RunStatus

if TYPE_CHECKING:
    from torch import nn

    from kappatune.training.data import TokenizedData
    from kappatune.training.loop import Engine, TrainResult
    from kappatune.training.methods import PreparedModel
    from kappatune.training.run_log import StepDisplay, StepWatch

log = logging.getLogger(__name__)

SelectionSource = Selection | Path | Callable[[], Selection]
LoraSource = LoraSettings | Callable[[int], LoraSettings]


@dataclass(frozen=True)
class RunSettings:
    """One training run. ``selection`` (methods that need one): a Selection, a selection
    JSON file, or a function that makes it (called on the main rank only). ``lora`` (LoRA
    methods; default rank 8): settings, or a function of the model's parameter count (a
    budget given as a share of the model)."""

    model: str
    data: tuple[str, ...]
    method: str
    output: Path
    train: TrainConfig
    pack: PackConfig = field(default_factory=PackConfig)
    selection: SelectionSource | None = None
    lora: LoraSource | None = None
    checkpoint_every: int = 50
    eval_data: tuple[str, ...] | None = None
    eval_every: int | None = None
    report_to: tuple[str, ...] = ()  # trackers: tensorboard, wandb
    device: str = "auto"
    trust_remote_code: bool = False
    save_dtype: str = "auto"  # selective, full: auto keeps the checkpoint's dtype

    def __post_init__(self) -> None:
        method = self.training_method
        if not self.data:
            raise KappaTuneError("no training data")
        if self.checkpoint_every < 1:
            raise KappaTuneError(
                f"--checkpoint-every must be at least 1, got {self.checkpoint_every}"
            )
        if method.needs_selection and self.selection is None:
            raise KappaTuneError(
                f"method {self.method!r} needs a selection (--selection FILE or policy flags)"
            )
        if not method.needs_selection and self.selection is not None:
            raise KappaTuneError(
                f"--selection only applies to --method selective or kappa-lora, not {self.method}"
            )
        if not method.lora and self.lora is not None:
            raise KappaTuneError(f"LoRA settings apply to LoRA methods, not {self.method}")
        if self.save_dtype not in SAVE_DTYPES:
            raise KappaTuneError(
                f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}"
            )
        if self.save_dtype != "auto" and method.lora:
            raise KappaTuneError(
                f"--save-dtype applies to --method selective or full, not {self.method}"
            )
        if self.eval_every is not None and self.eval_data is None:
            raise KappaTuneError("--eval-every needs --eval-data FILE")
        if self.eval_every is not None and self.eval_every < 1:
            raise KappaTuneError(f"--eval-every must be at least 1, got {self.eval_every}")

    @property
    def training_method(self) -> TrainingMethod:
        return get_method(self.method)


@dataclass(frozen=True)
class RunOutcome:
    """What :func:`run_training` did. ``status`` is ``done`` when ``output`` already held the
    finished run (nothing trained); ``target`` is the saved ``model/`` or ``adapter/``."""

    output: Path
    status: RunStatus
    result: TrainResult | None = None
    target: Path | None = None
    is_main: bool = True


class RunReporter(Protocol):
    """What a run tells its user (called on the main rank only)."""

    def unfit(self, data: TokenizedData, seq_len: int) -> None:
        """Examples dropped or cut with packing off (one example per row)."""

    def finished(self, output: Path) -> None:
        """``output`` already holds the finished run: nothing to do."""

    def header(self, model: str, method: str, data: TokenizedData, where: str) -> None: ...

    def note(self, text: str) -> None: ...

    def start(
        self, prepared: PreparedModel, resumed_at: int | None, total: int, checkpoint: Path
    ) -> None:
        """Training starts (``resumed_at``: the checkpoint's step, None for a fresh start)."""

    def progress(self, total: int, start: int) -> StepDisplay | None: ...

    def done(self, result: TrainResult, output: Path, processes: int | None) -> None: ...


class SilentReporter:
    """The library's default: tells nothing (see the ``logging`` records instead)."""

    def unfit(self, data: TokenizedData, seq_len: int) -> None:
        log.warning("%d example(s) dropped, %d truncated", data.dropped, data.truncated)

    def finished(self, output: Path) -> None:
        log.info("%s already holds the finished run", output)

    def header(self, model: str, method: str, data: TokenizedData, where: str) -> None:
        log.info("%s %s: %d rows x %d tokens on %s", model, method, len(data), data.seq_len, where)

    def note(self, text: str) -> None:
        log.info("%s", text)

    def start(
        self, prepared: PreparedModel, resumed_at: int | None, total: int, checkpoint: Path
    ) -> None:
        log.info("starting at step %d of %d", resumed_at or 0, total)

    def progress(self, total: int, start: int) -> StepDisplay | None:
        return None

    def done(self, result: TrainResult, output: Path, processes: int | None) -> None:
        log.info("done: %d steps; saved to %s", result.steps, output)


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
    from kappatune.training.run_dir import run_record, run_status, write_run_files

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
        processes=_processes(engine),
    )  # fmt: skip
    status: RunStatus = broadcast_from_main(lambda: run_status(out, record), str, _status)
    if status == "done":
        events.finished(out)
        return RunOutcome(out, status, is_main=engine.is_main)
    events.header(settings.model, method.name, inputs.data, _where(engine))
    if (note := _note(engine)) is not None:
        events.note(note)
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
    tokenizer: Any


def _load(settings: RunSettings, engine: Engine, events: RunReporter) -> _Inputs:
    """Data, selection (made on the main rank), model and tokenizer, checked against each other."""
    from kappatune.training.data import load_examples, tokenize
    from kappatune.training.layout import locate
    from kappatune.training.models import check_seq_len, load_causal_lm

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
        locate(model, selection)
    _log_placement(engine, model, selection)
    return _Inputs(data, eval_data, selection, model, tokenizer)


def _status(value: Any) -> RunStatus:
    assert value in ("new", "resume", "done")
    return value  # type: ignore[no-any-return]


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
    tokenizer: Any
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

    settings, engine, prepared = s.settings, s.engine, s.prepared
    config, ckpt = settings.train, settings.output / CHECKPOINT
    total = config.total_steps(len(s.data), engine.world)
    resume = engine.load_checkpoint(ckpt, prepared, config, total) if status == "resume" else None
    start = 0 if resume is None else int(resume["step"])
    s.events.start(prepared, None if resume is None else start, total, ckpt)
    watch = _watch(s, total, start, record) if engine.is_main else None

    def on_step(state: LoopState) -> None:
        if state.step % settings.checkpoint_every == 0 and state.step < total:
            engine.save_checkpoint(ckpt, state)

    try:
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


def settings_from_run(
    run_dir: str | Path,
    *,
    device: str = "auto",
    trust_remote_code: bool = False,
    report_to: tuple[str, ...] = (),
    eval_every: int | None = None,
    save_dtype: str = "auto",
) -> RunSettings:
    """The settings recorded in ``run_dir/run.json`` (and ``selection.json``); paths in it are
    as they were given, so resume from the directory the run was started in."""
    from kappatune.training.run_dir import RUN_FILE, RUN_FORMAT, SELECTION_FILE, read_record

    out = Path(run_dir)
    if not (out / RUN_FILE).is_file():
        raise KappaTuneError(f"{out} holds no kappatune run ({RUN_FILE})")
    record = read_record(out)
    try:
        if record["format"] != RUN_FORMAT:
            raise ValueError(f"unknown format {record['format']!r}")
        eval_data = record["eval_data"]
        return RunSettings(
            model=str(record["model"]),
            data=tuple(str(d) for d in record["data"]),
            method=str(record["method"]),
            output=out,
            train=TrainConfig.from_json(record["train"]),
            pack=PackConfig(seq_len=int(record["seq_len"]), pack=bool(record["pack"])),
            selection=None if record["selection"] is None else out / SELECTION_FILE,
            lora=None if record["lora"] is None else LoraSettings(**record["lora"]),
            checkpoint_every=int(record["checkpoint_every"]),
            eval_data=None if eval_data is None else tuple(str(d) for d in eval_data),
            eval_every=eval_every,
            report_to=report_to,
            device=device,
            trust_remote_code=trust_remote_code,
            save_dtype=save_dtype,
        )
    except KeyError as exc:
        raise KappaTuneError(f"cannot read {out / RUN_FILE}: it has no {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, KappaTuneError):
            raise
        raise KappaTuneError(f"cannot read {out / RUN_FILE}: {exc}") from None


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
    return run_training(settings_from_run(run_dir, **options), engine=engine, reporter=reporter)
