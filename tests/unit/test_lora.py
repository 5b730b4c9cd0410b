from __future__ import annotations

import pytest
import torch
from torch import nn

from kappatune.analysis.spectra import AnalyzeOptions, analyze
from kappatune.errors import KappaTuneError
from kappatune.integrations.lora import (
    all_linear_targets,
    config_from_targets,
    lora_config,
    lora_param_count,
    modules_for_budget,
    peft_targets,
    rank_for_budget,
)
from kappatune.selection.budget import Budget
from kappatune.selection.core import Selection, SelectionEntry, select
from tests.unit._tiny_models import tiny_llama

PREFIX = "base_model.model."


def manual(*entries: tuple[str, int | None]) -> Selection:
    es = tuple(SelectionEntry(n, e, float(i + 1), 1) for i, (n, e) in enumerate(entries))
    return Selection(es, "manual", None, "test", "", len(es), len(es), 1)


def lora_modules(peft_model: nn.Module) -> set[str]:
    return {
        n.removeprefix(PREFIX) for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n
    }


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_targets_in_kappa_order_reproduce_selection_in_peft() -> None:
    from peft import get_peft_model

    model = tiny_llama(seed=2)
    sel = select(analyze(model, AnalyzeOptions(workers=1)), "lowest-kappa", Budget(tensors=5))
    targets = peft_targets(sel)
    expected = [n.removesuffix(".weight") for n in sel.names]
    assert targets == {"target_modules": expected, "target_parameters": None}
    kappas = [e.kappa for e in sel.entries]
    assert kappas == sorted(kappas)
    config = lora_config(sel, r=4)
    assert config.r == 4 and config.lora_alpha == 8
    count = lora_param_count(model, targets, 4)
    peft_model = get_peft_model(model, config)
    assert lora_modules(peft_model) == set(expected)
    assert trainable(peft_model) == count


def test_fused_experts_go_to_target_parameters() -> None:
    from peft import get_peft_model

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 6, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bi,eoi->beo", x, self.gate_up_proj)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(5, 5)
            self.experts = Experts()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.experts(self.proj(x))

    model = Model()
    sel = manual(("experts.gate_up_proj", 2), ("proj.weight", None), ("experts.gate_up_proj", 0))
    targets = peft_targets(sel)
    assert targets == {"target_modules": ["proj"], "target_parameters": ["experts.gate_up_proj"]}
    assert lora_param_count(model, targets, 2) == 2 * (5 + 5) + 2 * 4 * (6 + 5)
    peft_model = get_peft_model(model, lora_config(sel, r=2, task_type=None))
    assert trainable(peft_model) == 2 * (5 + 5) + 2 * 4 * (6 + 5)
    assert lora_modules(peft_model) == {"proj", "experts"}
    with pytest.raises(KappaTuneError, match=r"dropout 0\.1 is not supported on fused expert"):
        lora_config(sel, r=2, dropout=0.1)


def test_rank_for_budget() -> None:
    model = tiny_llama()
    sel = manual(
        ("model.layers.0.self_attn.q_proj.weight", None),
        ("model.layers.1.mlp.up_proj.weight", None),
    )
    per_rank = (32 + 32) + (32 + 64)
    plan = rank_for_budget(model, sel, 10 * per_rank + 5)
    assert (plan.r, plan.params, plan.shortfall) == (10, 10 * per_rank, 5)
    with pytest.raises(
        KappaTuneError, match=r"below rank 1 on the 2 selected modules \(160 parameters\)"
    ):
        rank_for_budget(model, sel, 159)


def test_modules_for_budget_prefix_of_the_order_greedy_on_request() -> None:
    model = tiny_llama()
    sel = manual(
        ("model.layers.0.self_attn.v_proj.weight", None),  # 32 + 16 per rank
        ("model.embed_tokens.weight", None),  # 128 + 32
        ("model.layers.1.self_attn.k_proj.weight", None),  # 32 + 16
    )
    plan = modules_for_budget(model, sel, r=2, budget=200)  # the embedding (320) does not fit
    assert plan.targets == {
        "target_modules": ["model.layers.0.self_attn.v_proj"],
        "target_parameters": None,
    }
    assert plan.params == 96 and plan.shortfall == 200 - 96
    greedy = modules_for_budget(model, sel, r=2, budget=200, greedy=True)
    assert greedy.targets["target_modules"] == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.k_proj",
    ]
    assert greedy.params == 2 * 48 * 2 and greedy.shortfall == 200 - 192
    plan = modules_for_budget(model, sel, r=1, budget=208)
    assert (
        plan.targets["target_modules"] == ["model.layers.0.self_attn.v_proj", "model.embed_tokens"]
        and plan.params == 208
    )
    with pytest.raises(
        KappaTuneError,
        match=r"below the first module's rank-2 adapter \(model.layers.0.self_attn.v_proj, 96 parameters\)",
    ):
        modules_for_budget(model, sel, r=2, budget=95)


def test_all_linear_targets_and_errors() -> None:
    model = tiny_llama()
    targets = all_linear_targets(model)
    assert len(targets["target_modules"] or []) == 14 and "lm_head" not in (
        targets["target_modules"] or []
    )
    assert lora_param_count(model, targets, 1) == 2 * (
        4 * 0 + (32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3
    )
    with pytest.raises(KappaTuneError, match=r"only '\.weight' tensors"):
        peft_targets(manual(("model.layers.0.self_attn.q_proj.bias", None)))
    with pytest.raises(KappaTuneError, match="not a module of the model"):
        lora_param_count(model, {"target_modules": ["nope"], "target_parameters": None}, 1)
    with pytest.raises(KappaTuneError, match="no LoRA targets"):
        config_from_targets({"target_modules": [], "target_parameters": None}, 2)
    with pytest.raises(KappaTuneError, match="rank must be at least 1"):
        config_from_targets({"target_modules": ["x"], "target_parameters": None}, 0)
