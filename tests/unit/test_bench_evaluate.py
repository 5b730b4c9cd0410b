import math

import pytest
import torch

from kappatune.bench.evaluate import (
    EvalSequence,
    LabelExample,
    label_accuracy,
    perplexity,
    tokenize_options,
)
from kappatune.errors import KappaTuneError
from tests.unit._tiny_models import tiny_llama

pytest.importorskip("transformers")


SEQS = [
    EvalSequence(ids=(1, 5, 9, 17, 33, 2, 64)),
    EvalSequence(ids=(1, 7, 8)),
    EvalSequence(ids=(1, 100, 101, 102, 103)),
]


def _by_hand(model: torch.nn.Module, seqs: list[EvalSequence]) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            logits = model(torch.tensor([s.ids])).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            for i in range(1, len(s.ids)):
                if s.targets is None or s.targets[i]:
                    total -= float(logp[i - 1, s.ids[i]])
                    count += 1
    return total, count


def test_perplexity_is_token_weighted_with_padding_masked() -> None:
    model = tiny_llama()
    nll, count = _by_hand(model, SEQS)
    assert count == 6 + 2 + 4
    for pad_id in (0, 127):
        res = perplexity(model, SEQS, pad_id=pad_id, batch_size=2)
        assert res.tokens == 12
        assert res.nll_sum == pytest.approx(nll, rel=1e-5)
        assert res.perplexity == pytest.approx(math.exp(nll / 12), rel=1e-5)
    # a mean of per-batch means would differ: the batches hold 8 and 4 tokens
    b1, n1 = _by_hand(model, SEQS[:2])
    b2, n2 = _by_hand(model, SEQS[2:])
    assert abs((b1 / n1 + b2 / n2) / 2 - nll / count) > 1e-4


def test_perplexity_honours_target_masks() -> None:
    model = tiny_llama()
    seqs = [
        EvalSequence(ids=(1, 5, 9, 17, 33), targets=(False, False, False, True, True)),
        EvalSequence(ids=(1, 7, 8, 40), targets=(True, True, False, True)),
    ]
    nll, count = _by_hand(model, seqs)
    assert count == 4  # position 0 never counts
    res = perplexity(model, seqs, pad_id=0, batch_size=2)
    assert res.tokens == 4
    assert res.nll_sum == pytest.approx(nll, rel=1e-5)


def test_eval_sequence_validation() -> None:
    with pytest.raises(KappaTuneError, match="at least 2 tokens"):
        EvalSequence(ids=(1,))
    with pytest.raises(KappaTuneError, match="3 entries for 2 tokens"):
        EvalSequence(ids=(1, 2), targets=(True, True, True))
    with pytest.raises(KappaTuneError, match="at least one sequence"):
        perplexity(tiny_llama(), [], pad_id=0)


def _bias_model(bias: torch.Tensor) -> torch.nn.Module:
    """A model whose next-token distribution is softmax(bias) everywhere."""
    model = tiny_llama()
    head = torch.nn.Linear(32, 128, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    model.lm_head = head
    return model


def test_label_scores_sum_option_token_loglik() -> None:
    bias = torch.zeros(128)
    bias[10], bias[11], bias[12] = 3.0, 1.0, 2.0
    model = _bias_model(bias)
    logp = torch.log_softmax(bias.double(), dim=-1)
    # option A = [10, 11] scores logp10 + logp11 = 4 - 2Z; option B = [12] scores 2 - Z; B wins
    options = ((10, 11), (12,))
    assert float(logp[10] + logp[11]) < float(logp[12])
    examples = [LabelExample(prompt=(1, 3, 4), label=1), LabelExample(prompt=(1, 5), label=0)]
    res = label_accuracy(model, examples, options, pad_id=0, batch_size=3)
    assert res.predictions == (1, 1)
    assert res.correct == 1 and res.accuracy == 0.5
    expected = -float(logp[12]) - float(logp[10] + logp[11])
    assert res.label_nll_sum == pytest.approx(expected, rel=1e-5)


def _copy_model() -> torch.nn.Module:
    """Attention and MLP outputs zeroed; token 10+k embeds as e_k and the head maps e_k to 10+k."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_()
        model.lm_head.weight.zero_()
        for k in range(4):
            emb[10 + k].zero_()
            emb[10 + k, k] = 1.0
            model.lm_head.weight[10 + k, k] = 20.0
    return model


def test_label_accuracy_known_answer_single_token_options() -> None:
    model = _copy_model()
    options = ((10,), (11,), (12,), (13,))
    examples = [LabelExample(prompt=(1, 50, 60, 10 + k), label=k) for k in (2, 0, 3, 1, 2)]
    res = label_accuracy(model, examples, options, pad_id=0, batch_size=2)
    assert res.predictions == (2, 0, 3, 1, 2)
    assert res.accuracy == 1.0
    assert res.label_nll < 1e-6
    wrong = [LabelExample(prompt=(1, 10 + k), label=(k + 1) % 4) for k in range(4)]
    assert label_accuracy(model, wrong, options, pad_id=0).accuracy == 0.0


def test_label_accuracy_input_checks() -> None:
    model = _copy_model()
    with pytest.raises(KappaTuneError, match="label index 4 is out of range for 2 options"):
        label_accuracy(model, [LabelExample((1, 2), 4)], ((10,), (11,)), pad_id=0)
    with pytest.raises(KappaTuneError, match="at least one example"):
        label_accuracy(model, [], ((10,), (11,)), pad_id=0)


class _Tok:
    unk_token_id = 3

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text if c != "~"] + ([3] if "?" in text else [])


def test_tokenize_options_rejects_bad_options() -> None:
    assert tokenize_options(_Tok(), ["a", "bc"]) == ((97,), (98, 99))
    with pytest.raises(KappaTuneError, match="label option '~' does not tokenize"):
        tokenize_options(_Tok(), ["a", "~"])
    with pytest.raises(KappaTuneError, match="unknown token 3"):
        tokenize_options(_Tok(), ["a", "?"])
    with pytest.raises(KappaTuneError, match="'a' and 'a~' tokenize to the same ids"):
        tokenize_options(_Tok(), ["a", "a~"])
    with pytest.raises(KappaTuneError, match="at least 2 options"):
        tokenize_options(_Tok(), ["a"])


# --------------------------------------------------------------------------- control: KL


def test_kl_is_zero_for_the_base_model_and_matches_a_hand_computation() -> None:
    from kappatune.bench.evaluate import BaseReference, control_eval

    base = tiny_llama(0)
    res = control_eval(base, SEQS, pad_id=0, batch_size=2, base=BaseReference(base, pad_id=0))
    assert res.kl == 0.0
    assert res.tokens == (6, 2, 4)
    nll, count = _by_hand(base, SEQS)
    assert sum(res.nll_sums) == pytest.approx(nll, rel=1e-6) and sum(res.tokens) == count

    tuned = tiny_llama(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected, n = 0.0, 0
    with torch.no_grad():
        for s in SEQS:
            ids = torch.tensor([s.ids])
            lp = torch.log_softmax(base(ids).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(tuned(ids).logits[0, :-1].double(), -1)
            expected += float((lp.exp() * (lp - lq)).sum())
            n += len(s.ids) - 1
    for cache_mb in (1024.0, 0.0):  # cached base log-probs or recomputed: the same numbers
        ref = BaseReference(base, pad_id=0, cache_mb=cache_mb)
        got = control_eval(tuned, SEQS, pad_id=0, batch_size=2, base=ref)
        assert got.kl == pytest.approx(expected / n, rel=1e-4)
        assert got.kl > 0
    assert math.isnan(control_eval(tuned, SEQS, pad_id=0).kl)


def test_chunked_nll_and_kl_match_a_whole_batch_computation() -> None:
    from kappatune.bench import evaluate as E

    g = torch.Generator().manual_seed(0)
    rows, positions, vocab = 3, 2 * E.KL_CHUNK + 5, 11  # chunks cross rows; padded rows
    full = torch.randn(rows, positions + 1, vocab, generator=g)
    logits = full[:, :-1]  # the view control_eval gets: last position cut off
    target = torch.randint(0, vocab, (rows, positions), generator=g)
    target[1, 20:] = E.IGNORE
    target[2, 0] = E.IGNORE
    scored = target != E.IGNORE
    ref = torch.log_softmax(torch.randn(int(scored.sum()), vocab, generator=g), dim=-1)
    sums, kl = E._scored_nll_and_kl(logits, target, ref)
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = [float(-(picked[i] * scored[i]).sum()) for i in range(rows)]
    assert sums == pytest.approx(expected, rel=1e-6)
    r = ref.double()
    assert kl == pytest.approx(float((r.exp() * (r - logp[scored])).sum()), rel=1e-6)
    assert E._scored_nll_and_kl(logits, target, None)[1] == 0.0
    with pytest.raises(KappaTuneError, match="base log-probabilities cover"):
        E._scored_nll_and_kl(logits, target, ref[1:])
