from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kappatune.errors import KappaTuneError
from kappatune.integrations.hf_trainer import KappaTuneCallback, freeze_for_trainer
from kappatune.selection.core import Selection, SelectionEntry
from kappatune.training.freezing import check_frozen, frozen_digests, tensor_digest, trainable_names
from tests.unit._tiny_models import char_tokenizer, tiny_llama

SELECTED = ("model.layers.1.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight")
TEXTS = ["the quick brown fox jumps over the lazy dog"] * 8 + [
    "pack my box with five dozen liquor jugs"
] * 8


def selection() -> Selection:
    es = tuple(SelectionEntry(n, None, float(i + 1), 1) for i, n in enumerate(SELECTED))
    return Selection(es, "manual", None, "test", "", 2, 2, 1)


def lm_dataset():  # type: ignore[no-untyped-def]
    import datasets

    tok = char_tokenizer()
    rows = []
    for t in TEXTS:
        ids = tok(t)["input_ids"][:24]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    return datasets.Dataset.from_list(rows)


# what the Trainer and the TRL SFTTrainer tests share: 3 quiet CPU steps, nothing saved
SHORT_RUN: dict[str, Any] = dict(
    max_steps=3,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    weight_decay=0.1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    logging_steps=1,
    disable_tqdm=True,
)


def args(tmp_path: Path, **kw):  # type: ignore[no-untyped-def]
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), **SHORT_RUN, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def selected_digests(model: torch.nn.Module) -> dict[str, str]:
    return {n: tensor_digest(p) for n, p in model.named_parameters() if n in SELECTED}


def test_trainer_callback_freezes_before_optimizer(tmp_path: Path) -> None:
    from transformers import Trainer

    model = tiny_llama(seed=0)
    cb = KappaTuneCallback(selection(), verify_frozen=True)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=lm_dataset(), callbacks=[cb])
    assert sorted(trainable_names(model)) == sorted(SELECTED)  # frozen at construction
    frozen = frozen_digests(model)
    chosen = selected_digests(model)
    trainer.train()
    assert check_frozen(model, frozen) == []
    assert all(selected_digests(model)[n] != chosen[n] for n in SELECTED)
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert held == {id(params[n]) for n in SELECTED}
    assert {id(p) for p in trainer.optimizer.state} == held


def test_callback_catches_unfreezing_after_init(tmp_path: Path) -> None:
    from transformers import Trainer

    model = tiny_llama()
    trainer = Trainer(
        model=model,
        args=args(tmp_path),
        train_dataset=lm_dataset(),
        callbacks=[KappaTuneCallback(selection())],
    )
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(
        KappaTuneError,
        match=r"1 tensors were unfrozen after KappaTuneCallback froze the model \(e.g. lm_head.weight\)",
    ):
        trainer.train()


def test_freeze_for_trainer_with_own_optimizer(tmp_path: Path) -> None:
    from transformers import Trainer

    model = tiny_llama()
    groups = freeze_for_trainer(model, selection(), weight_decay=0.1)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    frozen = frozen_digests(model)
    trainer = Trainer(
        model=model, args=args(tmp_path), train_dataset=lm_dataset(), optimizers=(opt, None)
    )
    trainer.train()
    assert check_frozen(model, frozen) == []
    assert len(opt.state) == 2


def test_trl_sft_trainer(tmp_path: Path) -> None:
    import datasets
    from trl import SFTConfig, SFTTrainer

    model = tiny_llama(seed=1)
    config = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        **SHORT_RUN,
        max_length=32,
        dataset_text_field="text",
    )
    ds = datasets.Dataset.from_list([{"text": t} for t in TEXTS])
    twin = tiny_llama(seed=1)
    all_before = {n: tensor_digest(p) for n, p in twin.named_parameters()}
    assert all_before == {n: tensor_digest(p) for n, p in model.named_parameters()}
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=ds,
        processing_class=char_tokenizer(),
        callbacks=[KappaTuneCallback(selection(), verify_frozen=True)],
    )
    assert sorted(trainable_names(model)) == sorted(SELECTED)
    out = trainer.train()
    assert out.global_step == 3
    changed = set(check_frozen(model, all_before))
    assert changed == set(SELECTED)  # exactly the selected tensors moved


def test_accelerate_prepare_cpu() -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_llama(seed=2)
    groups = freeze_for_trainer(model, selection(), weight_decay=0.1)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    frozen = frozen_digests(model)
    tok = char_tokenizer()
    batch = tok(TEXTS[:4], return_tensors="pt", padding=True)
    for _ in range(2):
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["input_ids"],
        ).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    assert check_frozen(model, frozen) == []
    assert sorted(trainable_names(model)) == sorted(SELECTED)


def test_callback_refuses_weight_decay_on_masked_experts() -> None:
    from types import SimpleNamespace

    from tests.unit.test_freezing import FusedMoE

    sel = Selection(
        (SelectionEntry("experts.gate_up_proj", 1, 2.0, 30),), "manual", None, "t", "", 4, 120, 125
    )
    cb = KappaTuneCallback(sel)
    with pytest.raises(
        KappaTuneError, match=r"weight_decay=0\.1 would change the unselected experts"
    ):
        cb.on_init_end(SimpleNamespace(weight_decay=0.1), None, None, model=FusedMoE())
    model = FusedMoE()
    cb.on_init_end(SimpleNamespace(weight_decay=0.0), None, None, model=model)
    assert trainable_names(model) == ["experts.gate_up_proj"]
