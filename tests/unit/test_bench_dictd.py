"""The dictd readers and the ``gcide-definitions`` control text."""

import re
from pathlib import Path

import pytest

from kappatune.bench import dictd as D
from kappatune.bench import records
from kappatune.errors import KappaTuneError
from tests.unit.test_bench_knowledge import ELEMENTS, GCIDE, write_dictd

ABACK = (
    'Aback \\A*back"\\ ([.a]*b[a^]k"), adv. [Pref. a- + back.]\n'
    '   1. Toward the back or rear; backward. "Therewith aback she\n'
    '      started." --Chaucer.\n      [1913 Webster]\n\n'
    "   2. Behind; in the rear. --Knolles.\n      [1913 Webster]\n\n"
    "   3. (Naut.) Backward against the mast; -- said of the sails.\n      [1913 Webster]\n\n"
    "            Seldom your opinions err. --Prior.\n      [1913 Webster]\n"
)
DEME = (
    "Deme \\Deme\\ (d[=e]m), n. [Gr. dh^mos.]\n"
    "   1. (Gr. Antiq.) A territorial subdivision of Attica. --Jowett\n      (Thucyd.).\n"
    "      [1913 Webster]\n\n"
    "   2. (Biol.) An undifferentiated aggregate of cells or\n      plastids.\n"
    "      [1913 Webster]\n"
)
MANY = "Gird \\Gird\\, v. t.\n" + "".join(
    f"   {i}. To bind around, sense number {i}.\n      [1913 Webster]\n\n" for i in (1, 2, 3, 4)
)


def test_definition_paragraph_keeps_plain_senses_only() -> None:
    # quotation, "--" remark and the quotation block after sense 3 dropped; citation cut
    assert D.definition_paragraph(ABACK) == ("Aback", "Aback: Behind; in the rear.")
    # field labels dropped; a sense ending in a citation with a reference is not plain
    assert D.definition_paragraph(DEME) == (
        "Deme",
        "Deme: An undifferentiated aggregate of cells or plastids.",
    )
    assert D.definition_paragraph(MANY) == (
        "Gird",
        "Gird: To bind around, sense number 1. To bind around, sense number 2."
        " To bind around, sense number 3.",
    )
    assert D.definition_paragraph(MANY, max_senses=1) == (
        "Gird", "Gird: To bind around, sense number 1.",
    )  # fmt: skip
    # an accent written inside a word ([AE]gean) would leave a broken word: the sense is dropped
    assert D.definition_paragraph('Aegean \\AE*ge"an\\, a.\n   Of the [AE]gean sea.\n') is None
    assert D.definition_paragraph("Bee \\Bee\\,\n   p. p. of {Be}; -- used for been.\n") is None
    assert D.definition_paragraph("Ox \\Ox\\, n.\n   Short.\n") is None  # under 12 characters


OTHER = {  # not common words: none of them is a knowledge question's answer
    "Gird": MANY, "Aback": ABACK, "Deme": DEME, "Girding": MANY,  # an inflection, same entry
    "zymome": "zymome \\zy\"mome\\, n.\n   A glutinous substance, insoluble in alcohol.\n",
    "Quince": "Quince \\Quince\\, n.\n   The fruit of a tree of the Rose family.\n",
}  # fmt: skip


@pytest.fixture
def gcide(tmp_path: Path) -> Path:
    write_dictd(tmp_path, "elements", ELEMENTS)
    write_dictd(tmp_path, "gcide", {**GCIDE, **OTHER})
    return tmp_path


def test_paragraphs_skip_question_words_and_spread_over_the_alphabet(gcide: Path) -> None:
    entries = D.read_dictd(gcide / "gcide.index", gcide / "gcide.dict.dz")
    assert set(D.question_words(entries)) == {"apple", "river", "stone", "cloud", "green", "table"}
    every = D.definition_paragraphs(entries, 6)  # Filler: its one sense is 720 words of letters
    assert [p.split(":")[0] for p in every] == [
        "Aback",
        "Deme",
        "Filler",
        "Gird",
        "Quince",
        "zymome",
    ]
    assert [p.split(":")[0] for p in D.definition_paragraphs(entries, 3)] == [
        "Aback", "Filler", "Quince",
    ]  # fmt: skip
    with pytest.raises(KappaTuneError, match="gcide holds 6 plain definitions, fewer than the 7"):
        D.definition_paragraphs(entries, 7)


def test_control_documents_group_lines_and_say_what_is_missing(
    gcide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(D, "PARAGRAPHS_PER_DOCUMENT", 4)
    docs = D.control_documents(gcide, count=6)
    assert [d.count("\n") + 1 for d in docs] == [4, 2]
    assert docs[0].startswith("Aback: Behind; in the rear.\nDeme: ")
    with pytest.raises(KappaTuneError, match=r"dict-gcide is not installed under .*apt-get"):
        D.control_documents(gcide / "nowhere")


@pytest.mark.slow
@pytest.mark.skipif(D.dictd_files(D.DICTD_DIR, "gcide") is None, reason="needs dict-gcide")
def test_builtin_control_text_from_the_real_gcide() -> None:
    split = records.BUILTIN_DATA["gcide-definitions"]()
    assert split.kind == "text" and split.origin == "gcide-definitions"
    assert len(split.records) == 200
    lines = [line for r in split.records for line in r.completion.split("\n")]
    assert len(lines) == D.CONTROL_PARAGRAPHS == 8000
    assert lines[0] == "A-mornings: In the morning; every morning."
    plain = re.compile(r"[A-Za-z][A-Za-z'-]*: [A-Za-z0-9 ,;:.'-]+")
    assert all(plain.fullmatch(line) for line in lines)
    words = [line.split(":")[0].lower() for line in lines]
    assert words == sorted(words) and len(set(words)) == len(words)
    assert not set(words) & set(D.question_words(D.gcide_entries()))
