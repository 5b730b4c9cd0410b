"""Knowledge retention: multiple-choice questions scored by the log-likelihood of each option.

Built-in questions come from real reference data installed offline: Debian's dictd databases
(``dict-elements``: facts about the chemical elements; ``dict-gcide``: the GNU Collaborative
International Dictionary of English), read from ``/usr/share/dictd`` (``.index`` + ``.dict.dz``).
Generation is deterministic for a seed. A user may give their own JSONL file instead, one
question per line: ``{"question": "...", "options": ["...", ...], "answer": "..."}``.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kappatune.bench.dictd import (
    DICTD_DIR,
    dictd_files,
    missing_packages,
    question_words,
    read_dictd,
)
from kappatune.bench.evaluate import OptionRow, option_scores
from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN = "builtin:dictd"


@dataclass(frozen=True)
class Question:
    prompt: str
    options: tuple[str, ...]
    answer: int
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.options) < 2:
            raise KappaTuneError(f"question {self.prompt!r}: needs at least 2 options")
        if len(set(self.options)) != len(self.options):
            raise KappaTuneError(f"question {self.prompt!r}: options repeat")
        if not 0 <= self.answer < len(self.options):
            raise KappaTuneError(f"question {self.prompt!r}: answer index out of range")


# --------------------------------------------------------------------------- question forms


@dataclass(frozen=True)
class Element:
    name: str
    symbol: str
    number: int


def parse_elements(entries: dict[str, str]) -> list[Element]:
    out = []
    for body in entries.values():
        lines = body.strip().splitlines()
        sym = re.search(r"^Symbol:\s*(\S+)", body, re.M)
        num = re.search(r"^Atomic number:\s*(\d+)", body, re.M)
        if lines and sym and num:
            out.append(Element(lines[0].strip().lower(), sym[1], int(num[1])))
    return sorted(out, key=lambda e: e.number)


def _choices(
    rng: random.Random, correct: str, pool: Sequence[str], k: int
) -> tuple[tuple[str, ...], int]:
    others = sorted({p for p in pool if p != correct})
    if len(others) < k - 1:
        raise KappaTuneError(f"too few distinct answers ({len(others) + 1}) for {k} options")
    picked = [*rng.sample(others, k - 1), correct]
    rng.shuffle(picked)
    return tuple(picked), picked.index(correct)


Accept = Callable[[str], bool]


def _everything(answer: str) -> bool:
    return True


def element_questions(
    elements: Sequence[Element], rng: random.Random, k: int, accept: Accept = _everything
) -> list[Question]:
    """Name -> symbol, with distractors drawn from the other elements' symbols.

    (Symbol -> name was tried too: Gemma 3 270M scored 47 % on it against 83 % on this form.)
    """
    elements = [e for e in elements if accept(" " + e.symbol)]
    symbols = [" " + e.symbol for e in elements]
    out = []
    for e in elements:
        opts, ans = _choices(rng, " " + e.symbol, symbols, k)
        out.append(Question(f"The chemical symbol of {e.name} is", opts, ans, "elements"))
    return out


def gcide_questions(
    entries: dict[str, str], rng: random.Random, k: int, n: int, accept: Accept = _everything
) -> list[Question]:
    """Definition -> word, distractors among the other chosen words."""
    defs = question_words(entries)
    words = sorted(w for w in defs if accept(" " + w))
    chosen = sorted(rng.sample(words, min(n, len(words))))
    pool = [" " + w for w in words]
    out = []
    for w in chosen:
        opts, ans = _choices(rng, " " + w, pool, k)
        out.append(Question(f"Definition: {defs[w]}.\nWord:", opts, ans, "gcide"))
    return out


def builtin_questions(
    n: int = 400, seed: int = 0, k: int = 4, root: Path = DICTD_DIR, accept: Accept = _everything
) -> tuple[Question, ...]:
    """Element questions first (all of them), then dictionary questions up to ``n``.

    ``accept`` filters the answers (every option is another question's answer): the bench keeps
    those that are one token for the model's tokenizer, so each question costs one forward row
    and one position of logits (4x cheaper than scoring multi-token options one row each).
    """
    missing = missing_packages(root)
    if missing:
        raise KappaTuneError(
            f"knowledge control needs {', '.join(missing)} under {root}"
            f" (apt-get install -y {' '.join(missing)}; `make setup` does it)"
        )
    rng = random.Random(seed)
    el = dictd_files(root, "elements")
    gc = dictd_files(root, "gcide")
    assert el is not None and gc is not None
    out = element_questions(parse_elements(read_dictd(*el)), rng, k, accept)[:n]
    if len(out) < n:
        out += gcide_questions(read_dictd(*gc), rng, k, n - len(out), accept)
    if len(out) < n:
        raise KappaTuneError(f"only {len(out)} knowledge questions could be built, {n} asked")
    return tuple(out)


def read_questions(path: Path) -> tuple[Question, ...]:
    """A JSONL file of {"question", "options", "answer"} (answer: one of the options)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KappaTuneError(f"cannot read multiple-choice file {path}: {exc}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec: Any = json.loads(line)
        except ValueError:
            raise KappaTuneError(f"{path}:{i}: not a JSON object") from None
        if not isinstance(rec, dict) or set(rec) != {"question", "options", "answer"}:
            raise KappaTuneError(f"{path}:{i}: needs exactly question, options, answer")
        opts = rec["options"]
        if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise KappaTuneError(f"{path}:{i}: options must be a list of strings")
        if rec["answer"] not in opts:
            raise KappaTuneError(f"{path}:{i}: answer {rec['answer']!r} is not among the options")
        try:
            out.append(Question(str(rec["question"]), tuple(opts), opts.index(rec["answer"])))
        except KappaTuneError as exc:
            raise KappaTuneError(f"{path}:{i}: {exc}") from None
    if not out:
        raise KappaTuneError(f"{path}: no questions")
    return tuple(out)


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class TokenizedQuestion:
    prompt: tuple[int, ...]  # BOS first
    options: tuple[tuple[int, ...], ...]
    answer: int


def tokenize_questions(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[Question], prefix: Sequence[int]
) -> tuple[TokenizedQuestion, ...]:
    """Prompt (after ``prefix``) and each option as it follows the prompt; every option must
    tokenize to at least one known token and the options of a question must differ in ids."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for q in questions:
        prompt = tuple(prefix) + tuple(tokenizer.encode(q.prompt, add_special_tokens=False))
        opts = []
        for o in q.options:
            ids = tuple(int(t) for t in tokenizer.encode(o, add_special_tokens=False))
            if not ids or (unk is not None and unk in ids):
                raise KappaTuneError(
                    f"multiple-choice option {o!r} of {q.prompt!r} does not tokenize"
                    + (" (unknown token)" if ids else " (no tokens)")
                )
            opts.append(ids)
        if len(set(opts)) != len(opts):
            raise KappaTuneError(f"options of {q.prompt!r} tokenize to the same ids")
        out.append(TokenizedQuestion(prompt, tuple(opts), q.answer))
    return tuple(out)


def _mc_rows(items: Sequence[TokenizedQuestion]) -> list[OptionRow]:
    """A prompt row per question whose options are all one token, else a row per option."""
    rows = []
    for i, q in enumerate(items):
        if all(len(o) == 1 for o in q.options):
            rows.append(OptionRow(q.prompt, i, -1))
        else:
            rows.extend(OptionRow(q.prompt + o, i, j) for j, o in enumerate(q.options))
    # rows that need the same positions share a batch: logits are kept for the union of them
    return sorted(rows, key=lambda r: (len(items[r.item].prompt), len(r.ids), r.item, r.option))


@dataclass(frozen=True)
class McResult:
    correct: tuple[bool, ...]  # per question, in input order

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else math.nan


def mc_accuracy(
    model: torch.nn.Module,
    items: Sequence[TokenizedQuestion],
    *,
    pad_id: int,
    batch_size: int = 16,
) -> McResult:
    """Argmax over options of the summed option-token log-likelihood (ties: lowest index)."""
    if not items:
        raise KappaTuneError("no multiple-choice questions to score")
    table = option_scores(
        model, _mc_rows(items), [q.prompt for q in items], [q.options for q in items],
        pad_id=pad_id, batch_size=batch_size,
    )  # fmt: skip
    correct = []
    for q, s in zip(items, table, strict=True):
        best = max(range(len(s)), key=lambda j: (s[j], -j))
        correct.append(best == q.answer)
    return McResult(tuple(correct))


def single_token(tokenizer: PreTrainedTokenizerBase) -> Accept:
    """Accepts an answer that the tokenizer writes as one known token."""
    unk = getattr(tokenizer, "unk_token_id", None)

    def accept(answer: str) -> bool:
        ids = tokenizer.encode(answer, add_special_tokens=False)
        return len(ids) == 1 and ids[0] != unk

    return accept
