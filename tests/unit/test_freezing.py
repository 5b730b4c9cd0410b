from __future__ import annotations

import pytest
import torch
from torch import nn

from kappatune.analysis.spectra import AnalyzeOptions, analyze
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.selection.core import Selection, SelectionEntry, select
from kappatune.training.freezing import (
    apply_selection,
    check_frozen,
    frozen_digests,
    remove_hooks,
    resolve_names,
    tensor_digest,
    trainable_names,
    trainable_parameters,
)
from tests.unit._tiny_models import tiny_llama


def manual(*entries: tuple[str, int | None, int]) -> Selection:
    es = tuple(SelectionEntry(n, e, 1.0, k) for n, e, k in entries)
    return Selection(es, "manual", None, "test", "", len(es), sum(e.numel for e in es), 1)


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (2, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_frozen_tensors_bit_identical_after_adamw_with_weight_decay() -> None:
    model = tiny_llama(seed=1)
    analysis = analyze(model, AnalyzeOptions(workers=1))
    sel = select(analysis, "lowest-kappa", Budget(tensors=3))
    groups = apply_selection(model, sel, weight_decay=0.1)
    assert set(trainable_names(model)) == set(sel.names)
    assert trainable_parameters(model) == sel.param_count
    assert [g["group"] for g in groups] == ["decay"] and groups[0]["weight_decay"] == 0.1
    assert groups[0]["names"] == list(sel.names)
    before = frozen_digests(model)
    assert len(before) == len(list(model.parameters())) - 3
    selected_before = {n: tensor_digest(p) for n, p in model.named_parameters() if n in sel.names}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for step in range(3):
        lm_step(model, opt, step)
    assert check_frozen(model, before) == []
    after = {n: tensor_digest(p) for n, p in model.named_parameters() if n in sel.names}
    assert all(after[n] != selected_before[n] for n in sel.names)
    # optimizer state only for the selected tensors
    state_ids = {id(p) for p in opt.state}
    params = dict(model.named_parameters())
    assert state_ids == {id(params[n]) for n in sel.names}


def test_check_frozen_detects_a_change() -> None:
    model = tiny_llama()
    sel = manual(("model.layers.0.self_attn.q_proj.weight", None, 32 * 32))
    apply_selection(model, sel)
    before = frozen_digests(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-6
    assert check_frozen(model, before) == ["model.layers.1.mlp.up_proj.weight"]


def test_groups_split_decay_and_no_decay() -> None:
    model = tiny_llama()
    sel = manual(("model.layers.0.mlp.up_proj.weight", None, 2048), ("model.norm.weight", None, 32))
    groups = apply_selection(model, sel, weight_decay=0.01)
    assert [(g["group"], g["names"], g["weight_decay"]) for g in groups] == [
        ("decay", ["model.layers.0.mlp.up_proj.weight"], 0.01),
        ("no_decay", ["model.norm.weight"], 0.0),
    ]
    # reapplying another selection resets everything
    apply_selection(model, manual(("lm_head.weight", None, 4096)))
    assert trainable_names(model) == ["lm_head.weight"]


def test_missing_names_listed() -> None:
    model = tiny_llama()
    sel = manual(
        ("model.layers.7.mlp.up_proj.weight", None, 1),
        ("model.layers.0.mlp.up_proj.weight", None, 1),
    )
    with pytest.raises(
        KappaTuneError,
        match=r"1 selected tensor\(s\) are not parameters of the model \(model.layers.7.mlp.up_proj.weight\)",
    ):
        apply_selection(model, sel)
    assert all(p.requires_grad for p in model.parameters())  # nothing touched on error


def test_wrapped_model_names_resolve_by_unique_suffix() -> None:
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    wrapped = Wrapper(tiny_llama())
    name = "model.layers.1.self_attn.v_proj.weight"
    assert resolve_names(wrapped, [name]) == {name: "module." + name}
    apply_selection(wrapped, manual((name, None, 512)))
    assert trainable_names(wrapped) == ["module." + name]


def test_tied_weights_selected_through_alias() -> None:
    model = tiny_llama(layers=1, tied=True)
    groups = apply_selection(model, manual(("lm_head.weight", None, 4096)))
    assert trainable_names(model) == ["model.embed_tokens.weight"]
    assert len(groups[0]["params"]) == 1


class FusedMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(4, 6, 5))
        self.norm = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,eoi->beo", x * self.norm, self.experts.gate_up_proj)


def test_fused_experts_partial_selection_masks_gradients() -> None:
    model = FusedMoE()
    name = "experts.gate_up_proj"
    analysis = analyze(model, AnalyzeOptions(workers=1))
    assert [r.expert for r in analysis.tensors] == [0, 1, 2, 3]
    sel = manual((name, 3, 30), (name, 1, 30))
    groups = apply_selection(model, sel, weight_decay=0.5)
    assert [(g["group"], g["weight_decay"]) for g in groups] == [("masked_experts", 0.0)]
    w = model.experts.gate_up_proj
    before = [tensor_digest(w[e]) for e in range(4)]
    norm_before = tensor_digest(model.norm)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for i in range(3):
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(i))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = [tensor_digest(w[e]) for e in range(4)]
    assert [a == b for a, b in zip(before, after, strict=True)] == [True, False, True, False]
    assert tensor_digest(model.norm) == norm_before
    remove_hooks(model)
    model(torch.randn(3, 5)).pow(2).mean().backward()
    assert (
        w.grad is not None and w.grad[0].abs().sum() > 0
    )  # hook removed: all experts get gradient


def test_fused_experts_all_selected_needs_no_mask() -> None:
    model = FusedMoE()
    name = "experts.gate_up_proj"
    groups = apply_selection(model, manual(*[(name, e, 30) for e in range(4)]), weight_decay=0.5)
    assert [(g["group"], g["weight_decay"]) for g in groups] == [("decay", 0.5)]


def test_expert_selection_errors() -> None:
    model = FusedMoE()
    with pytest.raises(
        KappaTuneError, match=r"has 4 experts; the selection names expert\(s\) \[7\]"
    ):
        apply_selection(model, manual(("experts.gate_up_proj", 7, 30)))
    with pytest.raises(KappaTuneError, match="not a fused experts"):
        apply_selection(tiny_llama(), manual(("lm_head.weight", 0, 30)))
