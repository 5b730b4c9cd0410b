"""KappaTune-LoRA: a Selection as PEFT targets, and LoRA sized to a parameter budget.

:func:`peft_targets` returns PEFT's own dict format (the one ``peft.helpers.
find_kappa_target_modules`` returns), ``{"target_modules": [...], "target_parameters":
[...] or None}``, in selection (kappa) order, so users can switch between the two.

Whole 2-D tensors, kernels and per-expert modules (``experts.5.w1.weight``) become module
targets (the parameter name without ``.weight``). Experts of a fused 3-D tensor become a
``target_parameters`` entry: PEFT's LoRA on a fused parameter adapts every expert of it,
so a partial expert selection widens to the whole tensor there (selective fine-tuning,
``kappatune.training.freezing``, masks experts exactly instead).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from kappatune.errors import KappaTuneError
from kappatune.selection.core import Selection
from kappatune.training.layout import locate, locate_by_type

if TYPE_CHECKING:  # peft is imported when a config is built
    from peft import LoraConfig

log = logging.getLogger(__name__)

Targets = dict[str, list[str] | None]
_WEIGHT_SUFFIX = ".weight"


def _ordered_targets(
    selection: Selection, model: nn.Module | None, model_type: str | None = None
) -> list[tuple[str, bool]]:
    """(target, is a fused parameter) in selection order, each target once.

    With ``model`` (or, without one, its ``model_type``), names go through
    :func:`kappatune.training.layout.locate`, so checkpoint experts that transformers fuses at load
    time become their fused parameter.
    """
    # without a model or a model_type the names stay the files'
    parts = locate(model, selection) if model is not None else locate_by_type(model_type, selection)
    out: dict[str, bool] = {}
    for entry in selection.entries:
        part = parts[entry.key]
        if not part.whole:  # one expert (or its rows) of a fused tensor
            out.setdefault(part.param, True)
            continue
        name = part.param
        if not name.endswith(_WEIGHT_SUFFIX):
            raise KappaTuneError(
                f"cannot target {name!r} with LoRA: only '.weight' tensors of modules can be adapted"
            )
        out.setdefault(name.removesuffix(_WEIGHT_SUFFIX), False)
    return list(out.items())


def peft_targets(
    selection: Selection, model: nn.Module | None = None, *, model_type: str | None = None
) -> Targets:
    """``{"target_modules": [...], "target_parameters": [...] or None}`` in selection order.

    Give ``model`` (or its ``model_type``) to name the modules and parameters the loaded
    model has (they differ where transformers fuses a checkpoint's per-expert tensors).
    """
    return _as_targets(_ordered_targets(selection, model, model_type))


def _as_targets(ordered: Sequence[tuple[str, bool]]) -> Targets:
    modules = [n for n, fused in ordered if not fused]
    parameters = [n for n, fused in ordered if fused]
    if parameters:
        log.info("LoRA on fused expert tensors adapts all their experts: %s", ", ".join(parameters))
    return {"target_modules": modules, "target_parameters": parameters or None}


def lora_config(
    selection: Selection,
    r: int = 8,
    alpha: int | None = None,
    dropout: float = 0.0,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> LoraConfig:
    """``peft.LoraConfig`` adapting exactly the selected modules (alpha defaults to 2 r).

    Pass ``model`` where transformers fuses the checkpoint's experts (see :func:`peft_targets`).
    """
    targets = peft_targets(selection, model)
    return config_from_targets(targets, r, alpha, dropout=dropout, **kwargs)


# --------------------------------------------------------------------------- sizing


def _module_cost(module: nn.Module) -> int:
    """LoRA parameters per unit of rank for one module, as PEFT builds them."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings + module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.in_features + module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        return module.in_channels * k + module.out_channels
    if weight is not None and weight.dim() == 2:  # transformers' Conv1D (in, out)
        return int(weight.shape[0] + weight.shape[1])
    raise KappaTuneError(f"cannot size LoRA for module type {type(module).__name__}")


def rank_costs(
    model: nn.Module, targets: Mapping[str, Sequence[str] | None]
) -> list[tuple[str, int]]:
    """(target, LoRA parameters per unit of rank) for each target, in target order."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    out: list[tuple[str, int]] = []
    for name in targets.get("target_modules") or ():
        if name not in modules:
            raise KappaTuneError(f"LoRA target module {name!r} is not a module of the model")
        out.append((name, _module_cost(modules[name])))
    for name in targets.get("target_parameters") or ():
        if name not in params:
            raise KappaTuneError(f"LoRA target parameter {name!r} is not a parameter of the model")
        shape = params[name].shape
        experts, (a, b) = (shape[0], shape[1:]) if len(shape) == 3 else (1, shape)
        out.append((name, int(experts * (a + b))))
    return out


def lora_param_count(model: nn.Module, targets: Mapping[str, Sequence[str] | None], r: int) -> int:
    """Trainable parameters PEFT creates for ``targets`` at rank ``r`` (no LoRA bias)."""
    return r * sum(c for _, c in rank_costs(model, targets))


@dataclass(frozen=True)
class LoraPlan:
    """LoRA targets and rank chosen for a parameter budget."""

    targets: dict[str, list[str] | None]
    r: int
    params: int
    budget: int

    @property
    def shortfall(self) -> int:
        return self.budget - self.params


def rank_for_budget(
    model: nn.Module, selection: Selection, budget: int, max_rank: int = 4096
) -> LoraPlan:
    """The largest rank whose LoRA on all selected modules stays within ``budget`` parameters."""
    targets = peft_targets(selection, model)
    per_rank = sum(c for _, c in rank_costs(model, targets))
    r = min(max_rank, budget // per_rank)
    if r < 1:
        raise KappaTuneError(
            f"LoRA budget {budget:,} is below rank 1 on the {selection.tensor_count} selected modules"
            f" ({per_rank:,} parameters)"
        )
    return LoraPlan(targets, r, r * per_rank, budget)


def modules_for_budget(
    model: nn.Module, selection: Selection, r: int, budget: int, greedy: bool = False
) -> LoraPlan:
    """The selected modules that fit ``budget`` at rank ``r``: a prefix of the selection order.

    As parameter budgets of :func:`kappatune.selection.core.select`: modules in order until the next
    adapter would overshoot; ``greedy`` skips that one and fills on with later, smaller ones.
    """
    if r < 1:
        raise KappaTuneError(f"LoRA rank must be at least 1, got {r}")
    ordered = _ordered_targets(selection, model)
    costs = dict(rank_costs(model, _as_targets(ordered)))
    chosen: list[tuple[str, bool]] = []
    used = 0
    for name, fused in ordered:
        if used + r * costs[name] <= budget:
            chosen.append((name, fused))
            used += r * costs[name]
        elif not greedy:
            break
    if not chosen:
        first = r * costs[ordered[0][0]]
        raise KappaTuneError(
            f"LoRA budget {budget:,} is below the first module's rank-{r} adapter"
            f" ({ordered[0][0]}, {first:,} parameters)"
        )
    return LoraPlan(_as_targets(chosen), r, used, budget)


def all_linear_targets(model: nn.Module, exclude: Sequence[str] = ("lm_head",)) -> Targets:
    """Every ``nn.Linear`` (and Conv1D) module except the output head: plain LoRA's usual targets."""
    names = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in exclude or not name:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.append(name)
    if not names:
        raise KappaTuneError("the model has no linear layers to adapt with LoRA")
    return {"target_modules": names, "target_parameters": None}


def config_from_targets(
    targets: Mapping[str, Sequence[str] | None],
    r: int,
    alpha: int | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> LoraConfig:
    """``peft.LoraConfig`` for explicit targets (e.g. a :class:`LoraPlan`'s); alpha defaults to 2 r."""
    from peft import LoraConfig

    if r < 1:
        raise KappaTuneError(f"LoRA rank must be at least 1, got {r}")
    modules = list(targets.get("target_modules") or [])
    params = list(targets.get("target_parameters") or [])
    if not modules and not params:
        raise KappaTuneError("no LoRA targets: the selection names no module or parameter")
    if params and dropout:
        raise KappaTuneError(
            f"LoRA dropout {dropout} is not supported on fused expert tensors (PEFT target_parameters)"
        )
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(
        r=r,
        lora_alpha=int(alpha) if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=modules or None,
        target_parameters=params or None,
        **kwargs,
    )
