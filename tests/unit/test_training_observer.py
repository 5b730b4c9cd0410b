from __future__ import annotations

from kappatune.training.data import pack_texts
from kappatune.training.loop import StepRecord, TrainConfig, lr_lambda, prepare_model, train_loop
from tests.unit._tiny_models import char_tokenizer, tiny_llama

TEXT = "the quick brown fox jumps over the lazy dog. " * 8


def test_observer_gets_every_step_with_lr_and_tokens() -> None:
    data = pack_texts(char_tokenizer(), [TEXT], seq_len=16)
    model = tiny_llama(seed=0)
    prepared = prepare_model(model, "full")
    cfg = TrainConfig(steps=5, lr=1e-2, warmup_steps=2, scheduler="linear", batch_size=4,
                      grad_accum=2, shuffle=False)  # fmt: skip
    records: list[StepRecord] = []
    res = train_loop(model, data, cfg, param_groups=prepared.param_groups, observer=records.append)
    assert [r.step for r in records] == [1, 2, 3, 4, 5]
    assert all(r.total_steps == 5 for r in records)
    assert [r.loss for r in records] == list(res.losses)
    assert [r.seconds for r in records] == list(res.step_times)
    f = lr_lambda(cfg, 5)
    assert [round(r.lr, 10) for r in records] == [round(1e-2 * f(s), 10) for s in range(5)]
    # each step: 2 micro-batches of 4 rows, in row order (no shuffle), epoch after epoch
    per_step = [r.tokens for r in records]
    assert sum(per_step) == res.tokens
    epoch = [int(b.attention_mask.sum()) for b in data.batches(4)]
    stream = (epoch * 10)[:10]
    want = [stream[2 * i] + stream[2 * i + 1] for i in range(5)]
    assert per_step == want
    assert all(r.tokens_per_second == r.tokens / r.seconds for r in records)
