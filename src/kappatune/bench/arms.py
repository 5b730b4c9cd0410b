"""Benchmark arms: one small object per way of fine-tuning, in a registry.

Selective arms (``kappa``, ``random``, ``highest``, ``fisher``) train whole weight matrices of
the linear layers chosen by a selection policy under ONE shared trainable-parameter budget.
LoRA arms (``lora`` on every linear layer, ``kappa-lora`` on the lowest-kappa fraction of
them) get the largest rank whose adapters fit that same budget. ``full`` trains everything.
The untouched base model is measured once per scenario and is not an arm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kappatune.errors import KappaTuneError
from kappatune.selection import Budget, Selection, select
from kappatune.spectra import SpectrumRow

RowKey = tuple[str, int]


@dataclass(frozen=True)
class Arm:
    """How one arm trains. ``method`` is one of :data:`kappatune.training.METHODS`."""

    name: str
    method: str
    policy: str | None
    lr: float
    warmup: int
    description: str
    needs_fisher: bool = False

    def __post_init__(self) -> None:
        if self.method in ("selective", "kappa-lora") and self.policy is None:
            raise KappaTuneError(f"arm {self.name!r}: method {self.method} needs a policy")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KappaTuneError(
                f"arm {self.name!r}: learning rate must be positive, got {self.lr}"
            )
        if self.warmup < 0:
            raise KappaTuneError(f"arm {self.name!r}: warm-up must be >= 0, got {self.warmup}")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "policy": self.policy,
            "lr": self.lr,
            "warmup": self.warmup,
        }


_ARMS: dict[str, Arm] = {}


def register_arm(arm: Arm) -> Arm:
    if arm.name in _ARMS and _ARMS[arm.name] != arm:
        raise ValueError(f"benchmark arm {arm.name!r} is already registered")
    _ARMS[arm.name] = arm
    return arm


def arm_names() -> tuple[str, ...]:
    return tuple(_ARMS)


def get_arm(name: str) -> Arm:
    try:
        return _ARMS[name]
    except KeyError:
        raise KappaTuneError(f"unknown arm {name!r} (known: {', '.join(_ARMS)})") from None


# Learning rates: full fine-tuning needs a smaller one and warm-up (method.md section 7).
register_arm(Arm("full", "full", None, 1e-5, 2, "full fine-tuning (every parameter)"))
register_arm(
    Arm("lora", "lora", None, 3e-4, 1, "LoRA on every linear layer, rank fitted to the budget")
)
register_arm(Arm("kappa", "selective", "lowest-kappa", 1e-4, 1, "KappaTune: lowest-kappa matrices"))
register_arm(
    Arm(
        "kappa-lora",
        "kappa-lora",
        "lowest-kappa",
        3e-4,
        1,
        "KappaTune-LoRA: LoRA on lowest-kappa layers",
    )
)
register_arm(Arm("random", "selective", "random", 1e-4, 1, "random matrices (seeded), same budget"))
register_arm(
    Arm("highest", "selective", "highest-kappa", 1e-4, 1, "highest-kappa matrices, same budget")
)
register_arm(
    Arm(
        "fisher",
        "selective",
        "fisher",
        1e-4,
        1,
        "lowest-Fisher matrices (data-dependent)",
        needs_fisher=True,
    )
)
register_arm(
    Arm(
        "self-fisher",
        "selective",
        "self-fisher",
        1e-4,
        1,
        "lowest self-Fisher matrices (the model's own samples, data-free)",
        needs_fisher=True,
    )
)
register_arm(
    Arm(
        "interference",
        "selective",
        "interference",
        1e-4,
        1,
        "largest task gradient over self-Fisher (uses the training data)",
        needs_fisher=True,
    )
)
DEFAULT_ARMS = ("full", "lora", "kappa", "kappa-lora", "random", "highest")


def with_overrides(arm: Arm, lr: float | None, warmup: int | None) -> Arm:
    return Arm(
        arm.name,
        arm.method,
        arm.policy,
        arm.lr if lr is None else lr,
        arm.warmup if warmup is None else warmup,
        arm.description,
        arm.needs_fisher,
    )


# --------------------------------------------------------------------------- candidates and budgets


def linear_weight_names(model: nn.Module) -> list[str]:
    """``<module>.weight`` of every linear layer except the output head, in model order."""
    from kappatune.integrations.lora import all_linear_targets

    modules = all_linear_targets(model)["target_modules"] or []
    return [f"{m}.weight" for m in modules]


def candidate_rows(rows: Sequence[SpectrumRow], model: nn.Module) -> list[SpectrumRow]:
    """Analysed rows of the linear layers: the one universe selective and LoRA arms share."""
    wanted = set(linear_weight_names(model))
    out = [r for r in rows if r.name in wanted]
    if not out:
        raise KappaTuneError("no analysed matrix belongs to a linear layer of the model")
    return out


@dataclass(frozen=True)
class ArmContext:
    """What arms need besides the model: candidates, the budget, seeds and Fisher scores."""

    rows: tuple[SpectrumRow, ...]
    budget: Budget
    total_params: int
    seed: int
    lora_fraction: float = 0.2
    fisher: Mapping[RowKey, float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.lora_fraction <= 1:
            raise KappaTuneError(f"--lora-fraction must be in (0, 1], got {self.lora_fraction}")

    def selection(self, policy: str, budget: Budget | None = None) -> Selection:
        from kappatune.selection import SelectOptions

        return select(
            self.rows,
            policy,
            budget or self.budget,
            SelectOptions(seed=self.seed),
            scores=self.fisher,
            total_params=self.total_params,
        )

    def budget_params(self) -> int:
        """The shared budget in parameters (what the lowest-kappa selection was allowed)."""
        sel = self.selection("lowest-kappa")
        assert sel.budget_params is not None
        return sel.budget_params


def arm_selection(arm: Arm, ctx: ArmContext) -> Selection | None:
    if arm.method == "selective":
        assert arm.policy is not None
        return ctx.selection(arm.policy)
    if arm.method == "kappa-lora":
        assert arm.policy is not None
        return ctx.selection(arm.policy, Budget(fraction=ctx.lora_fraction))
    return None


def prepare_arm(model: nn.Module, arm: Arm, ctx: ArmContext, weight_decay: float = 0.0) -> Any:
    """``kappatune.training.prepare_model`` for this arm: a Prepared (model, groups, counts)."""
    from kappatune.training import LoraSettings, prepare_model

    selection = arm_selection(arm, ctx)
    lora = None
    if arm.method in ("lora", "kappa-lora"):
        lora = LoraSettings(r=None, budget_params=ctx.budget_params())
    return prepare_model(model, arm.method, selection, lora, weight_decay=weight_decay)


def check_budget(ctx: ArmContext, arms: Sequence[Arm]) -> dict[str, int]:
    """Resolve every selective arm's selection up front (bad budgets fail before any training).

    Returns the parameter count each selective arm will train.
    """
    out: dict[str, int] = {}
    for arm in arms:
        if arm.method == "selective":
            out[arm.name] = arm_selection(arm, ctx).param_count  # type: ignore[union-attr]
        elif arm.method == "kappa-lora":
            arm_selection(arm, ctx)
    return out
