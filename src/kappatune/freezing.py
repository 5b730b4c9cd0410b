"""Apply a Selection to a model: requires_grad on every parameter, optimizer groups, checks.

No optimizer wrapper: :func:`apply_selection` freezes everything that is not selected and
returns parameter groups (decay / no-decay) for any torch optimizer, so optimizer state is
created only for the selected tensors.

Fused expert tensors (experts x out x in) of which only some experts are selected get a
gradient hook that zeroes the gradient of the other experts. Adam-type optimizers then
leave those experts unchanged (their moments stay exactly zero), but decoupled weight
decay would still shrink them, so such tensors always go into a group with
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
from kappatune.selection import Selection

log = logging.getLogger(__name__)

_HOOKS: weakref.WeakKeyDictionary[nn.Module, list[Any]] = weakref.WeakKeyDictionary()


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
    """
    params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    exact = set(params)
    out: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        if name in exact:
            out[name] = name
            continue
        hits = [p for p in params if p.endswith("." + name)]
        if len(hits) == 1:
            out[name] = hits[0]
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise KappaTuneError(
            f"{len(missing)} selected tensor(s) are not parameters of the model ({shown});"
            f" the model has {len(params)} parameters, e.g. {params[0] if params else 'none'}"
            " (was the selection made for another model?)"
        )
    return out


def _expert_mask_hook(mask: torch.Tensor) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * mask.to(device=grad.device, dtype=grad.dtype)

    return hook


def remove_hooks(model: nn.Module) -> None:
    """Remove the expert-masking gradient hooks a previous ``apply_selection`` installed."""
    for handle in _HOOKS.pop(model, []):
        handle.remove()


def _expert_masks(
    selection: Selection, resolved: Mapping[str, str], params: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}
    for name, experts in selection.experts().items():
        if experts is None:
            continue
        p = params[resolved[name]]
        shape = param_shape(p)
        if len(shape) != 3:
            raise KappaTuneError(
                f"selection picks experts of {name!r} but the model's tensor has shape {shape}"
                " (not a fused experts x out x in tensor)"
            )
        bad = [e for e in experts if not 0 <= e < shape[0]]
        if bad:
            raise KappaTuneError(
                f"{name!r} has {shape[0]} experts; the selection names expert(s) {bad}"
            )
        if len(experts) < shape[0]:
            if is_partitioned(p):
                raise KappaTuneError(
                    f"selection trains {len(experts)} of {shape[0]} experts of {name!r}, but DeepSpeed"
                    " ZeRO-3 partitions that tensor and its gradient cannot be masked per expert;"
                    " exclude it from the selection or use ZeRO-2"
                )
            mask = torch.zeros(shape[0], 1, 1)
            mask[list(experts)] = 1.0
            masks[resolved[name]] = mask
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
    resolved = resolve_names(model, selection.names)
    params = dict(model.named_parameters(remove_duplicate=False))
    masks = _expert_masks(selection, resolved, params)
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    for name in selection.names:
        p = params[resolved[name]]
        if not p.is_floating_point():
            raise KappaTuneError(
                f"selected tensor {name!r} has dtype {p.dtype}: only float tensors can train"
            )
        chosen.setdefault(id(p), (resolved[name], p))
    remove_hooks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in chosen.values():
        p.requires_grad_(True)
    handles = [params[n].register_hook(_expert_mask_hook(m)) for n, m in masks.items()]
    if handles:
        _HOOKS[model] = handles
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
    return sum(param_numel(p) for p in model.parameters() if p.requires_grad)


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
