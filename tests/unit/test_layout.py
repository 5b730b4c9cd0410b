"""Selections on checkpoints whose per-expert tensors transformers fuses when it loads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from kappatune.analysis.spectra import analyze
from kappatune.errors import KappaTuneError
from kappatune.integrations.lora import peft_targets
from kappatune.selection.core import Selection, SelectionEntry
from kappatune.training.freezing import apply_selection, trainable_parameters
from kappatune.training.layout import Part, locate, locate_by_type

EXPERTS, HIDDEN, MOE = 4, 16, 8
FUSED = "model.layers.{}.mlp.experts.gate_up_proj"
DOWN = "model.layers.{}.mlp.experts.down_proj"


def tiny_moe(seed: int = 0) -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=MOE, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=EXPERTS,
        num_experts_per_tok=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config)


def save_per_expert(model: Any, path: Path) -> Path:
    """The checkpoint layout on the Hub: one 2-D tensor per expert and projection."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            base = name.removesuffix("gate_up_proj")
            for e in range(p.shape[0]):
                tensors[f"{base}{e}.gate_proj.weight"] = p[e, :MOE].clone()
                tensors[f"{base}{e}.up_proj.weight"] = p[e, MOE:].clone()
        elif name.endswith("experts.down_proj"):
            base = name.removesuffix("down_proj")
            for e in range(p.shape[0]):
                tensors[f"{base}{e}.down_proj.weight"] = p[e].clone()
        else:
            tensors[name] = p.clone().contiguous()
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(model.config.to_dict()))
    return path


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from transformers import AutoModelForCausalLM

    path = save_per_expert(tiny_moe(), tmp_path_factory.mktemp("moe") / "ckpt")
    return path, AutoModelForCausalLM.from_pretrained(path)


def manual(*names: str) -> Selection:
    shapes = {"gate_proj": (MOE, HIDDEN), "up_proj": (MOE, HIDDEN), "down_proj": (HIDDEN, MOE)}
    entries = tuple(
        SelectionEntry(n, None, 1.0, MOE * HIDDEN, shape=shapes.get(n.split(".")[-2], ()))
        for n in names
    )
    return Selection(entries, "manual", None, "test", "", len(entries), 1, 1)


def test_analysis_sees_the_files_per_expert(loaded: tuple[Path, Any]) -> None:
    path, model = loaded
    rows = {r.name: r for r in analyze(str(path)).tensors}
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in rows
    assert rows["model.layers.1.mlp.experts.3.up_proj.weight"].shape == (MOE, HIDDEN)
    fused = dict(model.named_parameters())[FUSED.format(1)]
    assert fused.shape == (EXPERTS, 2 * MOE, HIDDEN)  # transformers fused them at load


def test_locate_maps_experts_to_rows_of_the_fused_tensor(loaded: tuple[Path, Any]) -> None:
    path, model = loaded
    sel = manual(
        "model.layers.0.mlp.experts.2.gate_proj.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight",
        "model.layers.1.mlp.experts.0.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
    )
    parts = locate(model, sel)
    assert [parts[e.key] for e in sel.entries] == [
        Part(FUSED.format(0), 2, (0, MOE)),
        Part(FUSED.format(1), 3, (MOE, 2 * MOE)),
        Part(DOWN.format(1), 0, None),
        Part("model.layers.0.self_attn.q_proj.weight", None, None),
    ]
    # the rows are where transformers put that file tensor
    from safetensors.torch import load_file

    files = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    for entry in sel.entries[:3]:
        part = parts[entry.key]
        start, stop = part.rows or (0, params[part.param].shape[1])
        assert torch.equal(params[part.param][part.expert, start:stop], files[entry.name])


def test_selective_training_changes_only_the_selected_rows(loaded: tuple[Path, Any]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(loaded[0])  # a fresh copy: this one trains
    sel = manual(
        "model.layers.0.mlp.experts.2.gate_proj.weight",
        "model.layers.0.mlp.experts.1.up_proj.weight",
        "model.layers.1.mlp.experts.3.down_proj.weight",
    )
    groups = apply_selection(model, sel, weight_decay=0.1)
    assert [(g["group"], g["names"], g["weight_decay"]) for g in groups] == [
        ("masked_experts", [FUSED.format(0), DOWN.format(1)], 0.0)
    ]
    assert trainable_parameters(model) == sel.param_count == 3 * MOE * HIDDEN
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for step in range(3):
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = {
        n: p.detach() != before[n]
        for n, p in params.items()
        if not torch.equal(p.detach(), before[n])
    }
    assert sorted(changed) == [FUSED.format(0), DOWN.format(1)]
    rows = changed[FUSED.format(0)].any(dim=-1)  # (experts, 2 * MOE)
    expected = torch.zeros(EXPERTS, 2 * MOE, dtype=torch.bool)
    expected[2, :MOE] = expected[1, MOE:] = True
    assert torch.equal(rows, expected)
    experts = changed[DOWN.format(1)].reshape(EXPERTS, -1).any(dim=-1)
    assert experts.tolist() == [False, False, False, True]


def test_lora_targets_name_the_fused_parameter(loaded: tuple[Path, Any]) -> None:
    _, model = loaded
    sel = manual(
        "model.layers.0.mlp.experts.2.gate_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.experts.1.up_proj.weight",
    )
    assert peft_targets(sel, model) == {
        "target_modules": ["model.layers.0.self_attn.v_proj"],
        "target_parameters": [FUSED.format(0)],
    }
    assert peft_targets(sel)["target_modules"] == [  # without the model: the files' names
        "model.layers.0.mlp.experts.2.gate_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.experts.1.up_proj",
    ]


def test_names_the_model_lacks_still_fail_in_one_line(loaded: tuple[Path, Any]) -> None:
    _, model = loaded
    with pytest.raises(KappaTuneError) as err:
        locate(model, manual("model.layers.0.mlp.experts.9.gate_proj.weight", "nope.weight"))
    message = str(err.value)
    assert message.startswith("2 selected tensor(s) are not parameters of the model")
    assert "it would be expert 9 of 'model.layers.0.mlp.experts.gate_up_proj'" in message
    assert "\n" not in message


def save_mixtral(path: Path) -> Path:
    """Mixtral's files say block_sparse_moe.experts.E.w1/w3/w2 (gate, up, down)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=MOE, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=EXPERTS, num_experts_per_tok=2,
        vocab_size=64, max_position_embeddings=64,
    )  # fmt: skip
    tensors: dict[str, torch.Tensor] = {}
    for name, p in MixtralForCausalLM(config).state_dict().items():
        old = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith("experts.gate_up_proj"):
            for e in range(EXPERTS):
                tensors[old.replace("gate_up_proj", f"{e}.w1.weight")] = p[e, :MOE].clone()
                tensors[old.replace("gate_up_proj", f"{e}.w3.weight")] = p[e, MOE:].clone()
        elif name.endswith("experts.down_proj"):
            for e in range(EXPERTS):
                tensors[old.replace("down_proj", f"{e}.w2.weight")] = p[e].clone()
        else:
            tensors[old] = p.clone().contiguous()
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    return path


def test_mixtral_names_are_renamed_then_fused(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = save_mixtral(tmp_path / "mixtral")
    model = AutoModelForCausalLM.from_pretrained(path)
    sel = manual(
        "model.layers.0.block_sparse_moe.experts.1.w3.weight",
        "model.layers.0.block_sparse_moe.experts.2.w2.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
    )
    parts = locate(model, sel)
    assert [parts[e.key] for e in sel.entries] == [
        Part(FUSED.format(0), 1, (MOE, 2 * MOE)),
        Part(DOWN.format(0), 2, None),
        Part("model.layers.0.mlp.gate.weight", None, None),
    ]
    files = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    assert torch.equal(params[FUSED.format(0)][1, MOE:], files[sel.entries[0].name])
    assert torch.equal(params[DOWN.format(0)][2], files[sel.entries[1].name])
    assert torch.equal(params["model.layers.0.mlp.gate.weight"], files[sel.entries[2].name])
    assert locate_by_type("mixtral", sel) == {
        sel.entries[0].key: Part(FUSED.format(0), 1, None),
        sel.entries[1].key: Part(DOWN.format(0), 2, None),
        sel.entries[2].key: Part("model.layers.0.mlp.gate.weight", None, None),
    }


def test_select_exports_speak_the_loaded_models_names(tmp_path: Path) -> None:
    from kappatune.cli.main import main
    from kappatune.selection.core import Selection as Sel

    path = save_mixtral(tmp_path / "mixtral")
    argv = ["select", str(path), "--include", r"experts\.(1|2)\.w[13]|block_sparse_moe\.gate"]
    assert main([*argv, "--budget-tensors", "5", "-o", str(tmp_path / "sel.json")]) == 0
    order = [e.name for e in Sel.load(tmp_path / "sel.json").entries]
    assert sorted(order) == sorted(
        ["model.layers.0.block_sparse_moe.gate.weight"]
        + [
            f"model.layers.0.block_sparse_moe.experts.{e}.w{w}.weight"
            for e in (1, 2)
            for w in (1, 3)
        ]
    )
    assert (
        main([*argv, "--budget-tensors", "5", "--format", "peft", "-o", str(tmp_path / "p.json")])
        == 0
    )
    assert json.loads((tmp_path / "p.json").read_text()) == {
        "target_modules": ["model.layers.0.mlp.gate"],
        "target_parameters": [FUSED.format(0)],
    }
    assert (
        main(
            [*argv, "--budget-tensors", "5", "--format", "axolotl", "-o", str(tmp_path / "a.yaml")]
        )
        == 0
    )
    text = (tmp_path / "a.yaml").read_text()
    assert (
        f"# note: {FUSED.format(0)} is unfrozen whole; the selection chose experts [1, 2]" in text
    )
    import yaml

    regexes = yaml.safe_load(text)["unfrozen_parameters"]
    assert sorted(regexes) == sorted(
        [
            "^model.layers.0.mlp.gate.weight$",
            "^model.layers.0.mlp.experts.gate_up_proj$",
        ]
    )  # bare dots: Axolotl escapes them itself


def test_fisher_scores_follow_the_files_rows(loaded: tuple[Path, Any]) -> None:
    """The fisher policy scores the files' per-expert rows from the fused diagonal's parts."""
    from kappatune.analysis.fisher import (
        FisherOptions,
        examples_from_ids,
        fisher_diagonals,
        fisher_scores,
    )

    path, model = loaded
    rows = [
        r
        for r in analyze(str(path)).tensors
        if r.name.startswith("model.layers.1.mlp.experts.2.")
        or r.name.endswith("1.self_attn.q_proj.weight")
    ]
    assert len(rows) == 4
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    examples = examples_from_ids(ids)
    scores = fisher_scores(model, examples, kind="empirical", tokens=40, rows=rows)
    diag = fisher_diagonals(model, examples, FisherOptions(kinds=("empirical",), tokens=40))
    f = diag.tensors["empirical"]
    expected = {
        ("model.layers.1.mlp.experts.2.gate_proj.weight", -1): f[FUSED.format(1)][2, :MOE],
        ("model.layers.1.mlp.experts.2.up_proj.weight", -1): f[FUSED.format(1)][2, MOE:],
        ("model.layers.1.mlp.experts.2.down_proj.weight", -1): f[DOWN.format(1)][2],
        ("model.layers.1.self_attn.q_proj.weight", -1): f["model.layers.1.self_attn.q_proj.weight"],
    }
    assert sorted(scores) == sorted(expected)
    for key, part in expected.items():
        assert scores[key] == pytest.approx(float(part.double().mean()), rel=1e-12)
