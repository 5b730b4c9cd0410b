from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kappatune.errors import KappaTuneError
from kappatune.training import data
from kappatune.training.data import IGNORE_INDEX, Example, PackConfig
from tests.unit._tiny_models import char_tokenizer

# character ids of the tiny tokenizer: a=14, b=15, ..., g=20; <pad>=0, <eos>=1, <bos>=2
A = 14
M = IGNORE_INDEX


def ids(text: str) -> list[int]:
    return [A + ord(c) - ord("a") for c in text]


def test_special_tokens_follow_tokenizer() -> None:
    assert data.special_tokens(char_tokenizer()) == data.SpecialTokens((2,), 1, 0)
    assert data.special_tokens(char_tokenizer(add_bos=False)) == data.SpecialTokens((), 1, 0)


def test_packing_puts_bos_in_every_chunk_and_masks_padding() -> None:
    out = data.tokenize(char_tokenizer(), [Example.text("abcdefg")], PackConfig(seq_len=4))
    assert out.input_ids.tolist() == [[2, *ids("abc")], [2, *ids("def")], [2, *ids("g"), 1, 0]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert out.labels.tolist() == [[M, *ids("abc")], [M, *ids("def")], [M, *ids("g"), 1, M]]
    assert out.n_tokens == 11 and out.n_label_tokens == 8


def test_packing_without_bos_tokenizer() -> None:
    out = data.tokenize(
        char_tokenizer(add_bos=False), [Example.text("ab"), Example.text("c")], PackConfig(3)
    )
    assert out.input_ids.tolist() == [[*ids("ab"), 1], [*ids("c"), 1, 0]]
    assert out.labels.tolist() == [[*ids("ab"), 1], [*ids("c"), 1, M]]


def test_prompt_completion_loss_on_completion_only() -> None:
    ex = [Example("ab", "cd"), Example("e", "f")]
    out = data.tokenize(char_tokenizer(), ex, PackConfig(seq_len=6, pack=False))
    assert out.input_ids.tolist() == [[2, *ids("abcd"), 1], [2, *ids("ef"), 1, 0, 0]]
    assert out.labels.tolist() == [[M, M, M, *ids("cd"), 1], [M, M, *ids("f"), 1, M, M]]
    assert out.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


def test_completion_cut_off_entirely_is_an_error() -> None:
    with pytest.raises(
        KappaTuneError,
        match=r"no trainable tokens: the completion of every example \(1 of 1\) starts past the"
        " 4-token rows of --no-pack",
    ):
        data.tokenize(char_tokenizer(), [Example("abcdef", "g")], PackConfig(seq_len=4, pack=False))


def test_unpacked_rows_count_dropped_and_truncated_examples() -> None:
    examples = [Example("a", "b"), Example("ab", "cdefgh"), Example("abcdef", "g")]
    got = data.tokenize(char_tokenizer(), examples, PackConfig(seq_len=4, pack=False))
    # <bos> + 3 tokens a row: "a"+"b"+<eos> fits, "ab"+"cdefgh" is cut, "abcdef" leaves no
    # completion token (dropped)
    assert (len(got), got.dropped, got.truncated) == (2, 1, 1)


def test_read_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    lines = [{"text": "one"}, {"prompt": "Q", "completion": "A"}, {"text": "   "}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "three"}]))
    got = data.load_examples([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.json"])
    assert got == [
        Example("", "hello\nworld\n"),
        Example("", "one"),
        Example("Q", "A"),
        Example("", "three"),
    ]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "  \n\n", r"empty.txt has no usable text: 4 characters, 0 non-blank"),
        (
            "blank.jsonl",
            '{"text": ""}\n{"text": " "}\n',
            r"blank.jsonl has no usable text: 2 records, 2 with empty",
        ),
        ("bad.jsonl", '{"text": "x"}\nnot json\n', r"bad.jsonl line 2 is not valid JSON"),
        (
            "fields.jsonl",
            '{"body": "x"}\n',
            r"fields.jsonl line 1: a record needs a 'text' field.*body",
        ),
        ("type.jsonl", '{"text": 3}\n', r"'text' must be a string, got int"),
        ("list.json", '{"text": "x"}', r"must hold a JSON list of records, got dict"),
        ("latin.txt", b"caf\xe9", r"not UTF-8 text \(bad byte at offset 3\)"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(KappaTuneError, match=message) as info:
        data.load_examples([p])
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(KappaTuneError, match="no such data file"):
        data.load_examples([tmp_path / "nope.jsonl"])
    with pytest.raises(KappaTuneError, match="is a directory"):
        data.load_examples([tmp_path])
    with pytest.raises(KappaTuneError, match="no training data"):
        data.load_examples([])


def test_hf_dataset_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        KappaTuneError, match=r"cannot load Hugging Face dataset 'nobody/nothing@test'"
    ) as info:
        data.load_examples(["nobody/nothing@test"])
    assert "\n" not in str(info.value)


def test_hf_dataset_records(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    seen: list[tuple[str, str | None, str]] = []

    def fake_load(name: str, config: str | None, split: str) -> datasets.Dataset:
        seen.append((name, config, split))
        return datasets.Dataset.from_list(
            [{"prompt": "p", "completion": "c"}, {"prompt": "q", "completion": ""}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert data.load_examples(["owner/set:cfg@validation"]) == [Example("p", "c")]
    assert seen == [("owner/set", "cfg", "validation")]


def test_batches_are_deterministic() -> None:
    out = data.pack_texts(char_tokenizer(), ["abcdefghijklmnopqrstuvwxyz" * 3], seq_len=8)
    assert len(out) == 12
    first = [b.input_ids[:, 1].tolist() for b in out.batches(5, shuffle=True, seed=3)]
    again = [b.input_ids[:, 1].tolist() for b in out.batches(5, shuffle=True, seed=3)]
    other = [b.input_ids[:, 1].tolist() for b in out.batches(5, shuffle=True, seed=4)]
    assert first == again and first != other
    assert [len(b) for b in first] == [5, 5, 2]
    assert sum(len(b.labels) for b in out.batches(5, drop_last=True)) == 10
    plain = [b.input_ids for b in out.batches(4)]
    assert torch.equal(torch.cat(plain), out.input_ids)


def test_tokenized_data_validates_shapes() -> None:
    z = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels shape"):
        data.TokenizedData(z, z, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(KappaTuneError, match="at least 2"):
        PackConfig(seq_len=1)


def test_alpaca_and_sharegpt_records(tmp_path: Path) -> None:
    """Alpaca records become prompt/completion with Stanford Alpaca's template; ShareGPT
    conversations become chat messages (human -> user, gpt -> assistant)."""
    from kappatune.training.data import ChatExample

    f = tmp_path / "mixed.jsonl"
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Nothing to learn.", "output": " "},
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    ]  # fmt: skip
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    got = data.read_file(f)
    assert got[0] == Example(
        "Below is an instruction that describes a task, paired with an input that provides"
        " further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "5",
    )
    assert got[1] == Example(
        "Below is an instruction that describes a task. Write a response that appropriately"
        " completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n",
        "hi",
    )
    assert got[2] == ChatExample(
        (("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"))
    )  # the empty alpaca output is skipped
    assert len(got) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n")
    with pytest.raises(KappaTuneError, match="turn 0 is from the unknown speaker 'bot'"):
        data.read_file(bad)
    bad.write_text(json.dumps({"instruction": "x", "output": 3}) + "\n")
    with pytest.raises(KappaTuneError, match="'output' must be a string, got int"):
        data.read_file(bad)
