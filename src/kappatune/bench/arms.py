"""Benchmark arms: one small object per way of fine-tuning, in a registry.

Selective arms (``kappa``, ``random``, ``highest``, ``fisher``) train whole weight matrices of
the linear layers chosen by a selection policy under ONE shared trainable-parameter budget.
LoRA arms (``lora`` on every linear layer, ``kappa-lora`` on the lowest-kappa fraction of
them) get the largest rank whose adapters fit that same budget. ``full`` trains everything.
The untouched base model is measured once per scenario and is not an arm.

Peers (:mod:`kappatune.bench.peers`, built with PEFT) get the same budget through their own
knob: ``osf``, ``mica``, ``pissa``, ``corda-kpm`` (uses data of what to keep) and ``mlp-lora``;
``spectrum`` trains the highest-SNR matrices per module type fully (the ``snr`` policy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kappatune.constants import KAPPA_LORA_FRACTION
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.selection.core import Selection, select
from kappatune.selection.policies import policy_spec
from kappatune.training.methods import find_method, get_method

if TYPE_CHECKING:  # the registry loads no torch (the CLI's --arms choices); peers are lazy
    from torch import nn

    from kappatune.analysis.spectra import SpectrumRow
    from kappatune.bench.peers import PreprocessCache
    from kappatune.training.data import TokenizedData
    from kappatune.training.loop import PreparedModel

RowKey = tuple[str, int]


@dataclass(frozen=True)
class Arm:
    """How one arm trains. ``method`` names a registered training method
    (:func:`kappatune.training.methods.method_names`) or a PEFT peer (:mod:`.peers`)."""

    name: str
    method: str
    policy: str | None
    lr: float
    warmup: int
    description: str
    uses_keep_data: bool = False  # trained with data of what to keep (marked in every table)

    def __post_init__(self) -> None:
        method = find_method(self.method)
        if method is not None and method.needs_selection and self.policy is None:
            raise KappaTuneError(f"arm {self.name!r}: method {self.method} needs a policy")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KappaTuneError(
                f"arm {self.name!r}: learning rate must be positive, got {self.lr}"
            )
        if self.warmup < 0:
            raise KappaTuneError(f"arm {self.name!r}: warm-up must be >= 0, got {self.warmup}")

    @property
    def needs_fisher(self) -> bool:
        """Its policy needs Fisher-type scores (the policy registry says which)."""
        return self.policy is not None and policy_spec(self.policy).needs_scores

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "method": self.method,
            "policy": self.policy,
            "lr": self.lr,
            "warmup": self.warmup,
        }
        if self.uses_keep_data:  # only then, so the other arms' stored results stay valid
            d["uses_keep_data"] = True
        return d


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


# Learning rates: full fine-tuning needs a smaller one and warm-up (a larger one forgets more).
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
    )
)
# Peers. Learning rates from each method's own documentation:
# OSF 5e-5: PEFT method_comparison/MetaMathQA/experiments/osf/llama-3.2-3B-rank128/training_params.json
register_arm(Arm("osf", "osf", None, 5e-5, 1, "OSF: orthogonal subspace fine-tuning (PEFT)"))
# MiCA 1e-4: PEFT method_comparison experiments/lora/llama-3.2-3B-rank32-mica (no override of
# method_comparison/MetaMathQA/default_training_params.json, lr 1e-4)
register_arm(Arm("mica", "mica", None, 1e-4, 1, "MiCA: LoRA on the minor singular components"))
# PiSSA 2e-5: PEFT examples/pissa_finetuning/README.md (--learning_rate 2e-5)
register_arm(Arm("pissa", "pissa", None, 2e-5, 1, "PiSSA: LoRA on the principal components"))
# CorDA 2e-5: PEFT examples/corda_finetuning/README.md (--learning_rate 2e-5)
register_arm(
    Arm(
        "corda-kpm",
        "corda-kpm",
        None,
        2e-5,
        1,
        "CorDA, knowledge-preserving mode (uses data of what to keep)",
        uses_keep_data=True,
    )
)
# Spectrum 1e-5: cognitivecomputations/spectrum README.md, Axolotl example (learning_rate: 1e-5)
register_arm(
    Arm("spectrum", "selective", "snr", 1e-5, 1, "Spectrum: highest-SNR matrices per module type")
)
# MLP-only LoRA 1e-4: PEFT method_comparison experiments/lora/llama-3.2-3B-rank10-target-mlp
# (default_training_params.json, lr 1e-4)
register_arm(Arm("mlp-lora", "mlp-lora", None, 1e-4, 1, "LoRA on the MLP (gate/up/down) only"))
register_arm(
    Arm(
        "self-fisher",
        "selective",
        "self-fisher",
        1e-4,
        1,
        "lowest self-Fisher matrices (the model's own samples, data-free)",
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
    )
)
DEFAULT_ARMS = ("full", "lora", "kappa", "kappa-lora", "random", "highest")
PEER_ARMS = ("osf", "mica", "pissa", "corda-kpm", "spectrum", "mlp-lora")
KEEP_DATA_MARK = "uses data of what to keep"


def arm_label(name: str) -> str:
    """The arm's name as tables show it: marked when it trains with data of what to keep."""
    arm = _ARMS.get(name)
    return f"{name} ({KEEP_DATA_MARK})" if arm is not None and arm.uses_keep_data else name


def with_overrides(arm: Arm, lr: float | None, warmup: int | None) -> Arm:
    return Arm(
        arm.name,
        arm.method,
        arm.policy,
        arm.lr if lr is None else lr,
        arm.warmup if warmup is None else warmup,
        arm.description,
        arm.uses_keep_data,
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
    lora_fraction: float = KAPPA_LORA_FRACTION
    fisher: Mapping[RowKey, float] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.lora_fraction <= 1:
            raise KappaTuneError(f"--lora-fraction must be in (0, 1], got {self.lora_fraction}")

    def selection(self, policy: str, budget: Budget | None = None) -> Selection:
        from kappatune.selection.budget import SelectOptions

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
    """The arm's selection: the shared budget, or, for a LoRA method on a selection, the
    policy's first ``lora_fraction`` (the adapter is sized to the budget instead)."""
    method = find_method(arm.method)
    if method is None or not method.needs_selection:
        return None
    assert arm.policy is not None
    if method.lora:
        return ctx.selection(arm.policy, Budget(fraction=ctx.lora_fraction))
    return ctx.selection(arm.policy)


def prepare_arm(
    model: nn.Module,
    arm: Arm,
    ctx: ArmContext,
    weight_decay: float = 0.0,
    keep: TokenizedData | None = None,
    peer_cache: PreprocessCache | None = None,
) -> PreparedModel:
    """``kappatune.training.loop.prepare_model`` for this arm: the model, its groups and counts.

    ``keep``: the data of what to keep, for arms that use it (CorDA-KPM); ``peer_cache``: where
    a peer keeps preprocessing that the learning rate and seed do not change.
    """
    from kappatune.bench import peers
    from kappatune.training.loop import LoraSettings, prepare_model

    if peers.is_peer(arm.method):
        return peers.build(
            model, arm.method, ctx.budget_params(), keep, weight_decay, cache=peer_cache
        )
    selection = arm_selection(arm, ctx)
    lora = None
    if get_method(arm.method).lora:
        lora = LoraSettings(r=None, budget_params=ctx.budget_params())
    return prepare_model(model, arm.method, selection, lora, weight_decay=weight_decay)


# --------------------------------------------------------------------------- peers: runner hooks


def check_peer(model: nn.Module, arm: Arm, ctx: ArmContext) -> dict[str, Any]:
    """For ``check_arms``: PEFT has the method and the budget fits; a note for the report."""
    from kappatune.bench import peers

    if not peers.is_peer(arm.method):
        return {}
    return dict(peers.check(model, arm.method, ctx.budget_params()))


def check_keep_data(arms: Sequence[Arm], scenario: str, keep: TokenizedData | None) -> None:
    """Before training: an arm that uses data of what to keep needs some (one line otherwise)."""
    for arm in arms:
        if arm.uses_keep_data and (keep is None or len(keep) == 0):
            raise KappaTuneError(
                f"arm {arm.name!r} uses data of what to keep, and scenario {scenario!r} has none:"
                " its control split has no rows beyond the control evaluation rows"
            )
