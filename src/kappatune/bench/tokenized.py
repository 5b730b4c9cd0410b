"""Scenario data -> token ids: training rows and the fixed evaluation sets.

Text splits are packed into ``seq_len`` chunks (control text: ``control_seq_len``, longer by
default: a row's first tokens, predicted without context, would otherwise weigh on the control
perplexity and on how it changes) that each start with the tokenizer's own
prefix (BOS for Gemma) via :mod:`kappatune.training.data`; prompt/completion and label records are one
row each (prefix + prompt + completion), with the loss on the completion only. Evaluation sets
are a fixed, evenly spaced subset of the held-out and control rows, identical for every arm.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kappatune.bench.config import EvalSizes as EvalSizes  # declared there
from kappatune.bench.evaluate import EvalSequence, LabelExample, tokenize_options
from kappatune.bench.records import Split
from kappatune.bench.scenarios import Scenario, ScenarioData
from kappatune.errors import KappaTuneError
from kappatune.training.data import Example, PackConfig, TokenizedData, special_tokens, tokenize

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PreparedScenario:
    """A scenario ready to run: training rows, evaluation sets and a digest of all of them."""

    scenario: Scenario
    train: TokenizedData
    task_sequences: tuple[EvalSequence, ...]
    task_examples: tuple[LabelExample, ...]
    options: tuple[tuple[int, ...], ...]
    control: tuple[EvalSequence, ...]
    pad_id: int
    digest: str
    # data of what to keep (CorDA-KPM): control rows the control evaluation does not use
    keep: TokenizedData | None = None
    keep_digest: str = ""
    seq_len: int = 64  # tokens per training row: an evaluation batch holds batch x this many

    @property
    def metric(self) -> str:
        return self.scenario.task_metric

    def rows_per_batch(self, batch_size: int, rows: Sequence[EvalSequence]) -> int:
        """Rows of ``rows`` per forward pass: ``batch_size`` rows of :attr:`seq_len` tokens'
        worth (longer control rows, fewer per pass: the logits over the vocabulary dominate)."""
        longest = max((len(r.ids) for r in rows), default=self.seq_len)
        return max(1, batch_size * self.seq_len // max(longest, self.seq_len))


def evenly(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return [i * n // k for i in range(k)]


def _examples(split: Split) -> list[Example]:
    return [Example(r.prompt, r.completion) for r in split.records]


def _row_len(tokenizer: PreTrainedTokenizerBase, split: Split, eos: bool, limit: int) -> int:
    """Length of the longest prefix + prompt + completion row (error past ``limit``)."""
    prefix = len(special_tokens(tokenizer).prefix)
    longest, which = 0, 0
    for i, r in enumerate(split.records):
        n = prefix + len(tokenizer(r.prompt, add_special_tokens=False)["input_ids"])
        n += len(tokenizer(r.completion, add_special_tokens=False)["input_ids"]) + int(eos)
        if n > longest:
            longest, which = n, i
    if longest > limit:
        raise KappaTuneError(
            f"{split.origin}: record {which + 1} is {longest} tokens long, more than the"
            f" maximum row length {limit} (raise --max-row-len or shorten the prompts)"
        )
    return max(2, longest)


def tokenize_split(
    tokenizer: PreTrainedTokenizerBase, split: Split, sizes: EvalSizes, seq_len: int | None = None
) -> TokenizedData:
    """Text packed into rows of ``seq_len`` (default ``sizes.seq_len``) tokens; other kinds one
    row per record."""
    if split.kind == "text":
        length = sizes.seq_len if seq_len is None else seq_len
        return tokenize(tokenizer, _examples(split), PackConfig(seq_len=length))
    eos = split.kind == "pairs"
    length = _row_len(tokenizer, split, eos, sizes.max_row_len)
    return tokenize(
        tokenizer, _examples(split), PackConfig(seq_len=length, pack=False, add_eos=eos)
    )


def eval_sequences(data: TokenizedData, k: int) -> tuple[EvalSequence, ...]:
    out = []
    for i in evenly(len(data), k):
        n = int(data.attention_mask[i].sum())
        ids = tuple(int(t) for t in data.input_ids[i, :n])
        targets = tuple(bool(t) for t in (data.labels[i, :n] != -100))
        if n >= 2 and any(targets[1:]):
            out.append(EvalSequence(ids, targets))
    if not out:
        raise KappaTuneError("no evaluation sequence with at least one scored token")
    return tuple(out)


def warn_if_short(what: str, origin: str, got: int, asked: int) -> None:
    """Say so when a text holds fewer evaluation rows than the settings ask for."""
    if got < asked:
        log.warning(
            "%s: %s has %d %s rows, fewer than the %d asked for; evaluating on %d",
            what, origin, got, what, asked, got,
        )  # fmt: skip


def keep_rows(control_rows: TokenizedData, sizes: EvalSizes) -> TokenizedData | None:
    """The control rows that :func:`eval_sequences` does not pick (None when it picks them all)."""
    held = set(evenly(len(control_rows), sizes.control_sequences))
    rest = [i for i in range(len(control_rows)) if i not in held]
    return control_rows.subset(rest) if rest else None


def label_examples(
    tokenizer: PreTrainedTokenizerBase, split: Split, k: int
) -> tuple[LabelExample, ...]:
    prefix = special_tokens(tokenizer).prefix
    out = []
    for i in evenly(len(split.records), k):
        r = split.records[i]
        assert r.label is not None
        prompt = tuple(int(t) for t in tokenizer(r.prompt, add_special_tokens=False)["input_ids"])
        out.append(LabelExample(prefix + prompt, r.label))
    return tuple(out)


def digest(parts: Sequence[object]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, TokenizedData):
            for t in (part.input_ids, part.attention_mask, part.labels):
                h.update(t.contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode("utf-8"))
        h.update(b"|")
    return h.hexdigest()


def prepare(
    scenario: Scenario, data: ScenarioData, tokenizer: PreTrainedTokenizerBase, sizes: EvalSizes
) -> PreparedScenario:
    """Tokenize the three splits; check label options tokenize before anything runs."""
    options: tuple[tuple[int, ...], ...] = ()
    if scenario.task_metric == "accuracy":
        options = tokenize_options(tokenizer, scenario.options)
    train = tokenize_split(tokenizer, data.train, sizes)
    control_rows = tokenize_split(tokenizer, data.control, sizes, sizes.control_seq_len)
    control = eval_sequences(control_rows, sizes.control_sequences)
    warn_if_short("control", data.control.origin, len(control), sizes.control_sequences)
    task_sequences: tuple[EvalSequence, ...] = ()
    task_examples: tuple[LabelExample, ...] = ()
    if scenario.task_metric == "accuracy":
        task_examples = label_examples(tokenizer, data.heldout, sizes.task_examples)
        warn_if_short("task", data.heldout.origin, len(task_examples), sizes.task_examples)
    else:
        held = tokenize_split(tokenizer, data.heldout, sizes)
        task_sequences = eval_sequences(held, sizes.task_sequences)
        warn_if_short("task", data.heldout.origin, len(task_sequences), sizes.task_sequences)
    pad = special_tokens(tokenizer).pad
    keep = keep_rows(control_rows, sizes)
    prepared = PreparedScenario(
        scenario=scenario,
        train=train,
        task_sequences=task_sequences,
        task_examples=task_examples,
        options=options,
        control=control,
        pad_id=pad,
        digest=digest([train, task_sequences, task_examples, options, control, pad]),
        keep=keep,
        keep_digest="" if keep is None else digest([keep]),
        seq_len=sizes.seq_len,
    )
    label_rows_match(prepared)
    return prepared


def label_rows_match(prepared: PreparedScenario) -> None:
    """Training rows of a label task end with exactly one option's tokens (a consistency check)."""
    if prepared.metric != "accuracy":
        return
    opts = set(prepared.options)
    for i in range(min(len(prepared.train), 64)):
        lab = prepared.train.labels[i]
        toks = tuple(int(t) for t in lab[lab != -100])
        if toks not in opts:
            raise KappaTuneError(
                f"training row {i + 1} is labelled with tokens {list(toks)}, not one option's tokens"
            )
