"""Apply a Selection to a model: requires_grad on every parameter, optimizer groups, checks.

No optimizer wrapper: :func:`apply_selection` freezes everything that is not selected and
returns parameter groups (decay / no-decay) for any torch optimizer, so optimizer state is
created only for the selected tensors.

Fused expert tensors (experts x out x in) of which only some experts are selected get a
gradient hook that zeroes the gradient of the other experts (or, where transformers fused
a checkpoint's gate and up projections into one tensor, of the unselected rows). Adam-type
optimizers then leave those experts unchanged (their moments stay exactly zero), but
decoupled weight decay would still shrink them, so such tensors always go into a group with
``weight_decay=0.0`` (group name ``"masked_experts"``); do not add weight decay to it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from kappatune.errors import KappaTuneError
from kappatune.selection.core import Selection
from kappatune.selection.policies import RowKey
from kappatune.training.layout import Part, locate, match_param, raise_missing, suffix_index

log = logging.getLogger(__name__)

_HOOKS: weakref.WeakKeyDictionary[nn.Module, list[Any]] = weakref.WeakKeyDictionary()
_MASKS: weakref.WeakKeyDictionary[nn.Module, dict[int, torch.Tensor]] = weakref.WeakKeyDictionary()


def param_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The real shape of a parameter: DeepSpeed ZeRO-3 shows partitioned ones as shape [0]
    and keeps the full shape in ``ds_shape``."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def param_numel(p: torch.Tensor) -> int:
    """Element count of the whole parameter (``ds_numel`` under ZeRO-3)."""
    ds = getattr(p, "ds_numel", None)
    return int(ds) if ds is not None else math.prod(param_shape(p))


def is_partitioned(p: torch.Tensor) -> bool:
    return getattr(p, "ds_shape", None) is not None


def resolve_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Selection name -> model parameter name (exact, or the unique one ending in ``.name``).

    The suffix rule lets a selection made on the checkpoint apply to a wrapped model
    (``module.`` from DDP, ``base_model.model.`` from PEFT). Raises listing what is missing.
    Checkpoint tensors that transformers fuses at load time are found by
    :func:`kappatune.training.layout.locate`, which :func:`apply_selection` uses.
    """
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    index = suffix_index(params)
    out = {n: p for n in names if (p := match_param(n, params, index)) is not None}
    missing = [(n, "not a parameter of the model") for n in names if n not in out]
    if missing:
        raise_missing(missing, params)
    return out


def _expert_mask_hook(mask: torch.Tensor) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(device=grad.device, dtype=grad.dtype)

    return hook


def remove_hooks(model: nn.Module) -> None:
    """Remove the expert-masking gradient hooks a previous ``apply_selection`` installed."""
    for handle in _HOOKS.pop(model, []):
        handle.remove()
    _MASKS.pop(model, None)


def _masks(
    parts: Mapping[RowKey, Part], params: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Gradient masks of the parameters of which only some experts (or rows) are selected."""
    by_param: dict[str, list[Part]] = {}
    for part in parts.values():
        by_param.setdefault(part.param, []).append(part)
    masks: dict[str, torch.Tensor] = {}
    for name, chosen in by_param.items():
        if any(part.whole for part in chosen):
            continue
        p = params[name]
        shape = param_shape(p)
        if len(shape) != 3:
            raise KappaTuneError(
                f"selection picks experts of {name!r} but the model's tensor has shape {shape}"
                " (not a fused experts x out x in tensor)"
            )
        spans = [(q.expert, q.rows) for q in chosen if q.expert is not None]
        bad = sorted({e for e, _ in spans if not 0 <= e < shape[0]})
        if bad:
            raise KappaTuneError(
                f"{name!r} has {shape[0]} experts; the selection names expert(s) {bad}"
            )
        by_rows = any(rows is not None for _, rows in spans)
        mask = torch.zeros(shape[0], shape[1] if by_rows else 1, 1)
        for expert, rows in spans:
            start, stop = rows or (0, mask.shape[1])
            mask[expert, start:stop] = 1.0
        if bool(mask.all()):
            continue
        if is_partitioned(p):
            what = (
                "rows of experts"
                if by_rows
                else f"{len({e for e, _ in spans})} of {shape[0]} experts"
            )
            raise KappaTuneError(
                f"selection trains {what} of {name!r}, but DeepSpeed"
                " ZeRO-3 partitions that tensor and its gradient cannot be masked per expert;"
                " exclude it from the selection or use ZeRO-2"
            )
        masks[name] = mask
    return masks


def apply_selection(
    model: nn.Module,
    selection: Selection,
    *,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Freeze every parameter except the selected ones; return optimizer parameter groups.

    Groups: ``decay`` (selected matrices, ``weight_decay``), ``no_decay`` (selected 1-D
    tensors), ``masked_experts`` (fused expert tensors with only some experts selected,
    always ``weight_decay=0.0``). Empty groups are left out. Each group carries its
    parameter names under ``"names"``.
    """
    parts = locate(model, selection)
    params = dict(model.named_parameters(remove_duplicate=False))
    masks = _masks(parts, params)
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    for entry in selection.entries:
        name = parts[entry.key].param
        p = params[name]
        if not p.is_floating_point():
            raise KappaTuneError(
                f"selected tensor {entry.name!r} has dtype {p.dtype}: only float tensors can train"
            )
        chosen.setdefault(id(p), (name, p))
    remove_hooks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in chosen.values():
        p.requires_grad_(True)
    handles = [params[n].register_hook(_expert_mask_hook(m)) for n, m in masks.items()]
    if handles:
        _HOOKS[model] = handles
        _MASKS[model] = {id(params[n]): m for n, m in masks.items()}
        log.info("masking gradients of unselected experts in %d fused tensors", len(handles))
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "names": [], "weight_decay": weight_decay, "group": "decay"},
        "no_decay": {"params": [], "names": [], "weight_decay": 0.0, "group": "no_decay"},
        "masked_experts": {
            "params": [],
            "names": [],
            "weight_decay": 0.0,
            "group": "masked_experts",
        },
    }
    for name, p in chosen.values():
        matrix = len(param_shape(p)) >= 2
        kind = "masked_experts" if name in masks else ("decay" if matrix else "no_decay")
        groups[kind]["params"].append(p)
        groups[kind]["names"].append(name)
    return [g for g in groups.values() if g["params"]]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of parameters with ``requires_grad`` (tied weights once), in module order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_parameters(model: nn.Module) -> int:
    """Elements that training can change: masked experts (or rows) count only where selected."""
    masks = _MASKS.get(model, {})
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            mask = masks.get(id(p))
            total += param_numel(p) if mask is None else int(mask.expand(param_shape(p)).sum())
    return total


def tensor_digest(t: torch.Tensor) -> str:
    """blake2b of a tensor's bytes (bit-exact identity)."""
    data = t.detach().to("cpu").contiguous()
    raw = data.view(torch.uint8) if data.dtype != torch.bool else data.to(torch.uint8)
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


def frozen_digests(model: nn.Module) -> dict[str, str]:
    """Digests of every frozen parameter."""
    out: dict[str, str] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            out[name] = tensor_digest(p)
    return out


def check_frozen(model: nn.Module, before: Mapping[str, str]) -> list[str]:
    """Names of tensors in ``before`` whose bytes changed (empty list: all bit-identical)."""
    params = dict(model.named_parameters())
    return sorted(n for n, d in before.items() if tensor_digest(params[n]) != d)
