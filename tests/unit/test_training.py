from __future__ import annotations

import copy
import math

import pytest
import torch

from kappatune.analysis.spectra import AnalyzeOptions, analyze
from kappatune.errors import KappaTuneError
from kappatune.integrations.lora import all_linear_targets, lora_param_count
from kappatune.selection.budget import Budget
from kappatune.selection.core import Selection, SelectionEntry, select
from kappatune.training.data import Example, PackConfig, pack_texts, tokenize
from kappatune.training.freezing import check_frozen, frozen_digests
from kappatune.training.loop import (
    LoraSettings,
    StopRule,
    TrainConfig,
    evaluate_loss,
    lr_lambda,
    prepare_model,
    train_loop,
)
from tests.unit._tiny_models import char_tokenizer, tiny_llama

TEXT = "the quick brown fox jumps over the lazy dog. " * 8


def data(seq_len: int = 16):
    return pack_texts(char_tokenizer(), [TEXT], seq_len=seq_len)


def manual(*names: str) -> Selection:
    es = tuple(SelectionEntry(n, None, 1.0, 1) for n in names)
    return Selection(es, "manual", None, "test", "", len(es), len(es), 1)


def test_config_validation_and_steps() -> None:
    with pytest.raises(KappaTuneError, match="exactly one of --steps and --epochs"):
        TrainConfig()
    with pytest.raises(KappaTuneError, match="exactly one"):
        TrainConfig(steps=1, epochs=1)
    with pytest.raises(KappaTuneError, match="--lr must be a positive number, got 0"):
        TrainConfig(steps=1, lr=0)
    with pytest.raises(KappaTuneError, match="--scheduler must be one of"):
        TrainConfig(steps=1, scheduler="step")
    assert TrainConfig(epochs=1, batch_size=2).total_steps(5) == 3
    assert TrainConfig(epochs=2, batch_size=2, grad_accum=2).total_steps(5) == 3
    assert TrainConfig(epochs=0.5, batch_size=1).total_steps(5) == 3
    cfg = TrainConfig(steps=3, lr=1e-3, warmup_steps=1, betas=(0.8, 0.9))
    assert TrainConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": math.inf}, "--epochs must be a positive finite number, got inf"),
        (
            {"steps": 1, "weight_decay": math.inf},
            "--weight-decay must be a finite number >= 0, got inf",
        ),
        (
            {"steps": 1, "weight_decay": math.nan},
            "--weight-decay must be a finite number >= 0, got nan",
        ),
        (
            {"steps": 1, "max_grad_norm": math.inf},
            "max grad norm must be a positive finite number or None, got inf",
        ),
    ],
)
def test_config_refuses_what_run_json_cannot_hold(kwargs: dict[str, float], message: str) -> None:
    """Non-finite settings would reach run.json (strict JSON) as an internal error."""
    with pytest.raises(KappaTuneError) as err:
        TrainConfig(**kwargs)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_lr_schedule() -> None:
    f = lr_lambda(TrainConfig(steps=6, warmup_steps=2, scheduler="linear"), 6)
    assert [round(f(s), 4) for s in range(7)] == [0.3333, 0.6667, 1.0, 0.75, 0.5, 0.25, 0.0]
    g = lr_lambda(TrainConfig(steps=4, scheduler="cosine"), 4)
    assert [round(g(s), 4) for s in range(5)] == [1.0, 0.8536, 0.5, 0.1464, 0.0]
    h = lr_lambda(TrainConfig(steps=4, warmup_steps=1), 4)
    assert [h(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_full_training_lowers_loss_and_records_steps() -> None:
    model = tiny_llama(seed=0)
    d = data()
    before = evaluate_loss(model, d)
    prepared = prepare_model(model, "full")
    assert prepared.trainable_params == sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(steps=8, lr=1e-2, batch_size=5, shuffle=False)
    res = train_loop(model, d, cfg, param_groups=prepared.param_groups)
    assert (
        res.steps == 8
        and res.stopped_by == "steps"
        and len(res.losses) == 8
        and len(res.step_times) == 8
    )
    assert all(t > 0 for t in res.step_times)
    assert (
        len(d) == 25 and res.tokens == d.n_tokens + 15 * 16
    )  # one epoch, then 3 batches of 5 full rows
    after = evaluate_loss(model, d)
    assert after < before - 0.5
    assert not model.training


def test_selective_training_keeps_frozen_tensors_bit_identical() -> None:
    model = tiny_llama(seed=3)
    sel = select(analyze(model, AnalyzeOptions(workers=1)), "lowest-kappa", Budget(tensors=2))
    prepared = prepare_model(model, "selective", sel, weight_decay=0.1)
    assert prepared.trainable_params == sel.param_count
    digests = frozen_digests(model)
    cfg = TrainConfig(steps=3, lr=1e-2, batch_size=2, weight_decay=0.1)
    res = train_loop(model, data(), cfg, param_groups=prepared.param_groups)
    assert check_frozen(model, digests) == []
    assert res.trainable_params == sel.param_count


def test_grad_accumulation_is_token_weighted() -> None:
    tok = char_tokenizer()
    # rows with different numbers of labelled tokens: the weighting matters
    ex = [
        Example("ab", "cdefgh"),
        Example("abcdef", "g"),
        Example("a", "bcdefghijk"),
        Example("abc", "de"),
    ]
    d = tokenize(tok, ex, PackConfig(seq_len=12, pack=False))
    results = []
    for bs, acc in ((4, 1), (2, 2), (1, 4)):
        model = tiny_llama(seed=5)
        cfg = TrainConfig(
            steps=2, lr=1e-2, batch_size=bs, grad_accum=acc, shuffle=False, max_grad_norm=None
        )
        epochs_rows = d.subset([0, 1, 2, 3, 0, 1, 2, 3])
        res = train_loop(model, epochs_rows, cfg)
        results.append((res.losses, model.model.layers[0].mlp.up_proj.weight.detach().clone()))
    for losses, weight in results[1:]:
        assert losses == pytest.approx(results[0][0], rel=1e-5)
        assert (weight - results[0][1]).abs().max() < 1e-4  # Adam moves each weight by ~lr = 1e-2


def test_resume_continues_exactly() -> None:
    d = data()
    cfg = TrainConfig(steps=4, lr=5e-3, batch_size=3, warmup_steps=1, scheduler="linear", seed=7)
    straight = tiny_llama(seed=1)
    full = train_loop(straight, d, cfg)

    first = tiny_llama(seed=1)
    saved: dict = {}

    def checkpoint(state) -> None:  # type: ignore[no-untyped-def]
        if state.step == 2:
            saved["loop"] = copy.deepcopy(state.state_dict())  # the live state keeps changing
            saved["model"] = {k: v.clone() for k, v in first.state_dict().items()}

    train_loop(first, d, cfg, on_step=checkpoint)
    second = tiny_llama(seed=99)
    second.load_state_dict(saved["model"])
    resumed = train_loop(second, d, cfg, resume=saved["loop"])
    assert resumed.steps == 4 and len(resumed.losses) == 4
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6)
    for (n, a), b in zip(straight.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), n


def test_stop_rules() -> None:
    d = data()
    res = train_loop(
        tiny_llama(), d, TrainConfig(steps=10, lr=1e-3), StopRule(target_loss=100.0, min_steps=2)
    )
    assert (res.steps, res.stopped_by) == (2, "target_loss")
    res = train_loop(
        tiny_llama(), d, TrainConfig(steps=10, lr=1e-3), StopRule(target_loss=0.01, max_steps=3)
    )
    assert (res.steps, res.stopped_by, res.total_steps) == (3, "max_steps", 10)
    # bias-corrected EMA of the per-step losses
    ema = 0.0
    for i, loss in enumerate(res.losses, start=1):
        ema = 0.5 * ema + 0.5 * loss
        corrected = ema / (1 - 0.5**i)
    r2 = train_loop(tiny_llama(), d, TrainConfig(steps=3, lr=1e-3), StopRule(ema_decay=0.5))
    assert r2.losses == pytest.approx(res.losses)
    assert r2.ema_loss == pytest.approx(corrected)


def test_prepare_lora_methods() -> None:
    model = tiny_llama()
    expected = lora_param_count(model, all_linear_targets(model), 2)
    prepared = prepare_model(model, "lora", lora=LoraSettings(r=2))
    assert prepared.trainable_params == expected and prepared.lora_r == 2
    res = train_loop(
        prepared.model, data(), TrainConfig(steps=2, lr=1e-3), param_groups=prepared.param_groups
    )
    assert res.trainable_params == expected

    sel = manual("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight")
    per_rank = (32 + 16) + (64 + 32)
    kl = prepare_model(
        tiny_llama(), "kappa-lora", sel, LoraSettings(r=None, budget_params=5 * per_rank + 3)
    )
    assert (kl.lora_r, kl.trainable_params) == (5, 5 * per_rank)
    assert kl.lora_targets == {
        "target_modules": ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"],
        "target_parameters": None,
    }
    kl2 = prepare_model(tiny_llama(), "kappa-lora", sel, LoraSettings(r=1, budget_params=100))
    assert kl2.lora_targets == {
        "target_modules": ["model.layers.0.self_attn.v_proj"],
        "target_parameters": None,
    }
    with pytest.raises(KappaTuneError, match="needs a selection"):
        prepare_model(tiny_llama(), "selective")
    with pytest.raises(KappaTuneError) as err:
        prepare_model(tiny_llama(), "adapter")
    assert str(err.value) == (
        "unknown training method 'adapter' (known: selective, kappa-lora, lora, full)"
    )
    with pytest.raises(KappaTuneError, match="LoRA needs a rank or a parameter budget"):
        LoraSettings(r=None)


def test_nothing_to_train() -> None:
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(KappaTuneError, match="nothing to train"):
        train_loop(model, data(), TrainConfig(steps=1))
    assert math.isfinite(evaluate_loss(model, data()))
