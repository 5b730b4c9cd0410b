import json
from pathlib import Path

import pytest

from kappatune.bench import records
from kappatune.bench.records import Fields, Record, Split
from kappatune.bench.scenarios import (
    BUILTIN_SCENARIOS,
    DataSpec,
    Scenario,
    builtin_scenario,
    load_config,
)
from kappatune.errors import KappaTuneError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_code_scenario_splits_by_module_and_controls_on_dictionary_english() -> None:
    assert not set(records.STDLIB_TRAIN) & set(records.STDLIB_HELDOUT)
    code = builtin_scenario("code")
    assert code.control.source == builtin_scenario("digits").control.source
    assert code.control.source == "builtin:gcide-definitions"  # not about Python (transfer)
    train = records.BUILTIN_DATA["python-stdlib-train"]()
    heldout = records.BUILTIN_DATA["python-stdlib-heldout"]()
    assert train.kind == heldout.kind == "text"
    root = records.stdlib_dir()
    first = (root / f"{records.STDLIB_TRAIN[0]}.py").read_text(encoding="utf-8")
    assert train.records[0].completion == first
    assert not {r.completion for r in heldout.records} & {r.completion for r in train.records}


def test_python_docs_prose_keeps_prose_paragraphs() -> None:
    prose = records.BUILTIN_DATA["python-docs-prose"]()
    assert prose.kind == "text" and prose.origin == "python-docs-prose"
    for doc in prose.records:
        for para in doc.completion.split("\n\n"):
            assert records.is_prose(para)
            assert "::=" not in para and not para.startswith(">>>")


def test_is_prose_rejects_code_headings_lists_and_short_lines() -> None:
    words = " ".join(["word"] * 30)
    assert records.is_prose(words)
    assert not records.is_prose("    " + words)  # indented code block
    assert not records.is_prose("* " + words)  # list item
    assert not records.is_prose("x ::= " + words)  # grammar rule
    assert not records.is_prose("too short to count as prose")
    quoted = " ".join(['"code_here()"'] * 10 + ["word"] * 20)
    assert not records.is_prose(quoted)


def test_digits_scenario_renders_images_and_labels() -> None:
    assert records.digit_text([16] * 8 + [0] * 56) == "\n".join(["88888888"] + ["00000000"] * 7)
    assert records.digit_text([3, 4, 5] + [0] * 61).startswith("12200000")
    data = builtin_scenario("digits").load()
    assert len(data.train.records) == 1437 and len(data.heldout.records) == 360
    r = data.heldout.records[0]  # image 0 of load_digits is a 0
    assert r.label == 0 and r.completion == "0"
    assert r.prompt.endswith("\nDigit: ") and r.prompt.count("\n") == 9
    assert {rec.label for rec in data.train.records} == set(range(10))
    with pytest.raises(KappaTuneError, match="64 pixels, got 3"):
        records.digit_text([1, 2, 3])


def test_jsonl_kinds_and_label_mapping(tmp_path: Path) -> None:
    opts = ("neg", "pos")
    f = _write(
        tmp_path / "a.jsonl", '{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": 0}\n'
    )
    split = records.read_path(f, opts, Fields(template="R: {text}\nS: "))
    assert split.kind == "labels"
    assert split.records == (Record("R: good\nS: ", "pos", 1), Record("R: bad\nS: ", "neg", 0))
    f2 = _write(tmp_path / "b.jsonl", '{"prompt": "Q", "completion": "A"}\n')
    assert records.read_path(f2, (), Fields()).records == (Record("Q", "A"),)
    f3 = _write(tmp_path / "c.jsonl", '{"text": "doc one"}\n{"text": "doc two"}\n')
    assert records.read_path(f3, (), Fields()).kind == "text"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "x", "label": "maybe"}\n', "a.jsonl:1: label 'maybe' is not one of the options"),
        ('{"text": "x", "label": 7}\n', "a.jsonl:1: label index 7 out of range for 2 options"),
        ('{"text": "x"}\n{"prompt": "p", "completion": "c"}\n', "a.jsonl:2: a pairs record"),
        ('{"foo": 1}\n', "a.jsonl:1: expected a 'text' field"),
        ("{not json\n", "a.jsonl:1: invalid JSON"),
        ("\n\n", "no records"),
        ('{"text": "   "}\n', "record 1 is empty"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    f = _write(tmp_path / "a.jsonl", content)
    with pytest.raises(KappaTuneError, match=message):
        records.read_path(f, ("neg", "pos"), Fields())


def test_text_files_and_directories(tmp_path: Path) -> None:
    assert records.read_path(_write(tmp_path / "t.txt", "hello"), (), Fields()).records == (
        Record("", "hello"),
    )
    with pytest.raises(KappaTuneError, match="the file is empty"):
        records.read_path(_write(tmp_path / "e.txt", " \n"), (), Fields())
    with pytest.raises(KappaTuneError, match="no such file"):
        records.read_path(tmp_path / "missing.txt", (), Fields())
    d = tmp_path / "docs"
    d.mkdir()
    with pytest.raises(KappaTuneError, match=r"no \.txt files"):
        records.read_path(d, (), Fields())
    _write(d / "b.txt", "second")
    _write(d / "a.txt", "first")
    assert [r.completion for r in records.read_path(d, (), Fields()).records] == [
        "first",
        "second",
    ]


def test_split_validation() -> None:
    with pytest.raises(KappaTuneError, match="x: no records"):
        Split("text", (), "x")
    with pytest.raises(KappaTuneError, match="unknown split kind"):
        Split("images", (Record("", "a"),), "x")


def test_scenario_validation() -> None:
    spec = DataSpec("builtin:digits-train")
    with pytest.raises(KappaTuneError, match="at least 2 options, got 1"):
        Scenario("s", spec, spec, spec, task_metric="accuracy", options=("a",))
    with pytest.raises(KappaTuneError, match="duplicate options"):
        Scenario("s", spec, spec, spec, task_metric="accuracy", options=("a", "a"))
    with pytest.raises(KappaTuneError, match="task_metric must be one of"):
        Scenario("s", spec, spec, spec, task_metric="bleu")
    with pytest.raises(KappaTuneError, match="options are only for task_metric accuracy"):
        Scenario("s", spec, spec, spec, options=("a", "b"))
    with pytest.raises(KappaTuneError, match="scenario name"):
        Scenario("a b", spec, spec, spec)
    with pytest.raises(KappaTuneError, match="unknown built-in data 'nope'"):
        DataSpec("builtin:nope")
    with pytest.raises(KappaTuneError, match="malformed dataset"):
        DataSpec("hf:")
    with pytest.raises(KappaTuneError, match="unknown scenario 'nope'"):
        builtin_scenario("nope")


def test_scenario_load_checks_kinds_against_metric(tmp_path: Path) -> None:
    text = _write(tmp_path / "t.txt", "some text")
    s = Scenario("s", DataSpec("builtin:digits-train"), DataSpec(str(text)), DataSpec(str(text)))
    with pytest.raises(KappaTuneError, match="holds labelled records"):
        s.load()
    s2 = Scenario(
        "s",
        DataSpec(str(text)),
        DataSpec(str(text)),
        DataSpec(str(text)),
        task_metric="accuracy",
        options=("a", "b"),
    )
    with pytest.raises(KappaTuneError, match="an accuracy task needs text\\+label records"):
        s2.load()


def test_config_yaml_and_json_round_trip(tmp_path: Path) -> None:
    _write(tmp_path / "train.jsonl", '{"text": "a", "label": "yes"}\n')
    cfg = _write(
        tmp_path / "bench.yaml",
        "scenarios:\n"
        "  - digits\n"
        "  - name: mine\n"
        "    train: train.jsonl\n"
        "    heldout: train.jsonl\n"
        "    control: builtin:python-docs-prose\n"
        "    task_metric: accuracy\n"
        "    options: ['yes', 'no']\n"
        '    template: "Q: {text}\\nA: "\n',
    )
    digits, mine = load_config(cfg)
    assert digits == BUILTIN_SCENARIOS["digits"]
    assert mine.train.source == str(tmp_path / "train.jsonl")
    assert mine.options == ("yes", "no") and mine.fields.template == "Q: {text}\nA: "
    assert Scenario.from_json(json.loads(json.dumps(mine.to_json()))) == mine
    data = mine.load()
    assert data.train.records == (Record("Q: a\nA: ", "yes", 0),)
    as_json = _write(tmp_path / "one.json", json.dumps(mine.to_json()))
    assert load_config(as_json) == (mine,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "name: x\ntrain: a\nheldout: b\ncontrol: c\ncolor: red\n",
            "unknown scenario key\\(s\\): color",
        ),
        ("name: x\ntrain: a\n", "missing heldout, control"),
        ("scenarios: []\n", "non-empty list"),
        ("scenarios: [code, code]\n", "duplicate scenario name\\(s\\): code"),
        ("key: [unclosed\n", "cannot parse config"),
        (
            "name: x\ntrain: a\nheldout: b\ncontrol: c\ntask_metric: accuracy\noptions: [yes, no]\n",
            "option True is not a string",
        ),
        ("name: x\ntrain: a\nheldout: b\ncontrol: c\nfields: {txt: t}\n", "unknown fields key"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KappaTuneError, match=message):
        load_config(_write(tmp_path / "c.yaml", text))
    with pytest.raises(KappaTuneError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
