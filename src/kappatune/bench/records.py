"""Raw data of the benchmark: records read from files, JSONL, Hugging Face datasets or built-ins.

A :class:`Split` is a tuple of :class:`Record` of one kind:

* ``text``: documents (``prompt`` empty); packed into fixed-length chunks, every token a target;
* ``pairs``: a prompt and a completion; only the completion's tokens are targets;
* ``labels``: a rendered prompt and the index of the correct option among fixed options.

Built-in data (offline, real text that no one here wrote):

* ``python-stdlib-train`` / ``python-stdlib-heldout``: source files of the running interpreter's
  standard library, split by module (two fixed, disjoint module lists);
* ``gcide-definitions``: plain English definitions of 8000 headwords of Debian's ``dict-gcide``
  (Webster 1913 and supplements), spread over the alphabet, none about a word that the built-in
  knowledge questions ask (:mod:`kappatune.bench.dictd`): the built-in scenarios' control text;
* ``python-docs-prose``: English prose paragraphs of ``pydoc_data.topics`` (the Python language
  reference shipped with the interpreter), keeping only paragraphs that are least about code
  (small, about 12k tokens, and about Python: a control for it measures transfer from code);
* ``digits-train`` / ``digits-heldout``: scikit-learn's bundled 8x8 handwritten digits written as
  eight lines of eight pixel digits (intensity 0-16 halved to 0-8), label among "0".."9".
"""

from __future__ import annotations

import json
import re
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kappatune.errors import KappaTuneError

KINDS = ("text", "pairs", "labels")

# Disjoint, fixed module lists present in CPython 3.10-3.14 (none removed by PEP 594).
STDLIB_TRAIN = (
    "argparse", "bisect", "calendar", "colorsys", "contextlib", "copy", "csv", "dataclasses",
    "difflib", "fnmatch", "fractions", "functools", "getopt", "glob", "graphlib", "heapq",
    "ipaddress", "keyword", "linecache", "numbers", "operator", "pprint", "queue", "quopri",
    "sched", "shlex", "statistics", "string", "textwrap",
)  # fmt: skip
STDLIB_HELDOUT = ("base64", "gettext", "hmac", "random", "secrets", "stat", "timeit", "uuid")
DIGIT_OPTIONS = tuple(str(d) for d in range(10))
DIGITS_TEMPLATE = "Handwritten digit, 8x8 pixels, ink 0-8:\n{text}\nDigit: "


@dataclass(frozen=True)
class Record:
    prompt: str
    completion: str
    label: int | None = None


@dataclass(frozen=True)
class Split:
    """Records of one kind, with a description of where they came from."""

    kind: str
    records: tuple[Record, ...]
    origin: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise KappaTuneError(f"unknown split kind {self.kind!r} (known: {', '.join(KINDS)})")
        if not self.records:
            raise KappaTuneError(f"{self.origin}: no records (empty split)")
        for i, r in enumerate(self.records):
            if not r.completion.strip():
                raise KappaTuneError(f"{self.origin}: record {i + 1} is empty")
            if self.kind == "text" and r.prompt:
                raise KappaTuneError(f"{self.origin}: record {i + 1} of a text split has a prompt")
            if (self.kind == "labels") != (r.label is not None):
                raise KappaTuneError(
                    f"{self.origin}: record {i + 1} does not match kind {self.kind}"
                )


# --------------------------------------------------------------------------- built-ins


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_split(modules: Sequence[str], origin: str) -> Split:
    root = stdlib_dir()
    records = []
    for mod in modules:
        path = root / f"{mod}.py"
        if path.is_file():
            records.append(Record("", path.read_text(encoding="utf-8")))
    if not records:
        raise KappaTuneError(f"{origin}: none of {len(modules)} standard-library modules in {root}")
    return Split("text", tuple(records), origin)


_QUOTED = re.compile(r'"[^"]*"')


def is_prose(paragraph: str) -> bool:
    """A paragraph of plain English: not a code block, heading, list item or grammar rule."""
    if not paragraph or paragraph[0].isspace() or "::=" in paragraph:
        return False
    if paragraph.startswith(("*", "-", ">>>", "+", "=")):
        return False
    flat = " ".join(paragraph.split())
    if len(flat.split()) < 25:
        return False
    quoted = sum(len(m) for m in _QUOTED.findall(flat))
    return quoted <= 0.05 * len(flat)


def docs_prose() -> Split:
    """Prose paragraphs of ``pydoc_data.topics``, one document per topic, topics sorted by name."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise KappaTuneError("python-docs-prose needs the standard module pydoc_data") from None
    seen: set[str] = set()
    records = []
    for name in sorted(topics):
        keep = []
        for para in re.split(r"\n\s*\n", topics[name]):
            flat = " ".join(para.split())
            if is_prose(para) and flat not in seen:
                seen.add(flat)
                keep.append(flat)
        if keep:
            records.append(Record("", "\n\n".join(keep)))
    return Split("text", tuple(records), "python-docs-prose")


def gcide_definitions() -> Split:
    """The ``gcide-definitions`` control text (documents of 40 definitions, one per line)."""
    from kappatune.bench import dictd

    docs = dictd.control_documents()
    return Split("text", tuple(Record("", d) for d in docs), "gcide-definitions")


def digit_text(pixels: Sequence[float]) -> str:
    """64 intensities 0-16 -> eight lines of eight digits 0-8 (one token each in most vocabularies)."""
    if len(pixels) != 64:
        raise KappaTuneError(f"a digit image has 64 pixels, got {len(pixels)}")
    cells = [str(min(8, max(0, int(v) // 2))) for v in pixels]
    return "\n".join("".join(cells[r * 8 : r * 8 + 8]) for r in range(8))


def digits_split(heldout: bool) -> Split:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise KappaTuneError(
            "the digits data needs scikit-learn: pip install scikit-learn"
        ) from None
    data = load_digits()
    records = []
    for i, (row, target) in enumerate(zip(data.data, data.target, strict=True)):
        if (i % 5 == 0) == heldout:  # every fifth image held out: 360 of 1797
            prompt = DIGITS_TEMPLATE.format(text=digit_text(row))
            records.append(Record(prompt, DIGIT_OPTIONS[int(target)], int(target)))
    return Split("labels", tuple(records), "digits-heldout" if heldout else "digits-train")


BUILTIN_DATA: dict[str, Callable[[], Split]] = {
    "python-stdlib-train": lambda: stdlib_split(STDLIB_TRAIN, "python-stdlib-train"),
    "python-stdlib-heldout": lambda: stdlib_split(STDLIB_HELDOUT, "python-stdlib-heldout"),
    "gcide-definitions": gcide_definitions,
    "python-docs-prose": docs_prose,
    "digits-train": lambda: digits_split(heldout=False),
    "digits-heldout": lambda: digits_split(heldout=True),
}


# --------------------------------------------------------------------------- user data


@dataclass(frozen=True)
class Fields:
    """Field names of JSONL / dataset rows, and how label prompts are rendered."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    label: str = "label"
    template: str = "{text}\nLabel: "

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise KappaTuneError(f"label template {self.template!r} must contain {{text}}")


def row_record(
    row: Mapping[str, Any], options: Sequence[str], fields: Fields, where: str
) -> tuple[str, Record]:
    """(kind, record) of one JSON object / dataset row."""
    if fields.label in row and fields.text in row:
        raw = row[fields.label]
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise KappaTuneError(f"{where}: label {raw!r} is neither an option nor an index")
        if isinstance(raw, int):
            if not 0 <= raw < len(options):
                raise KappaTuneError(
                    f"{where}: label index {raw} out of range for {len(options)} options"
                )
            index = raw
        elif raw in options:
            index = list(options).index(raw)
        else:
            raise KappaTuneError(
                f"{where}: label {raw!r} is not one of the options {list(options)}"
            )
        prompt = fields.template.replace("{text}", str(row[fields.text]))
        return "labels", Record(prompt, options[index], index)
    if fields.prompt in row and fields.completion in row:
        return "pairs", Record(str(row[fields.prompt]), str(row[fields.completion]))
    if fields.text in row:
        return "text", Record("", str(row[fields.text]))
    keys = ", ".join(sorted(map(str, row)))
    raise KappaTuneError(
        f"{where}: expected a {fields.text!r} field (optionally with {fields.label!r}) or"
        f" {fields.prompt!r} and {fields.completion!r}; found: {keys}"
    )


def rows_split(
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    options: Sequence[str],
    fields: Fields,
    origin: str,
) -> Split:
    kinds: set[str] = set()
    records = []
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise KappaTuneError(f"{where}: expected a JSON object, got {type(row).__name__}")
        kind, record = row_record(row, options, fields, where)
        if kinds and kind not in kinds:
            raise KappaTuneError(f"{where}: a {kind} record in a split of {kinds.pop()} records")
        kinds.add(kind)
        records.append(record)
    if not records:
        raise KappaTuneError(f"{origin}: no records (empty split)")
    return Split(kinds.pop(), tuple(records), origin)


def read_jsonl(path: Path, options: Sequence[str], fields: Fields) -> Split:
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise KappaTuneError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
    return rows_split(rows, options, fields, str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KappaTuneError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KappaTuneError(f"cannot read {path}: {exc}") from None


def read_path(path: Path, options: Sequence[str], fields: Fields) -> Split:
    """A .jsonl file, a text file (one document), or a directory of .txt files (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise KappaTuneError(f"{path}: no .txt files in this directory (empty split)")
        docs = tuple(Record("", t) for t in map(_read_text, files) if t.strip())
        if not docs:
            raise KappaTuneError(f"{path}: all {len(files)} .txt files are empty (empty split)")
        return Split("text", docs, str(path))
    if not path.exists():
        raise KappaTuneError(f"no such file: {path}")
    if path.suffix.lower() == ".jsonl":
        return read_jsonl(path, options, fields)
    text = _read_text(path)
    if not text.strip():
        raise KappaTuneError(f"{path}: the file is empty (empty split)")
    return Split("text", (Record("", text),), str(path))


def read_hf(
    name: str, config: str | None, split: str, options: Sequence[str], fields: Fields
) -> Split:
    origin = f"hf:{name}{'/' + config if config else ''}:{split}"
    try:
        import datasets
    except ImportError:
        raise KappaTuneError(f"{origin} needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, unknown split: all user-fixable
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KappaTuneError(f"cannot load {origin} (offline or unknown?): {first}") from None
    rows = [(f"{origin} row {i + 1}", row) for i, row in enumerate(ds)]
    return rows_split(rows, options, fields, origin)
