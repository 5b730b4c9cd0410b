import gzip
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kappatune.bench import dictd as D
from kappatune.bench import knowledge as K
from kappatune.bench.evaluate import option_row_scores
from kappatune.errors import KappaTuneError

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(n: int) -> str:
    out = ""
    while True:
        out = B64[n % 64] + out
        n //= 64
        if n == 0:
            return out


def write_dictd(root: Path, name: str, entries: dict[str, str]) -> None:
    """A dictd database (.index + gzip'd .dict.dz) written the way dictfmt lays it out."""
    data, index = b"", []
    for word, body in {"00databaseshort": "test data\n", **entries}.items():
        raw = body.encode()
        index.append(f"{word}\t{_b64(len(data))}\t{_b64(len(raw))}")
        data += raw
    (root / f"{name}.index").write_text("\n".join(index) + "\n")
    with gzip.open(root / f"{name}.dict.dz", "wb") as fh:
        fh.write(data)


ELEMENTS = {
    f"el{i}": f"el{i}\nSymbol: S{i}\nAtomic number: {i}\nAtomic weight: {2 * i}.0\nA metal.\n"
    for i in range(1, 7)
}
WORDS = ["apple", "river", "stone", "cloud", "green", "table"]
GCIDE = {
    w.capitalize(): f"{w.capitalize()} \\{w}\\, n. [OE. {w}.]\n   A plain thing called number {i}"
    f" here; more text.\n   [1913 Webster]\n"
    for i, w in zip(("one", "two", "three", "four", "five", "six"), WORDS, strict=True)
}
# every word must be "common": repeat them in the definitions of other entries
GCIDE["Filler"] = "Filler \\fill\\, n.\n   " + " ".join(WORDS * 20) + "\n   [1913 Webster]\n"


@pytest.fixture
def dictd(tmp_path: Path) -> Path:
    write_dictd(tmp_path, "elements", ELEMENTS)
    write_dictd(tmp_path, "gcide", GCIDE)
    return tmp_path


def test_dictd_numbers_and_files(dictd: Path) -> None:
    assert D.b64_number("Cc6") == 2 * 4096 + 28 * 64 + 58
    assert D.b64_number(_b64(123456)) == 123456
    entries = D.read_dictd(dictd / "elements.index", dictd / "elements.dict.dz")
    assert list(entries) == [f"el{i}" for i in range(1, 7)]  # the database header is skipped
    assert K.parse_elements(entries)[2] == K.Element("el3", "S3", 3)
    assert D.missing_packages(dictd) == []
    assert D.missing_packages(dictd / "nowhere") == ["dict-elements", "dict-gcide"]


def test_gcide_definitions_drop_etymology() -> None:
    body = GCIDE["River"]
    assert D.gcide_definition(body) == ("river", "A plain thing called number two here")
    assert D.gcide_definition("Two words \\x\\, n.\n  A thing of note here.\n") is None


def test_builtin_questions_are_deterministic(dictd: Path) -> None:
    qs = K.builtin_questions(n=9, seed=3, root=dictd)
    assert qs == K.builtin_questions(n=9, seed=3, root=dictd)
    assert [q.source for q in qs] == ["elements"] * 6 + ["gcide"] * 3
    first = qs[0]
    assert first.prompt == "The chemical symbol of el1 is"
    assert first.options[first.answer] == " S1" and len(first.options) == 4
    word_q = qs[6]
    assert word_q.prompt.startswith("Definition: A plain thing called number")
    assert word_q.prompt.endswith(".\nWord:")
    assert qs != K.builtin_questions(n=9, seed=4, root=dictd)  # another seed, other draws
    with pytest.raises(KappaTuneError, match="only 12 knowledge questions"):
        K.builtin_questions(n=50, root=dictd)
    with pytest.raises(KappaTuneError, match="apt-get install -y dict-elements dict-gcide"):
        K.builtin_questions(n=5, root=dictd / "nowhere")


def test_choices_keep_the_answer() -> None:
    opts, ans = K._choices(random.Random(0), "b", ["a", "b", "c", "d", "e"], 3)
    assert len(opts) == 3 and opts[ans] == "b" and len(set(opts)) == 3


def test_user_question_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "mc.jsonl"
    good = {"question": "2 + 2 =", "options": [" 4", " 5"], "answer": " 4"}
    path.write_text(json.dumps(good) + "\n\n")
    assert K.read_questions(path) == (K.Question("2 + 2 =", (" 4", " 5"), 0),)
    for rec, message in (
        ({**good, "answer": " 6"}, "answer ' 6' is not among the options"),
        ({"question": "x"}, "needs exactly question, options, answer"),
        ({**good, "options": [" 4", " 4"]}, "options repeat"),
        ({**good, "options": " 4"}, "options must be a list of strings"),
    ):
        path.write_text(json.dumps(rec) + "\n")
        with pytest.raises(KappaTuneError, match=message):
            K.read_questions(path)
    path.write_text("{not json\n")
    with pytest.raises(KappaTuneError, match=r"mc\.jsonl:1: not a JSON object"):
        K.read_questions(path)


def test_options_must_tokenize() -> None:
    from tests.unit._tiny_models import char_tokenizer

    tok = char_tokenizer()
    items = K.tokenize_questions(tok, [K.Question("ab", ("c", "de"), 1)], (2,))
    assert items[0].prompt == (2, *tok.encode("ab", add_special_tokens=False))
    assert [len(o) for o in items[0].options] == [1, 2]
    with pytest.raises(KappaTuneError, match="option 'é' of 'ab' does not tokenize"):
        K.tokenize_questions(tok, [K.Question("ab", ("é", "d"), 0)], (2,))


class NextIsPlusOne(torch.nn.Module):
    """Logits: 4.0 for token (current + 1) mod V, 0 elsewhere; honours logits_to_keep."""

    V = 16

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Any = None, use_cache: bool = False,
        logits_to_keep: Any = None,
    ) -> Any:  # fmt: skip
        logits = 4.0 * torch.nn.functional.one_hot((input_ids + 1) % self.V, self.V).float()
        if logits_to_keep is not None:
            logits = logits[:, logits_to_keep]
        return SimpleNamespace(logits=logits)


def test_mc_scoring_on_a_known_answer() -> None:
    model = NextIsPlusOne()
    items = (
        K.TokenizedQuestion((1, 2, 3), ((5,), (4,), (6,)), 1),  # single-token options
        K.TokenizedQuestion((1, 7), ((8, 9), (8, 10)), 0),  # multi-token options
        # (8, 10) sums a hit and a miss, below (9,)'s single miss: marked answer 0 is missed
        K.TokenizedQuestion((1, 7), ((8, 10), (9,)), 0),
    )
    res = K.mc_accuracy(model, items, pad_id=0, batch_size=2)
    assert res.correct == (True, True, False)
    assert res.accuracy == pytest.approx(2 / 3)
    # the log-likelihood the scorer sums: log softmax of a 4.0 logit among 16
    hit = 4.0 - math.log(math.exp(4.0) + 15)
    miss = -math.log(math.exp(4.0) + 15)
    rows = K._mc_rows(items)
    scores = option_row_scores(
        model, rows, [q.prompt for q in items], [q.options for q in items], 0
    )
    by = {(r.item, r.option): s for r, s in zip(rows, scores, strict=True)}
    assert by[(0, -1)] == pytest.approx([miss, hit, miss], abs=1e-5)
    assert by[(1, 0)] == pytest.approx([2 * hit], abs=1e-5)
    assert by[(1, 1)] == pytest.approx([hit + miss], abs=1e-5)


def test_answers_can_be_limited_to_single_tokens(dictd: Path) -> None:
    from tests.unit._tiny_models import char_tokenizer

    accept = K.single_token(char_tokenizer())
    assert accept("a") and not accept(" S1") and not accept("é")
    short = K.builtin_questions(n=4, root=dictd, accept=lambda a: a in {" S1", " S2", " S3", " S4"})
    assert [q.options[q.answer] for q in short] == [" S1", " S2", " S3", " S4"]
    assert all(set(q.options) == {" S1", " S2", " S3", " S4"} for q in short)
