"""Debian's dictd databases, read offline (no torch): the bench's knowledge questions and its
built-in control text come from them.

A database is a ``NAME.index`` (headword, base-64 offset and length per line) and a
``NAME.dict.dz`` (dictzip: gzip with a seek table). Under ``/usr/share/dictd``:

* ``dict-elements``: facts about the chemical elements;
* ``dict-gcide``: the GNU Collaborative International Dictionary of English (Webster 1913 and
  its supplements), 177k entries.

``gcide-definitions`` (:func:`control_documents`) is a control text of plain English: the
definitions of 8000 gcide headwords spread evenly over the alphabet, markup, etymologies,
quotations and citations removed, and no headword that a built-in knowledge question could ask
about (:func:`question_words`), so the control text and the knowledge questions stay disjoint.
"""

from __future__ import annotations

import collections
import functools
import gzip
import re
from pathlib import Path

from kappatune.errors import KappaTuneError

DICTD_DIR = Path("/usr/share/dictd")
DICT_PACKAGES = ("dict-elements", "dict-gcide")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_number(text: str) -> int:
    """dictd's base-64 numbers (offsets and lengths in .index files)."""
    value = 0
    for ch in text:
        value = value * 64 + _B64.index(ch)
    return value


def read_dictd(index: Path, data: Path) -> dict[str, str]:
    """Headword -> definition text of a dictd database (first entry of a repeated headword).
    Read once per process and file version (gcide is 137 MB of text); do not modify the result."""
    try:
        stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (index, data))
    except OSError as exc:
        raise KappaTuneError(f"cannot read dictd database {index.with_suffix('')}: {exc}") from None
    return _read_dictd(index, data, stamp)


@functools.lru_cache(maxsize=4)
def _read_dictd(index: Path, data: Path, stamp: object) -> dict[str, str]:
    try:
        if data.suffix == ".dz":  # dictzip is gzip with a seek table
            with gzip.open(data) as fh:
                raw = fh.read()
        else:
            raw = data.read_bytes()
        lines = index.read_text(encoding="utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise KappaTuneError(f"cannot read dictd database {index.with_suffix('')}: {exc}") from None
    out: dict[str, str] = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database") or parts[0] in out:
            continue
        off, length = b64_number(parts[1]), b64_number(parts[2])
        out[parts[0]] = raw[off : off + length].decode("utf-8", "replace")
    return out


def dictd_files(root: Path, name: str) -> tuple[Path, Path] | None:
    index, data = root / f"{name}.index", root / f"{name}.dict.dz"
    return (index, data) if index.is_file() and data.is_file() else None


def missing_packages(root: Path = DICTD_DIR) -> list[str]:
    return [p for p in DICT_PACKAGES if dictd_files(root, p.removeprefix("dict-")) is None]


def _gcide_files(root: Path | None) -> tuple[Path, Path]:
    """gcide's two files, or one clear error naming the package to install."""
    root = DICTD_DIR if root is None else root
    files = dictd_files(root, "gcide")
    if files is None:
        raise KappaTuneError(
            f"dict-gcide is not installed under {root}"
            " (apt-get install -y dict-gcide; `make setup` does it)"
        )
    return files


def gcide_entries(root: Path | None = None) -> dict[str, str]:
    """gcide's entries, or one clear error naming the package to install."""
    return read_dictd(*_gcide_files(root))


# --------------------------------------------------------------------------- question words

_HEAD = re.compile(r"^([A-Za-z]+) \\[^\\]*\\, (n|v\. t|v\. i|a|adv)\.")


def gcide_definition(body: str) -> tuple[str, str] | None:
    """(headword, first sense) of a plain one-word gcide entry, or None: the knowledge
    questions' form (definition -> word)."""
    m = _HEAD.match(body.strip())
    if not m:
        return None
    word = m[1]
    text = " ".join(body.strip()[m.end() :].splitlines())
    text = text.split("[1913 Webster]")[0]
    text = re.sub(r"\[[^\]]*\]", " ", text)  # etymology
    text = re.sub(r"\([A-Z][a-z]*\.?\)", " ", text)  # (Anat.) field labels
    text = re.sub(r"^\s*\d+\.\s*", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    sense = re.split(r"[;:.]", text)[0].strip()
    if not 20 <= len(sense) <= 100 or word.lower() in sense.lower() or "--" in sense:
        return None
    if not re.fullmatch(r"[A-Za-z ,'-]+", sense):
        return None
    return word.lower(), sense[0].upper() + sense[1:]


_LOWER_ONLY = bytes(b if 97 <= b <= 122 else 32 for b in range(256))  # a-z kept, all else a space


def common_words(entries: dict[str, str], minimum: int = 20) -> set[str]:
    """Lower-case words (runs of a-z) that occur at least ``minimum`` times in the dictionary's
    own definitions: a frequency list from the same data, so questions use words a reader (or
    model) knows."""
    raw = "\n".join(entries.values()).encode("utf-8")
    counts = collections.Counter(raw.translate(_LOWER_ONLY).split())
    return {w.decode("ascii") for w, c in counts.items() if c >= minimum}


def question_words(entries: dict[str, str]) -> dict[str, str]:
    """Word -> first sense of every gcide headword a built-in knowledge question may ask about:
    a common word of 4-10 letters with a plain definition (sorted by word)."""
    common = common_words(entries)
    defs: dict[str, str] = {}
    for body in entries.values():
        got = gcide_definition(body)
        if got and got[0] in common and 4 <= len(got[0]) <= 10 and got[0] not in defs:
            defs[got[0]] = got[1]
    return dict(sorted(defs.items()))


# --------------------------------------------------------------------------- control text

# headword \pronunciation\, optional (respelling), part of speech
_ENTRY = re.compile(
    r"([A-Za-z][A-Za-z'-]*) \\[^\\\n]*\\,?\s*(?:\([^)\n]*\),?\s*)?(?:n|a|adv|v\. t|v\. i)\.\s*"
)
_SOURCE_LINE = re.compile(r"^\s*\[[^\]\n]*\]\s*$", re.M)  # [1913 Webster], [PJC] ... alone
_PLAIN = re.compile(r"[A-Za-z0-9 ,;:.'-]+")
_SENSE_NUMBER = re.compile(r"\d+\.\s*")
_FIELD_LABELS = re.compile(r"^(?:\([A-Z][^)]*\)\s*)+")  # (Bot.) (Gr. Antiq.)
_CITATION = re.compile(r"\s*--\s*[A-Z][A-Za-z. ]*$")  # a trailing --Milton.
_INLINE_MARKUP = re.compile(r"\w\[|\]\w")  # [ae], [=a]: accents written inside a word


def definition_paragraph(body: str, max_senses: int = 3) -> tuple[str, str] | None:
    """(headword, "Headword: sense. sense.") of a gcide entry, its first ``max_senses`` plain
    senses (no etymology, field labels, quotations, citations or markup), or None."""
    m = _ENTRY.match(body)
    if not m:
        return None
    senses: list[str] = []
    for i, chunk in enumerate(_SOURCE_LINE.split(body[m.end() :])):
        if _INLINE_MARKUP.search(chunk):
            continue
        text = " ".join(re.sub(r"\[[^\]]*\]", " ", chunk).split())
        number = _SENSE_NUMBER.match(text)
        if not text or (i > 0 and not number):  # a quotation or note after a sense
            continue
        text = text[number.end() :] if number else text
        text = _CITATION.sub("", _FIELD_LABELS.sub("", text))
        if "--" in text or len(text) < 12 or not _PLAIN.fullmatch(text):
            continue
        senses.append(text if text.endswith(".") else text + ".")
        if len(senses) == max_senses:
            break
    if not senses:
        return None
    return m[1], f"{m[1]}: {' '.join(senses)}"


def definition_paragraphs(entries: dict[str, str], count: int) -> list[str]:
    """``count`` paragraphs, one per headword, spread evenly over the headwords sorted
    case-insensitively (ties by spelling), none about a knowledge question's word. An index
    key names the entry it points to (inflected forms point to their word's entry), so entries
    are keyed by their own headword; of two entries of one headword the first key's is kept."""
    asked = set(question_words(entries))
    by_word: dict[str, tuple[str, str]] = {}
    for key in sorted(entries, key=lambda k: (k.lower(), k)):
        got = definition_paragraph(entries[key])
        if got and got[0].lower() not in asked and got[0].lower() not in by_word:
            by_word[got[0].lower()] = got
    paragraphs = [text for _, (_, text) in sorted(by_word.items())]  # keys are unique
    if len(paragraphs) < count:
        raise KappaTuneError(
            f"gcide holds {len(paragraphs)} plain definitions, fewer than the {count} asked for"
        )
    return [paragraphs[i * len(paragraphs) // count] for i in range(count)]


CONTROL_PARAGRAPHS = 8000  # about 170k Gemma tokens: 2600 rows of 64, 660 of 256
PARAGRAPHS_PER_DOCUMENT = 40


def control_documents(root: Path | None = None, count: int = CONTROL_PARAGRAPHS) -> tuple[str, ...]:
    """The ``gcide-definitions`` control text: :func:`definition_paragraphs` in documents of
    :data:`PARAGRAPHS_PER_DOCUMENT` lines (computed once per process and gcide version)."""
    files = _gcide_files(root)
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    return _control_documents(files, stamp, count)


@functools.lru_cache(maxsize=2)
def _control_documents(files: tuple[Path, Path], stamp: object, count: int) -> tuple[str, ...]:
    lines = definition_paragraphs(read_dictd(*files), count)
    step = PARAGRAPHS_PER_DOCUMENT
    return tuple("\n".join(lines[i : i + step]) for i in range(0, len(lines), step))
