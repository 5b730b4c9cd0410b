from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kappatune.errors import KappaTuneError
from kappatune.training.data import (
    IGNORE_INDEX,
    ChatExample,
    PackConfig,
    chat_segments,
    load_examples,
    tokenize,
)
from tests.unit._tiny_models import char_tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao."},
]


def chat_tokenizer() -> Any:
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def labelled_runs(ids: list[int], labels: list[int], tok: Any) -> list[tuple[int, str]]:
    """(start, decoded text) of each run of labelled positions."""
    runs: list[tuple[int, list[int]]] = []
    for i, (t, lab) in enumerate(zip(ids, labels, strict=True)):
        if lab == IGNORE_INDEX:
            continue
        assert lab == t
        if runs and runs[-1][0] + len(runs[-1][1]) == i:
            runs[-1][1].append(t)
        else:
            runs.append((i, [t]))
    return [(start, text_of(tok, toks)) for start, toks in runs]


def text_of(tok: Any, ids: list[int]) -> str:
    return "".join(tok.convert_ids_to_tokens(ids))  # one token per character


def test_messages_jsonl_loss_on_assistant_turns_only(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": CHAT},
        {"messages": [{"role": "user", "content": "no answer"}]},  # nothing to learn: skipped
        {"text": "plain"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = load_examples([path])
    assert len(examples) == 2 and isinstance(examples[0], ChatExample)
    tok = chat_tokenizer()
    data = tokenize(tok, examples[:1], PackConfig(seq_len=128, pack=False))
    ids, labels = data.input_ids[0].tolist(), data.labels[0].tolist()
    n = int(data.attention_mask[0].sum())
    text = text_of(tok, ids[:n])
    # one BOS (the template's BOS is dropped; the packer puts the tokenizer's in front), then
    # the rendered conversation and EOS as the document separator
    assert text == (
        "<bos><system>Be brief.</>\n<user>Hi</>\n<assistant>Hello!</>\n"
        "<user>Bye</>\n<assistant>Ciao.</>\n<eos>"
    )
    prefix = len("<system>Be brief.</>\n<user>Hi</>\n<assistant>") + 1  # + BOS
    second = prefix + len("Hello!</>\n<user>Bye</>\n<assistant>")
    assert labelled_runs(ids[:n], labels[:n], tok) == [
        (prefix, "Hello!</>\n"),
        (second, "Ciao.</>\n"),
    ]
    assert data.n_label_tokens == len("Hello!</>\n") + len("Ciao.</>\n")


def test_chat_segments_and_errors() -> None:
    tok = chat_tokenizer()
    ex = ChatExample((("user", "Q"), ("assistant", "A")))
    assert chat_segments(tok, ex) == [("<user>Q</>\n<assistant>", False), ("A</>\n", True)]
    plain = char_tokenizer()
    with pytest.raises(KappaTuneError, match="needs a tokenizer with a chat template"):
        tokenize(plain, [ex])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": "hi"}, "'messages' must be a list, got str"),
        ({"messages": [{"content": "x"}]}, "message 0 needs a string 'role'"),
        ({"messages": [{"role": "user", "content": [1]}]}, "message 0 needs a string 'content'"),
    ],
)
def test_bad_messages(tmp_path: Path, record: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(KappaTuneError, match=f"^{path} line 1: {message}"):
        load_examples([path])
