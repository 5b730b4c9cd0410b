"""A bench run's training state at its last checkpoint, kept so an interrupted run goes on from
there instead of training again from step 0 (a 256-step run of full fine-tuning is half an
hour on a CPU).

Layout under the output directory::

    state/<scenario>/<run key>/   trained tensors and loop state (optimizer, scheduler, losses)

The folder is named by the run's key, so a state made under other settings is never read; it is
written with :mod:`kappatune.training.checkpoint` (safetensors and JSON, a manifest of digests,
nothing pickled), replaced atomically at each checkpoint, checked against the run's own
trainable tensors and loop-state structure when read, and removed when the run finishes. The
bench's arms train without dropout, so no random state is consumed between steps and a resumed
run's numbers are those of an uninterrupted one.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from kappatune.training.loop import LoopState, TrainConfig

log = logging.getLogger(__name__)


def state_dir(root: Path, scenario: str, key: str) -> Path:
    return root / "state" / scenario / key


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(folder: Path, model: nn.Module, state: LoopState) -> None:
    """The trained tensors of ``model`` and the loop ``state`` into ``folder`` (atomically)."""
    from kappatune.training.checkpoint import swap_in, write_checkpoint
    from kappatune.training.loop import _trainable_state  # what LocalEngine saves

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, _trainable_state(model), state.state_dict())
    swap_in(tmp, folder)


def load_state(
    folder: Path,
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    config: TrainConfig,
    stored_steps: Sequence[int],
) -> Mapping[str, Any] | None:
    """The loop state kept in ``folder``, its tensors copied into ``model``; None (training
    starts again at step 0) when there is none, when it does not fit this run, or when a
    checkpoint at or before its step has no stored point (``stored_steps``)."""
    from kappatune.training.checkpoint import (
        TensorSpec,
        check_loop_state,
        read_checkpoint,
    )
    from kappatune.training.loop import reference_state

    if not folder.is_dir():
        return None
    params = _trainable(model)
    try:
        tensors, state = read_checkpoint(folder, {n: TensorSpec.of(p) for n, p in params.items()})
        shapes = [[tuple(p.shape) for p in g["params"]] for g in param_groups]
        reference = reference_state(param_groups, config, int(config.steps or 0))
        check_loop_state(folder, state, reference, shapes)
    except KappaTuneError as exc:
        log.warning("kept training state not used (%s): training from step 0", exc)
        return None
    step = int(state["step"])
    if step not in stored_steps:
        log.warning(
            "kept training state at step %d has no stored point: training from step 0", step
        )
        return None
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return state


def drop_state(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
