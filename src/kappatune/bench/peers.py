"""Peer methods for the benchmark, built with PEFT: OSF, MiCA, PiSSA, CorDA-KPM, MLP-only LoRA.

Each is fitted to the shared trainable-parameter budget through its own knob, on the same
linear layers as plain LoRA (MLP-only LoRA: the gate/up/down projections only):

- the LoRA variants get the largest rank whose trainable adapters fit: r (in + out) per module,
  except MiCA, which freezes B (the minor left singular vectors) and trains A only: r * in;
- OSF gets the largest trainable rank k (effective_rank = min(out, in) - k per module, so the
  top singular directions stay frozen): U_low, S_low and V_low train k (out + in + 1) per module.

CorDA in knowledge-preserving mode needs data of what to keep: the control split's rows that
the benchmark does not evaluate on (:func:`kappatune.bench.tokenized.keep_rows`). Its
preprocessing (input covariances over those rows, then one decomposition per module) does not
depend on the learning rate or the seed, so a sweep computes it once: PEFT's own ``cache_file``
holds the decomposition, written atomically under a name that digests every input of it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kappatune.bench.store import config_hash
from kappatune.errors import KappaTuneError
from kappatune.training.data import TokenizedData

if TYPE_CHECKING:  # peft is imported when a peer is built
    from peft import LoraConfig, OSFConfig

    from kappatune.training.loop import PreparedModel

log = logging.getLogger(__name__)

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
KEEP_ROWS_MAX = 256  # CorDA covariance rows (PEFT suggests about hidden / tokens * 128 samples)


@dataclass(frozen=True)
class PeerSpec:
    """How one peer method is built: its PEFT minimum version and knobs."""

    method: str
    min_peft: str
    init: str | bool | None  # LoRA ``init_lora_weights``; None: OSF (not LoRA)
    alpha_per_rank: int  # lora_alpha = alpha_per_rank * r, as each method's own examples set it
    mlp_only: bool = False
    needs_keep: bool = False
    needs: tuple[str, ...] = ()  # import names PEFT uses without declaring them


# Versions: the PEFT release that first shipped each method (git tags of huggingface/peft).
PEERS: dict[str, PeerSpec] = {
    "osf": PeerSpec("osf", "0.18.0", None, 0),
    # method_comparison/MetaMathQA/experiments/lora/llama-3.2-3B-rank32-mica: r 32, alpha 64
    "mica": PeerSpec("mica", "0.20.0", "mica", 2),
    # examples/pissa_finetuning: r 16, lora_alpha 16
    "pissa": PeerSpec("pissa", "0.11.0", "pissa", 1),
    # examples/corda_finetuning/preprocess.py: lora_alpha = r
    "corda-kpm": PeerSpec("corda-kpm", "0.15.0", "corda", 1, needs_keep=True, needs=("attr",)),
    # experiments/lora/llama-3.2-3B-rank10-target-mlp: r 10, alpha 20, gate/up/down
    "mlp-lora": PeerSpec("mlp-lora", "0.17.0", True, 2, mlp_only=True),
}


def is_peer(method: str) -> bool:
    return method in PEERS


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def require_peft(method: str) -> None:
    """One line naming the PEFT version (or package) the method needs, if it is missing."""
    spec = PEERS[method]
    try:
        have = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have is None or _version_tuple(have) < _version_tuple(spec.min_peft):
        found = "not installed" if have is None else f"installed: {have}"
        raise KappaTuneError(
            f"arm {method!r} needs PEFT >= {spec.min_peft} ({found}): pip install -U 'peft>={spec.min_peft}'"
        )
    for module in spec.needs:
        if importlib.util.find_spec(module) is None:
            raise KappaTuneError(
                f"arm {method!r}: PEFT's implementation imports {module!r}, which is not installed:"
                " pip install attrs"
            )


# --------------------------------------------------------------------------- targets and sizes


def targets(model: nn.Module, method: str) -> list[str]:
    """Module names the method adapts, in model order."""
    from kappatune.integrations.lora import all_linear_targets

    names = list(all_linear_targets(model)["target_modules"] or [])
    if PEERS[method].mlp_only:
        names = [n for n in names if n.rsplit(".", 1)[-1] in MLP_PROJECTIONS]
        if not names:
            raise KappaTuneError(
                f"arm {method!r}: the model has no MLP projection named {', '.join(MLP_PROJECTIONS)}"
            )
    return names


def unit_cost(module: nn.Module, method: str) -> int:
    """Trainable parameters per unit of rank of one module."""
    if not isinstance(module, nn.Linear):
        raise KappaTuneError(
            f"arm {method!r} supports nn.Linear layers only, not {type(module).__name__}"
        )
    out_f, in_f = module.out_features, module.in_features
    if method == "osf":
        return out_f + in_f + 1
    if method == "mica":
        return in_f
    return out_f + in_f


@dataclass(frozen=True)
class PeerPlan:
    """Targets, the rank fitted to the budget, and the trainable parameters it gives."""

    method: str
    targets: tuple[str, ...]
    rank: int
    params: int
    budget: int

    def note(self) -> str:
        what = "trainable rank" if self.method == "osf" else "rank"
        return (
            f"{self.method}: {what} {self.rank} on {len(self.targets)} modules,"
            f" {self.params:,} of the {self.budget:,}-parameter budget"
        )


def plan(model: nn.Module, method: str, budget: int) -> PeerPlan:
    """The largest rank whose trainable parameters fit ``budget`` (OSF: capped at each min dim)."""
    modules = dict(model.named_modules())
    names = targets(model, method)
    costs = {n: unit_cost(modules[n], method) for n in names}
    per_rank = sum(costs.values())
    rank = budget // per_rank
    if method == "osf":
        rank = min(rank, *(min(modules[n].weight.shape) for n in names))  # type: ignore[union-attr]
    if rank < 1:
        raise KappaTuneError(
            f"arm {method!r}: the budget of {budget:,} parameters is below rank 1 on its"
            f" {len(names)} modules ({per_rank:,} parameters)"
        )
    return PeerPlan(method, tuple(names), rank, rank * per_rank, budget)


def peft_config(model: nn.Module, the_plan: PeerPlan) -> LoraConfig | OSFConfig:
    spec = PEERS[the_plan.method]
    if spec.init is None:
        from peft import OSFConfig

        modules = dict(model.named_modules())
        pattern: dict[str, int | float] = {
            f"^{re.escape(n)}$": int(min(modules[n].weight.shape)) - the_plan.rank  # type: ignore[union-attr]
            for n in the_plan.targets
        }
        return OSFConfig(target_modules=list(the_plan.targets), rank_pattern=pattern)
    from kappatune.integrations.lora import config_from_targets

    extra: dict[str, Any] = {"init_lora_weights": spec.init}
    if spec.init == "corda":
        from peft.tuners.lora.config import CordaConfig

        extra["corda_config"] = CordaConfig(corda_method="kpm")
    return config_from_targets(
        {"target_modules": list(the_plan.targets), "target_parameters": None},
        the_plan.rank,
        spec.alpha_per_rank * the_plan.rank,
        **extra,
    )


# --------------------------------------------------------------------------- building


def _run_on(model: nn.Module, keep: TokenizedData) -> None:
    """Forward passes over the data of what to keep (CorDA's covariance): one row at a time,
    without its padding (PEFT's hook takes one sequence per call)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(min(len(keep), KEEP_ROWS_MAX)):
            n = int(keep.attention_mask[i].sum())
            ids = keep.input_ids[i : i + 1, :n].to(device)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    model.train(was)


@dataclass(frozen=True)
class PreprocessCache:
    """Where preprocessing that ignores the learning rate and the seed is kept (CorDA's
    decomposition): ``folder``, and ``tag`` naming the base model and the data of what to keep."""

    folder: Path
    tag: str

    def file(self, the_plan: PeerPlan) -> Path:
        key = config_hash(
            {
                "tag": self.tag,
                "method": the_plan.method,
                "rank": the_plan.rank,
                "targets": list(the_plan.targets),
                "keep_rows_max": KEEP_ROWS_MAX,
                "peft": importlib.metadata.version("peft"),
            }
        )
        return self.folder / f"{the_plan.method}-{key}.pt"


def _preprocess_corda(
    model: nn.Module, config: LoraConfig, keep: TokenizedData, cache: Path | None
) -> None:
    """PEFT's ``preprocess_corda``; with ``cache``, its decomposition is read from there when a
    readable one exists, else computed and written there atomically (a temporary file renamed)."""
    from peft.tuners.lora.corda import preprocess_corda

    def run() -> None:
        _run_on(model, keep)

    corda = config.corda_config
    assert corda is not None
    if cache is None:
        corda.cache_file = None
        preprocess_corda(model, config, run_model=run)
        return
    if cache.is_file():
        corda.cache_file = str(cache)
        try:
            preprocess_corda(model, config)
            return
        except Exception as exc:  # torch.load and PEFT raise many kinds: recompute on any
            log.warning("unusable CorDA cache %s (%s): recomputing it", cache, exc)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    corda.cache_file = str(tmp)
    try:
        preprocess_corda(model, config, run_model=run)
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    corda.cache_file = str(cache)


def build(
    model: nn.Module,
    method: str,
    budget: int,
    keep: TokenizedData | None = None,
    weight_decay: float = 0.0,
    cache: PreprocessCache | None = None,
) -> PreparedModel:
    """The PEFT-wrapped model of a peer method and its parameter groups.

    ``cache``: where preprocessing that the learning rate and seed do not change is kept
    (CorDA-KPM's decomposition), so a sweep computes it once."""
    from peft import get_peft_model

    from kappatune.training.methods import PreparedModel, decay_groups

    require_peft(method)
    the_plan = plan(model, method, budget)
    config = peft_config(model, the_plan)
    if PEERS[method].needs_keep:
        if keep is None or len(keep) == 0:
            raise KappaTuneError(
                f"arm {method!r} uses data of what to keep, and the scenario has none:"
                " give the control split more rows than the control evaluation uses"
            )
        import peft

        assert isinstance(config, peft.LoraConfig)  # CorDA initialises LoRA
        _preprocess_corda(model, config, keep, None if cache is None else cache.file(the_plan))
    peft_model = get_peft_model(model, config)
    groups = decay_groups(peft_model, weight_decay)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return PreparedModel(
        peft_model,
        groups,
        method,
        trainable,
        lora_r=the_plan.rank,
        lora_targets={"target_modules": list(the_plan.targets), "target_parameters": None},
    )


def check(model: nn.Module, method: str, budget: int) -> Mapping[str, Any]:
    """What the bench checks before training: PEFT has the method, the budget fits a rank."""
    require_peft(method)
    the_plan = plan(model, method, budget)
    return {"note": the_plan.note(), "peer_rank": the_plan.rank, "peer_params": the_plan.params}
