"""Selective fine-tuning across processes (``accelerate launch`` / ``torchrun``).

The engine is accelerate's: :class:`AccelerateEngine` hands model, optimizer and scheduler
to ``Accelerator.prepare`` (DDP, FSDP or DeepSpeed, as the launch configuration says) and
plugs into :func:`kappatune.training.loop.train_loop`. Around it:

- :func:`broadcast_from_main` runs a computation (the selection, from the checkpoint files)
  on rank 0 only and sends the result, or its error, to every rank;
- :func:`check_fsdp` refuses FSDP1 without ``use_orig_params`` (one flat parameter cannot
  hold frozen and trainable tensors) before anything is wrapped;
- checkpoints go through ``Accelerator.save_state`` (collective; sharded engines write
  their shards) into a directory that rank 0 then renames into place.

Freezing is by parameter name only (:func:`kappatune.training.freezing.apply_selection`); shapes
come from ``ds_shape`` where DeepSpeed ZeRO-3 has partitioned a parameter to shape [0].
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from kappatune.devices import resolve_device
from kappatune.errors import KappaTuneError
from kappatune.training.freezing import is_partitioned

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedTokenizerBase

    from kappatune.selection.core import Selection
    from kappatune.training.loop import LoopState, TrainConfig
    from kappatune.training.methods import PreparedModel

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E")  # what goes over the wire: picklable
_ERROR = "error"
_VALUE = "value"
CHECKPOINT_STATE = "accelerate"  # the save_state folder inside checkpoint/
FSDP_HINT = (
    "set fsdp_use_orig_params: true in the accelerate config (or --fsdp_use_orig_params true),"
    " or use FSDP2 (fsdp_version: 2)"
)


def launched() -> bool:
    """True under ``torchrun``/``accelerate launch`` with several processes, or when
    accelerate was told to use FSDP or DeepSpeed (possibly with one process)."""
    from kappatune.analysis.sharded import launched_world

    if launched_world() is not None:
        return True
    return _asked_for("FSDP") or _asked_for("DEEPSPEED")


def _asked_for(engine: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() in ("1", "true", "yes")


def engine_note(accelerator: Accelerator) -> str | None:
    """A line for the user when accelerate silently runs another engine than the one asked for."""
    kind = str(accelerator.distributed_type.value)
    if _asked_for("FSDP") and kind != "FSDP":
        return (
            f"note: accelerate runs FSDP only on accelerators; this run uses {kind} (no sharding)"
        )
    return None


def make_accelerator(grad_accum: int, device: str = "auto") -> Accelerator:
    """An Accelerator configured by the launch environment (``--device cpu``, or no CUDA,
    means gloo on CPU, also under plain torchrun). The scheduler steps once per optimizer
    step: the loop's schedule counts optimizer steps, whatever the world size."""
    from accelerate import Accelerator

    resolve_device(device)  # one-line errors for an unknown or unavailable device
    # DeepSpeed needs cpu=False even without CUDA (accelerate ignores it on a MULTI_CPU run)
    cpu = device == "cpu" or not (torch.cuda.is_available() or _asked_for("DEEPSPEED"))
    try:
        return Accelerator(
            cpu=cpu, gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False
        )
    except (RuntimeError, ValueError) as exc:  # e.g. FSDP1 on a machine without accelerators
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KappaTuneError(
            f"accelerate cannot start this launch configuration: {first}"
        ) from None


@contextlib.contextmanager
def process_index_of(rank: int) -> Iterator[None]:
    """Within the block, accelerate's state names this process by the process group's ``rank``.

    Under DeepSpeed on CPU, accelerate never learns the process group that DeepSpeed set up:
    every rank reports process index 0. ``save_state`` then has all ranks write the same
    ``random_states_0.pkl`` (and the main-process files) at once, which interleaves into a
    corrupt archive, and ``load_state`` gives every rank rank 0's RNG state. Only the index
    is corrected (the counts that size batches stay as accelerate set them), and restored.
    """
    from accelerate.state import AcceleratorState, PartialState

    states = [s for s in (PartialState._shared_state, AcceleratorState._shared_state) if s]
    if not states or all(s.get("process_index") == rank for s in states):
        yield
        return
    keys = ("process_index", "local_process_index")
    saved = [{k: s.get(k) for k in keys} for s in states]
    local = int(os.environ.get("LOCAL_RANK", rank))
    try:
        for s in states:
            s.update(process_index=rank, local_process_index=local)
        yield
    finally:
        for s, old in zip(states, saved, strict=True):
            s.update(old)


def broadcast_from_main(
    compute: Callable[[], T],
    encode: Callable[[T], E],
    decode: Callable[[E], T],
) -> T:
    """``compute()`` on rank 0 only; every rank gets its (encoded, picklable) result.

    A :class:`KappaTuneError` on rank 0 is raised on every rank, so none waits forever.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return compute()
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = {_VALUE: encode(compute())}
        except KappaTuneError as exc:
            payload[0] = {_ERROR: str(exc)}
    dist.broadcast_object_list(payload, src=0)
    message = payload[0]
    if _ERROR in message:
        raise KappaTuneError(str(message[_ERROR]))
    return decode(message[_VALUE])


def broadcast_selection(compute: Callable[[], Selection | None]) -> Selection | None:
    """The Selection (or None) that rank 0 computes, on every rank (as Selection JSON)."""
    from kappatune.selection.core import Selection

    def encode(sel: Selection | None) -> dict[str, Any] | None:
        return None if sel is None else sel.to_json()

    def decode(d: dict[str, Any] | None) -> Selection | None:
        return None if d is None else Selection.from_json(d)

    return broadcast_from_main(compute, encode, decode)


def _is_fsdp1_flat(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return any(isinstance(m, FSDP) and not m._use_orig_params for m in model.modules())


def check_fsdp(plugin: FullyShardedDataParallelPlugin | None, model: nn.Module) -> None:
    """Raise when FSDP would flatten frozen and trainable tensors into one parameter.

    ``plugin`` is accelerate's ``FullyShardedDataParallelPlugin`` (or None); ``model`` is
    the model about to be prepared, which may already be FSDP1-wrapped.
    """
    flat = plugin is not None and getattr(plugin, "fsdp_version", 1) == 1
    flat = flat and not getattr(plugin, "use_orig_params", False)
    if flat or _is_fsdp1_flat(model):
        raise KappaTuneError(
            "FSDP without use_orig_params cannot train some tensors of a flat parameter and"
            f" freeze the others; {FSDP_HINT}"
        )


class AccelerateEngine:
    """:class:`kappatune.training.loop.Engine` on an ``accelerate.Accelerator``."""

    collective = True

    def __init__(
        self,
        accelerator: Accelerator,
        batch_size: int = 1,
        max_grad_norm: float | None = None,
        resume_from: Path | None = None,
    ) -> None:
        import torch.distributed as dist

        self.accelerator = accelerator
        # the process group's view: accelerate's counts stay 1/0 for DeepSpeed on CPU
        up = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if up else int(accelerator.num_processes)
        self.rank = dist.get_rank() if up else int(accelerator.process_index)
        self.batch_size = batch_size
        self.max_grad_norm = max_grad_norm
        self.resume_from = resume_from
        self.model: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler
    ) -> tuple[nn.Module, torch.optim.Optimizer, LRScheduler]:
        check_fsdp(getattr(self.accelerator.state, "fsdp_plugin", None), model)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            self._fill_deepspeed(plugin.deepspeed_config)
        model, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.model = model
        if self.resume_from is not None:
            before = frozen_digests(model)
            with process_index_of(self.rank):
                self.accelerator.load_state(str(self.resume_from))
            changed = sorted(n for n, d in frozen_digests(model).items() if before.get(n) != d)
            if changed:
                raise KappaTuneError(
                    f"checkpoint {self.resume_from.parent} changes {len(changed)} frozen"
                    f" tensor(s) (e.g. {changed[0]}); remove it to restart"
                )
        return model, optimizer, scheduler

    def _fill_deepspeed(self, config: dict[str, Any]) -> None:
        """Our flags for the DeepSpeed config's "auto" (or missing) batch, accumulation and
        clipping entries (the loop hands accelerate no DataLoader to infer them from)."""
        gas = self.accelerator.gradient_accumulation_steps
        wanted = {
            "train_micro_batch_size_per_gpu": (self.batch_size, "--batch-size"),
            "gradient_accumulation_steps": (gas, "--grad-accum"),
            "train_batch_size": (self.batch_size * gas * self.world, "batch x accum x processes"),
            "gradient_clipping": (self.max_grad_norm or 0.0, "--max-grad-norm"),
        }
        for key, (value, flag) in wanted.items():
            have = config.get(key, "auto")
            if have == "auto":
                config[key] = value
            elif have != value:
                raise KappaTuneError(
                    f"the DeepSpeed config sets {key} {have} but {flag} gives {value};"
                    ' set it to "auto" in the config'
                )

    def device_of(self, model: nn.Module) -> torch.device:
        return torch.device(self.accelerator.device)

    def accumulate(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return self.accelerator.accumulate(model)  # type: ignore[no-any-return]

    def backward(self, loss: torch.Tensor) -> None:
        # The loop weighs each micro-batch by its share of the step's labelled tokens over
        # all ranks; the engines average over ranks and accelerate divides by the
        # accumulation steps, so undo both to keep the exact token-weighted gradient.
        scale = self.world * self.accelerator.gradient_accumulation_steps
        self.accelerator.backward(loss * scale)

    def clip(self, model: nn.Module, params: list[nn.Parameter], max_norm: float) -> None:
        # the prepared model's own parameters: FSDP replaces the ones the groups named
        live = [p for p in model.parameters() if p.requires_grad]
        self.accelerator.clip_grad_norm_(live, max_norm)

    def total(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    # ------------------------------------------------------------------ files

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self, folder: Path, state: LoopState) -> None:
        """Collective: every rank writes its part; rank 0 swaps the folder in atomically."""
        tmp = folder.parent / f".{folder.name}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.wait()
        with process_index_of(self.rank):
            self.accelerator.save_state(str(tmp / CHECKPOINT_STATE))
        self.wait()
        if self.is_main:
            from kappatune.jsonio import atomic_write_json
            from kappatune.training.checkpoint import LOOP_JSON, swap_in, write_manifest

            atomic_write_json(tmp / LOOP_JSON, {"format": 1, "state": loop_meta(state)})
            files = [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()]
            write_manifest(tmp, files, {})
            swap_in(tmp, folder)
        self.wait()

    def load_checkpoint(
        self, folder: Path, prepared: PreparedModel, config: TrainConfig, total_steps: int
    ) -> dict[str, Any] | None:
        """The loop meta of ``folder``'s checkpoint (see :func:`resume_point`); accelerate's
        state (model, optimizer, scheduler) is loaded in :meth:`prepare`, which refuses one
        that changes a frozen tensor."""
        point = resume_point(folder)
        if point is None:
            return None
        self.resume_from, meta = point
        return meta

    def save_model(
        self, target: Path, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype | None = None
    ) -> None:
        """Collective: gather the full state dict (FSDP, ZeRO-3); rank 0 writes ``target``
        (floating-point tensors cast to ``dtype`` when given)."""
        assert self.model is not None, "prepare() first"
        unwrapped = self.accelerator.unwrap_model(self.model)
        if any(is_partitioned(p) for p in unwrapped.parameters()):
            state = _gathered_state(unwrapped, self.is_main)
        else:
            state = self.accelerator.get_state_dict(self.model)
        if self.is_main and dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        if self.is_main:
            tmp = target.parent / f".{target.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save_pretrained(tmp, state_dict=state, is_main_process=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        self.wait()


def _gathered_state(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """Full-precision state dict of a ZeRO-3 model, gathered on every rank and kept where
    ``keep`` (whatever ``stage3_gather_16bit_weights_on_model_save`` says)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if not keep:
            return {}
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def frozen_digests(model: nn.Module) -> dict[str, str]:
    """Digests of every frozen parameter's local bytes (a ZeRO-3 rank's partition, an FSDP
    shard): a resumed checkpoint must leave them as they are."""
    from kappatune.training.freezing import tensor_digest

    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        local = getattr(p, "ds_tensor", None) if is_partitioned(p) else p
        if not p.requires_grad and local is not None:
            out[name] = tensor_digest(local)
    return out


def loop_meta(state: LoopState) -> dict[str, Any]:
    """What ``loop.json`` keeps next to accelerate's state (optimizer and scheduler live there)."""
    return {
        "step": state.step,
        "losses": list(state.losses),
        "step_times": list(state.step_times),
        "ema": state.ema,
    }


def resume_point(ckpt: Path) -> tuple[Path, dict[str, Any]] | None:
    """(save_state folder, loop meta) of the checkpoint folder ``ckpt``, or None when there is none.

    Every file is checked against the manifest's sizes and digests, and every pickle that
    accelerate, DeepSpeed or torch.distributed.checkpoint would load is scanned first
    (:mod:`kappatune.training.pickles`): only plain data and tensors may be rebuilt.
    """
    import json

    from kappatune.training.checkpoint import (
        LOOP_JSON,
        CheckpointError,
        check_history,
        verify_files,
    )

    if not ckpt.exists():
        return None
    if not (ckpt / CHECKPOINT_STATE).is_dir():
        raise KappaTuneError(
            f"checkpoint {ckpt} was written by a single-process run; resume it without"
            " accelerate launch/torchrun, or remove it to restart"
        )
    from kappatune.training.pickles import check_folder

    verify_files(ckpt)
    check_folder(ckpt / CHECKPOINT_STATE)
    try:
        meta = json.loads((ckpt / LOOP_JSON).read_text(encoding="utf-8"))["state"]
        check_history(meta)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(ckpt, f"has an unreadable {LOOP_JSON} ({exc})") from None
    return ckpt / CHECKPOINT_STATE, dict(meta)
