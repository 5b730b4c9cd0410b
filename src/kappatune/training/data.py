"""Training and evaluation text: read, tokenize, pack into fixed-length chunks.

Sources: plain text files (one document per file), JSONL or JSON-list files whose records
hold a ``text`` field, ``prompt`` + ``completion`` (loss on the completion only) or a chat
``messages`` list of ``{"role", "content"}`` (rendered with the tokenizer's chat template;
loss on the assistant turns only); alpaca records (``instruction``, optional ``input``,
``output``: Stanford Alpaca's prompt template, loss on the output) and ShareGPT records
(``conversations`` of ``{"from", "value"}``: human -> user, gpt -> assistant), and Hugging Face
datasets by name
(``NAME[:CONFIG][@SPLIT]``) when the hub is reachable.

Packing concatenates documents (each followed by EOS when the tokenizer has one) and cuts
the stream into chunks that each start with the tokens the tokenizer itself puts in front
of a sequence (BOS for Gemma and Llama, nothing for GPT-2), so every chunk is a sequence
the model has seen in pre-training. Padding is masked (attention 0, label -100), and so
are prompts and the leading special tokens. Everything is deterministic.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kappatune.errors import KappaTuneError
from kappatune.training.config import PackConfig as PackConfig  # declared without torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
_HF_NAME = re.compile(
    r"^(?P<name>[\w.-]+(?:/[\w.-]+)?)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.:%\[\]+-]+))?$"
)


@dataclass(frozen=True)
class Example:
    """One training document; the loss covers ``completion`` only (all of it for plain text)."""

    prompt: str
    completion: str

    @classmethod
    def text(cls, text: str) -> Example:
        return cls("", text)


@dataclass(frozen=True)
class ChatExample:
    """One conversation: (role, content) turns; the loss covers the assistant turns only."""

    messages: tuple[tuple[str, str], ...]

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


AnyExample = Example | ChatExample


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
        }

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device)
        )


@dataclass(frozen=True)
class TokenizedData:
    """Rows of token ids (n, seq_len) with their attention mask and labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    # --no-pack: examples left out (no completion token within a row) and cut short
    dropped: int = field(default=0, compare=False)
    truncated: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"input_ids must be 2-D (rows, seq_len), got shape {shape}")
        for label, t in (("attention_mask", self.attention_mask), ("labels", self.labels)):
            if tuple(t.shape) != shape:
                raise ValueError(f"{label} shape {tuple(t.shape)} differs from input_ids {shape}")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def subset(self, index: torch.Tensor | Sequence[int]) -> TokenizedData:
        idx = torch.as_tensor(index, dtype=torch.long)
        return TokenizedData(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[Batch]:
        """Batches in row order, or in a permutation fixed by ``seed``."""
        if batch_size < 1:
            raise KappaTuneError(f"batch size must be at least 1, got {batch_size}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield Batch(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])

    def rows(self) -> list[dict[str, list[int]]]:
        """Plain lists, e.g. for ``datasets.Dataset.from_list``."""
        return [
            {
                "input_ids": self.input_ids[i].tolist(),
                "attention_mask": self.attention_mask[i].tolist(),
                "labels": self.labels[i].tolist(),
            }
            for i in range(len(self))
        ]


# --------------------------------------------------------------------------- reading


# the roles chat templates know (OpenAI's and Hugging Face's); anything else is a typo that
# would otherwise train silently (an 'asistant' turn is never in the loss)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
# one JSON record at most this long: tokenizing a 50 MB line takes several GB; a record this
# size is already far beyond any model's context (it is cut into --seq-len rows anyway)
MAX_RECORD_CHARS = 8_000_000


def _loads(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise KappaTuneError(f"{where} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except RecursionError:
        raise KappaTuneError(f"{where} is nested too deeply to be a record") from None


# ShareGPT's speakers as chat roles (FastChat's and Axolotl's reading)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "function_call": "assistant",
                  "observation": "tool"}  # fmt: skip
# Stanford Alpaca's prompt templates (also Axolotl's ``alpaca`` type), with and without an input
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further"
    " context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately"
    " completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def _sharegpt_messages(turns: object, where: str) -> list[dict[str, object]]:
    """ShareGPT ``conversations`` (``from``/``value``) as ``messages`` (``role``/``content``)."""
    if not isinstance(turns, list):
        raise KappaTuneError(f"{where}: 'conversations' must be a list, got {type(turns).__name__}")
    out: list[dict[str, object]] = []
    for i, t in enumerate(turns):
        if not (isinstance(t, Mapping) and isinstance(t.get("from"), str)):
            raise KappaTuneError(f"{where}: conversation turn {i} needs a string 'from'")
        if t["from"] not in SHAREGPT_ROLES:
            raise KappaTuneError(
                f"{where}: conversation turn {i} is from the unknown speaker {t['from']!r}"
                f" (known: {', '.join(SHAREGPT_ROLES)})"
            )
        out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")})
    return out


def _alpaca_example(record: Mapping[str, object], where: str) -> Example | None:
    """An alpaca record (``instruction``, optional ``input``, ``output``) as prompt/completion."""
    fields = {k: record.get(k, "") for k in ("instruction", "input", "output")}
    for k, v in fields.items():
        if not isinstance(v, str):
            raise KappaTuneError(f"{where}: '{k}' must be a string, got {type(v).__name__}")
    template = ALPACA_PROMPT if str(fields["input"]).strip() else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=fields["instruction"], input=fields["input"])
    output = str(fields["output"])
    return Example(prompt, output) if output.strip() else None


def _chat_example(messages: object, where: str) -> ChatExample | None:
    """A ChatExample from a ``messages`` list; None when no assistant turn has text."""
    if not isinstance(messages, list):
        raise KappaTuneError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)):
            raise KappaTuneError(f"{where}: message {i} needs a string 'role'")
        if not isinstance(m.get("content"), str):
            raise KappaTuneError(f"{where}: message {i} needs a string 'content'")
        if m["role"] not in CHAT_ROLES:
            raise KappaTuneError(
                f"{where}: message {i} has the unknown role {m['role']!r} (known:"
                f" {', '.join(CHAT_ROLES)})"
            )
        turns.append((m["role"], m["content"]))
    if not any(r == "assistant" and c.strip() for r, c in turns):
        return None
    return ChatExample(tuple(turns))


def _record_example(record: object, where: str) -> AnyExample | None:
    """An example from one record; None for a record with nothing to learn (empty text)."""
    ex = _record_example_unbounded(record, where)
    if ex is not None:
        size = (
            sum(len(c) for _, c in ex.messages)
            if isinstance(ex, ChatExample)
            else len(ex.prompt) + len(ex.completion)
        )
        if size > MAX_RECORD_CHARS:
            raise KappaTuneError(
                f"{where} holds {size:,} characters of text, over the {MAX_RECORD_CHARS:,} a"
                " record may have: split it into several records"
            )
    return ex


def _record_example_unbounded(record: object, where: str) -> AnyExample | None:
    if not isinstance(record, Mapping):
        raise KappaTuneError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _chat_example(record["messages"], where)
    if "conversations" in record:  # ShareGPT
        return _chat_example(_sharegpt_messages(record["conversations"], where), where)
    if "instruction" in record and "output" in record:  # alpaca
        return _alpaca_example(record, where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise KappaTuneError(f"{where}: 'prompt' and 'completion' must be strings")
        return Example(prompt, completion) if completion.strip() else None
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise KappaTuneError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        return Example.text(text) if text.strip() else None
    keys = ", ".join(sorted(map(str, record))[:6]) or "none"
    raise KappaTuneError(
        f"{where}: a record needs a 'text' field, 'prompt' and 'completion', 'messages',"
        " ShareGPT 'conversations' or alpaca 'instruction' and 'output'"
        f" (its fields: {keys})"
    )


def _examples_from_records(records: Iterable[tuple[str, object]], label: str) -> list[AnyExample]:
    out: list[AnyExample] = []
    total = 0
    for where, record in records:
        total += 1
        ex = _record_example(record, where)
        if ex is not None:
            out.append(ex)
    if not out:
        raise KappaTuneError(
            f"data {label} has no usable text: {total} records, {total} with empty text, 0 usable"
        )
    if len(out) < total:
        log.info("%s: skipped %d of %d records with empty text", label, total - len(out), total)
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KappaTuneError(
            f"data file {path} is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise KappaTuneError(f"cannot read data file {path}: {exc.strerror or exc}") from None


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[str, object]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        if len(line) > MAX_RECORD_CHARS:
            raise KappaTuneError(
                f"{where} is {len(line):,} characters long, over the {MAX_RECORD_CHARS:,} a record"
                " may have: split it into several records"
            )
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise KappaTuneError(f"{where} is not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise KappaTuneError(f"{where} is nested too deeply to be a record") from None


def read_file(path: str | os.PathLike[str]) -> list[AnyExample]:
    """Examples from one .txt/.jsonl/.json file (other suffixes are read as plain text)."""
    p = Path(path)
    text = _read_text(p)
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _examples_from_records(_jsonl_records(p, text), str(p))
    if suffix == ".json":
        data = _loads(text, str(p))
        if not isinstance(data, list):
            raise KappaTuneError(f"{p} must hold a JSON list of records, got {type(data).__name__}")
        return _examples_from_records(((f"{p} record {i}", r) for i, r in enumerate(data)), str(p))
    if not text.strip():
        raise KappaTuneError(
            f"data file {p} has no usable text: {len(text)} characters, 0 non-blank"
        )
    return [Example.text(text)]


def read_hf_dataset(spec: str) -> list[AnyExample]:
    """Examples from a Hugging Face dataset ``NAME[:CONFIG][@SPLIT]`` (split defaults to train)."""
    m = _HF_NAME.match(spec)
    if not m:
        raise KappaTuneError(
            f"{spec!r} is neither a file nor a dataset name (NAME[:CONFIG][@SPLIT])"
        )
    try:
        import datasets
    except ImportError:
        raise KappaTuneError(
            "Hugging Face datasets need the 'datasets' package: pip install datasets"
        ) from None
    split = m.group("split") or "train"
    try:
        ds = datasets.load_dataset(m.group("name"), m.group("config"), split=split)
    except Exception as exc:  # connection errors, missing datasets, bad configs: all user-fixable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KappaTuneError(f"cannot load Hugging Face dataset {spec!r}: {first}") from None
    return _examples_from_records(((f"{spec} row {i}", r) for i, r in enumerate(ds)), spec)


def load_examples(specs: Sequence[str | os.PathLike[str]]) -> list[AnyExample]:
    """Examples from files and dataset names, in the order given."""
    if not specs:
        raise KappaTuneError("no training data given")
    out: list[AnyExample] = []
    for spec in specs:
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            raise KappaTuneError(f"{path} is a directory: name the data files in it")
        if path.exists():
            out.extend(read_file(path))
        elif path.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl", ".json") or text.startswith(
            (".", "/", "~")
        ):
            raise KappaTuneError(f"no such data file: {text}")
        else:
            out.extend(read_hf_dataset(text))
    return out


# --------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class SpecialTokens:
    """What the tokenizer adds around a sequence, and the ids for EOS and padding."""

    prefix: tuple[int, ...]
    eos: int | None
    pad: int


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """The prefix the tokenizer's ``add_special_tokens`` puts in front of a text (e.g. BOS)."""
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    prefix: tuple[int, ...] = ()
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            prefix = tuple(full[:i])
            break
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if eos is not None else 0
    return SpecialTokens(prefix, None if eos is None else int(eos), int(pad))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool
) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert isinstance(text, str)  # tokenize=False renders text
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text  # the packer adds BOS


def chat_segments(tokenizer: PreTrainedTokenizerBase, ex: ChatExample) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, labelled) pieces: each assistant turn, as the
    template writes it after the generation prompt (end-of-turn marker included), is labelled."""
    if not getattr(tokenizer, "chat_template", None):
        raise KappaTuneError(
            "chat data ('messages' records) needs a tokenizer with a chat template;"
            " this model's tokenizer has none"
        )
    messages = ex.as_dicts()
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, (role, _) in enumerate(ex.messages):
        if role != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise KappaTuneError(
                "the tokenizer's chat template does not render a conversation as a prefix of its"
                " continuation, so the assistant turns cannot be located"
            )
        segments += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    full = _render(tokenizer, messages, False)
    if not full.startswith(done):
        raise KappaTuneError("the tokenizer's chat template renders turns inconsistently")
    segments.append((full[len(done) :], False))
    return [(t, lab) for t, lab in segments if t]


def _chat_tokens(
    tokenizer: PreTrainedTokenizerBase, ex: ChatExample, eos: int | None
) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, labelled in chat_segments(tokenizer, ex):
        piece = _encode(tokenizer, text)
        ids += piece
        labels += piece if labelled else [IGNORE_INDEX] * len(piece)
    if eos is not None:  # a document separator for packing; the template ends the turns
        ids.append(eos)
        labels.append(IGNORE_INDEX)
    return ids, labels


def _example_tokens(
    tokenizer: PreTrainedTokenizerBase, ex: AnyExample, eos: int | None
) -> tuple[list[int], list[int]]:
    if isinstance(ex, ChatExample):
        return _chat_tokens(tokenizer, ex, eos)
    prompt = _encode(tokenizer, ex.prompt)
    completion = _encode(tokenizer, ex.completion)
    if eos is not None:
        completion.append(eos)
    ids = prompt + completion
    labels = [IGNORE_INDEX] * len(prompt) + completion
    return ids, labels


def _rows_to_data(rows: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> TokenizedData:
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids, dtype=torch.long)
        attention[i, :k] = 1
        labels[i, :k] = torch.tensor(lab, dtype=torch.long)
    return TokenizedData(input_ids, attention, labels)


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[AnyExample],
    config: PackConfig | None = None,
) -> TokenizedData:
    """Tokenize ``examples`` into fixed-length rows (packed unless ``config.pack`` is False)."""
    config = config or PackConfig()
    special = special_tokens(tokenizer)
    prefix = list(special.prefix)
    body = config.seq_len - len(prefix)
    if body < 1:
        raise KappaTuneError(
            f"sequence length {config.seq_len} leaves no room after {len(prefix)} special tokens"
        )
    eos = special.eos if config.add_eos else None
    pre_labels = [IGNORE_INDEX] * len(prefix)
    rows: list[tuple[list[int], list[int]]] = []
    dropped = truncated = 0
    if config.pack:
        stream_ids: list[int] = []
        stream_labels: list[int] = []
        for ex in examples:
            ids, lab = _example_tokens(tokenizer, ex, eos)
            stream_ids += ids
            stream_labels += lab
        for start in range(0, len(stream_ids), body):
            chunk, chunk_labels = (
                stream_ids[start : start + body],
                stream_labels[start : start + body],
            )
            if any(x != IGNORE_INDEX for x in chunk_labels):
                rows.append((prefix + chunk, pre_labels + chunk_labels))
    else:
        for ex in examples:
            ids, lab = _example_tokens(tokenizer, ex, eos)
            labelled, cut = any(x != IGNORE_INDEX for x in lab), len(ids) > body
            ids, lab = ids[:body], lab[:body]
            if any(x != IGNORE_INDEX for x in lab):
                rows.append((prefix + ids, pre_labels + lab))
                truncated += cut
            elif labelled:
                dropped += 1  # its completion starts past the row
    if not rows:
        if dropped:
            raise KappaTuneError(
                f"no trainable tokens: the completion of every example ({dropped} of"
                f" {len(examples)}) starts past the {config.seq_len}-token rows of --no-pack;"
                " raise --seq-len or shorten the prompts"
            )
        raise KappaTuneError(
            f"no trainable tokens: {len(examples)} examples gave 0 rows of {config.seq_len} tokens"
            " with a label (are all completions empty or cut off by the sequence length?)"
        )
    data = _rows_to_data(rows, config.seq_len, special.pad)
    return replace(data, dropped=dropped, truncated=truncated)


def load_tokenized(
    specs: Sequence[str | os.PathLike[str]],
    tokenizer: PreTrainedTokenizerBase,
    config: PackConfig | None = None,
) -> TokenizedData:
    """``tokenize(tokenizer, load_examples(specs), config)``."""
    return tokenize(tokenizer, load_examples(specs), config)


def pack_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int
) -> TokenizedData:
    """Plain texts packed into rows of ``seq_len`` tokens (all tokens but the prefix labelled)."""
    usable = [Example.text(t) for t in texts if t.strip()]
    if not usable:
        raise KappaTuneError(f"no usable text: {len(texts)} texts, all empty")
    return tokenize(tokenizer, usable, PackConfig(seq_len=seq_len))
