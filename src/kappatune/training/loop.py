"""A plain PyTorch training loop, and the engines it runs on.

``prepare_model(model, method, selection, lora)`` sets up one of the registered training
methods (:mod:`kappatune.training.methods`: ``selective``, ``kappa-lora``, ``lora``,
``full``) and returns the optimizer parameter groups.
``train_loop(model, data, config, stop)`` then runs AdamW with warm-up and a schedule,
gradient accumulation (token-weighted), optional stopping when an exponential moving
average of the training loss reaches a target, and records the loss and time of every
step. The loop is a function; checkpointing is a callback (``on_step``) plus
:class:`LoopState`'s ``state_dict``, so callers decide where state goes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from kappatune.errors import KappaTuneError
from kappatune.selection.core import Selection
from kappatune.training.config import DEFAULT_LORA_R as DEFAULT_LORA_R
from kappatune.training.config import SCHEDULERS as SCHEDULERS
from kappatune.training.config import SCHEMA_VERSION as SCHEMA_VERSION
from kappatune.training.config import (  # declared without torch, for the CLI's flags
    LoraSettings,
    StopRule,
    TrainConfig,
)
from kappatune.training.data import IGNORE_INDEX, Batch, TokenizedData
from kappatune.training.freezing import param_numel
from kappatune.training.methods import PreparedModel, TrainingMethod, decay_groups, get_method

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def prepare_model(
    model: nn.Module,
    method: str | TrainingMethod,
    selection: Selection | None = None,
    lora: LoraSettings | None = None,
    weight_decay: float = 0.0,
) -> PreparedModel:
    """Set up ``model`` for a registered method (see :func:`kappatune.training.methods.get_method`)
    and return it with its parameter groups."""
    return get_method(method).prepare(model, selection, lora, weight_decay)


# --------------------------------------------------------------------------- the loop


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step ``s`` (0-based): linear warm-up, then the schedule."""

    def f(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.scheduler == "constant":
            return 1.0
        span = max(1, total_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        if config.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_optimizer(param_groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.AdamW:
    if not param_groups or not any(g["params"] for g in param_groups):
        raise KappaTuneError("nothing to train: no parameter requires a gradient")
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )


@dataclass
class LoopState:
    """What a resumed run needs: optimizer and scheduler state, history and the EMA."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    ema: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        """References to the live optimizer state: save it (``torch.save``) before training on."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "losses": list(self.losses),
            "step_times": list(self.step_times),
            "ema": self.ema,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Optimizer and scheduler are left alone when absent (an engine restored them)."""
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]
        self.step_times = [float(x) for x in state["step_times"]]
        self.ema = float(state["ema"])


def reference_state(
    param_groups: list[dict[str, Any]], config: TrainConfig, total_steps: int
) -> dict[str, Any]:
    """The :meth:`LoopState.state_dict` a fresh run of ``config`` starts from: what a
    checkpoint's loop state is checked against (same keys, types and group sizes)."""
    optimizer = build_optimizer(param_groups, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    return LoopState(optimizer, scheduler).state_dict()


@dataclass(frozen=True)
class StepRecord:
    """What one optimizer step did, for observers (logs, progress lines, trackers)."""

    step: int
    total_steps: int
    loss: float
    lr: float  # the learning rate this step used (of the first parameter group)
    tokens: int  # input tokens this step processed, all ranks together
    seconds: float  # wall time of this step

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


StepObserver = Callable[[StepRecord], None]


@dataclass(frozen=True)
class TrainResult:
    steps: int
    total_steps: int
    losses: tuple[float, ...]
    step_times: tuple[float, ...]
    ema_loss: float
    stopped_by: str  # "steps" | "target_loss" | "max_steps"
    trainable_params: int
    tokens: int

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan

    @property
    def mean_step_time(self) -> float:
        return sum(self.step_times) / len(self.step_times) if self.step_times else math.nan

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["losses"], d["step_times"] = list(self.losses), list(self.step_times)
        return d


class Engine(Protocol):
    """Where the loop runs: one process (:class:`LocalEngine`) or a launched world
    (``kappatune.training.accelerate_engine.AccelerateEngine``). Each of the ``world`` ranks trains
    on every ``world``-th micro-batch; ``backward`` gets the rank's share of the
    token-weighted step loss. A ``collective`` engine runs every micro-batch (ranks
    exchange gradients in lock step), even one without labelled tokens.

    The engine also owns what a run keeps on disk: ``save_checkpoint`` and
    ``load_checkpoint`` (resume) and ``save_model``, each collective (every rank calls it;
    the main rank writes), with ``wait`` as the barrier between ranks."""

    world: int
    rank: int
    collective: bool

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and talks (rank 0)."""
        ...

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler
    ) -> tuple[nn.Module, torch.optim.Optimizer, LRScheduler]: ...

    def device_of(self, model: nn.Module) -> torch.device: ...

    def accumulate(self, model: nn.Module) -> contextlib.AbstractContextManager[None]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip(self, model: nn.Module, params: list[nn.Parameter], max_norm: float) -> None: ...

    def total(self, value: float) -> float:
        """Sum of ``value`` over the ranks."""
        ...

    def wait(self) -> None:
        """Barrier: return when every rank has called it."""
        ...

    def save_checkpoint(self, folder: Path, state: LoopState) -> None:
        """Write the trained tensors and the loop ``state`` to ``folder`` (replaced atomically)."""
        ...

    def load_checkpoint(
        self, folder: Path, prepared: PreparedModel, config: TrainConfig, total_steps: int
    ) -> dict[str, Any] | None:
        """The loop state to resume from (``train_loop``'s ``resume``), or None when there is
        no ``folder``. Before anything is loaded the checkpoint is verified (manifest digests,
        nothing unpickled); one that would change a frozen tensor is refused."""
        ...

    def save_model(
        self, target: Path, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype | None = None
    ) -> None:
        """Save the trained model (a PEFT model: its adapter) and ``tokenizer`` to ``target``
        (replaced atomically), floating-point tensors cast to ``dtype`` when given."""
        ...


@dataclass
class LocalEngine:
    """One process, on ``device`` (default: where the model's parameters are); ``prepare``
    moves the model there (the optimizer's parameters stay the same objects)."""

    device: torch.device | str | None = None
    world: int = 1
    rank: int = 0
    collective: bool = False
    model: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler
    ) -> tuple[nn.Module, torch.optim.Optimizer, LRScheduler]:
        if self.device is not None:
            model.to(self.device)
        self.model = model
        return model, optimizer, scheduler

    def device_of(self, model: nn.Module) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return next(model.parameters()).device

    def accumulate(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self, model: nn.Module, params: list[nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    def total(self, value: float) -> float:
        return value

    def wait(self) -> None:
        return None

    def save_checkpoint(self, folder: Path, state: LoopState) -> None:
        """safetensors and JSON with a manifest of digests (nothing pickled); see
        :mod:`kappatune.training.checkpoint`."""
        from kappatune.training.checkpoint import swap_in, write_checkpoint

        assert self.model is not None, "prepare() first"
        tmp = folder.parent / f".{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_checkpoint(tmp, _trainable_state(self.model), state.state_dict())
        swap_in(tmp, folder)

    def load_checkpoint(
        self, folder: Path, prepared: PreparedModel, config: TrainConfig, total_steps: int
    ) -> dict[str, Any] | None:
        """Copies the checkpoint's tensors into ``prepared.model``. Only the run's own trainable
        tensors, with their shapes and dtypes, are accepted, only from files that match the
        manifest's digests, and only with a loop state shaped like the one this run writes."""
        from kappatune.training.checkpoint import TensorSpec, check_loop_state, read_checkpoint

        if not folder.exists():
            return None
        params = {n: p for n, p in prepared.model.named_parameters() if p.requires_grad}
        tensors, state = read_checkpoint(folder, {n: TensorSpec.of(p) for n, p in params.items()})
        shapes = [[tuple(p.shape) for p in g["params"]] for g in prepared.param_groups]
        reference = reference_state(prepared.param_groups, config, total_steps)
        check_loop_state(folder, state, reference, shapes)
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)
        return state

    def save_model(
        self, target: Path, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype | None = None
    ) -> None:
        assert self.model is not None, "prepare() first"
        if dtype is not None:
            self.model.to(dtype)
        tmp = target.parent / f".{target.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_pretrained(tmp)  # type: ignore[operator]  # safetensors; PEFT: the adapter
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }


def micro_batches(data: TokenizedData, config: TrainConfig, start: int = 0) -> Iterator[Batch]:
    """Micro-batches from index ``start`` on, reshuffled each epoch with seed + epoch."""
    per_epoch = math.ceil(len(data) / config.batch_size)
    k = start
    while True:
        epoch, pos = divmod(k, per_epoch)
        batches = list(
            data.batches(config.batch_size, shuffle=config.shuffle, seed=config.seed + epoch)
        )
        for b in batches[pos:]:
            yield b
            k += 1


def _label_tokens(batch: Batch) -> int:
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def ema_corrected(state: LoopState, decay: float) -> float:
    return state.ema / (1.0 - decay**state.step) if state.step else math.nan


def _reached(stop: StopRule, state: LoopState) -> bool:
    if stop.target_loss is None or state.step < stop.min_steps:
        return False
    return ema_corrected(state, stop.ema_decay) <= stop.target_loss


def train_loop(
    model: nn.Module,
    data: TokenizedData,
    config: TrainConfig,
    stop: StopRule | None = None,
    *,
    param_groups: list[dict[str, Any]] | None = None,
    resume: Mapping[str, Any] | None = None,
    on_step: Callable[[LoopState], None] | None = None,
    device: torch.device | str | None = None,
    engine: Engine | None = None,
    observer: StepObserver | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with AdamW; returns per-step losses and times.

    ``param_groups`` default to the trainable parameters (decay / no-decay). ``resume`` is a
    :meth:`LoopState.state_dict` from an earlier run with the same config and data; the run
    continues at the next step with the same batches it would have seen. ``on_step`` is
    called after every optimizer step (e.g. to checkpoint); ``observer`` gets a
    :class:`StepRecord` of every step just before ``on_step`` (to log it). ``engine``
    (default: one process on ``device``) prepares, and takes the backward pass of, the model
    that trains: read the prepared model from the engine, not from ``model``.
    """
    stop = stop or StopRule()
    engine = engine or LocalEngine(device)
    if len(data) == 0:
        raise KappaTuneError("no training rows")
    groups = param_groups if param_groups is not None else decay_groups(model, config.weight_decay)
    trainable = [p for g in groups for p in g["params"]]
    trainable_params = sum(param_numel(p) for p in trainable)  # before an engine shards them
    optimizer: torch.optim.Optimizer = build_optimizer(groups, config)
    total = config.total_steps(len(data), engine.world)
    scheduler: LRScheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total))
    model, optimizer, scheduler = engine.prepare(model, optimizer, scheduler)
    state = LoopState(optimizer, scheduler)
    if resume is not None:
        state.load_state_dict(resume)
    limit = total if stop.max_steps is None else min(total, stop.max_steps)
    dev = engine.device_of(model)
    per_step = config.grad_accum * engine.world
    _seed_everything(config.seed + state.step)
    batches = micro_batches(data, config, start=state.step * per_step)
    model.train()
    tokens = 0
    stopped_by = "steps" if limit == total else "max_steps"
    while state.step < limit:
        started = time.perf_counter()
        group = [next(batches) for _ in range(per_step)]
        weights = [_label_tokens(b) for b in group]
        denom = max(1, sum(weights))
        step_loss = 0.0
        step_tokens = 0
        for b, w in list(zip(group, weights, strict=True))[engine.rank :: engine.world]:
            if w == 0 and not engine.collective:
                continue
            with engine.accumulate(model):
                out = model(**b.to(dev).model_inputs())
                # a rank with nothing to learn still takes part in the gradient exchange
                loss = out.loss * (w / denom) if w else out.logits.sum() * 0.0
                engine.backward(loss)
            step_loss += float(out.loss.detach()) * w / denom if w else 0.0
            step_tokens += int(b.attention_mask.sum())
        step_loss = engine.total(step_loss)
        step_tokens = int(engine.total(float(step_tokens)))
        tokens += step_tokens
        lr = float(optimizer.param_groups[0]["lr"])
        if config.max_grad_norm is not None:
            engine.clip(model, trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.losses.append(step_loss)
        state.step_times.append(time.perf_counter() - started)
        state.ema = stop.ema_decay * state.ema + (1 - stop.ema_decay) * step_loss
        if not math.isfinite(step_loss):
            raise KappaTuneError(
                f"training diverged: loss {step_loss} at step {state.step} (lower --lr?)"
            )
        if observer is not None:
            seconds = state.step_times[-1]
            observer(StepRecord(state.step, limit, step_loss, lr, step_tokens, seconds))
        if on_step is not None:
            on_step(state)
        if _reached(stop, state):
            stopped_by = "target_loss"
            break
    model.eval()
    return TrainResult(
        steps=state.step,
        total_steps=total,
        losses=tuple(state.losses),
        step_times=tuple(state.step_times),
        ema_loss=ema_corrected(state, stop.ema_decay),
        stopped_by=stopped_by,
        trainable_params=trainable_params,
        tokens=tokens,
    )


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: TokenizedData, batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy over every labelled token of ``data``."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for b in data.batches(batch_size):
        n = _label_tokens(b)
        if n == 0:
            continue
        total += float(model(**b.to(dev).model_inputs()).loss) * n
        count += n
    model.train(was_training)
    if count == 0:
        raise KappaTuneError("no labelled tokens to evaluate")
    return total / count
