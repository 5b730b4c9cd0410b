import json
from pathlib import Path

import pytest
import torch

from kappatune.cli.main import main
from tests.unit._tiny_models import save_tiny_model


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clibench")
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "to", "the", "big", "red", "dog"]
    text = " ".join(words[(i * 5) % len(words)] for i in range(500))
    paths = {
        "model": save_tiny_model(root / "tiny", seed=0),
        "train": root / "train.txt",
        "held": root / "held.txt",
        "control": root / "control.txt",
        "lab_train": root / "lab_train.jsonl",
        "lab_test": root / "lab_test.jsonl",
        "empty": root / "empty.txt",
    }
    paths["train"].write_text(text)
    paths["held"].write_text(text[::-1])
    paths["control"].write_text("x = 1 + 2\n" * 40)
    paths["empty"].write_text("\n")
    for name, n in (("lab_train", 20), ("lab_test", 6)):
        rows = [
            {"text": ("good " if i % 2 else "bad ") + str(i), "label": "yes" if i % 2 else "no"}
            for i in range(n)
        ]
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _common(files: dict[str, Path], out: Path) -> list[str]:
    return [
        "bench", "--model", str(files["model"]), "--arms", "kappa", "lora", "--seeds", "0", "1",
        "--steps", "2", "--max-steps", "3", "--seq-len", "16", "--budget-params", "2500",
        "--task-sequences", "3", "--control-sequences", "3", "--task-examples", "6",
        "--output", str(out),
    ]  # fmt: skip


def test_end_to_end_text_and_label_scenarios(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bench.yaml"
    config.write_text(
        "scenarios:\n"
        f"  - name: words\n    train: {files['train']}\n    heldout: {files['held']}\n"
        f"    control: {files['control']}\n"
        f"  - name: sentiment\n    train: {files['lab_train']}\n    heldout: {files['lab_test']}\n"
        f"    control: {files['control']}\n    task_metric: accuracy\n    options: ['yes', 'no']\n"
    )
    out = tmp_path / "out"
    assert main([*_common(files, out), "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "kappatune bench" in text and "sentiment" in text and "words" in text
    for name in (
        "report.md",
        "report.html",
        "summary.csv",
        "summary.json",
        "seeds.csv",
        "gain_vs_forgetting.png",
        "bench.json",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    arms = {(a["scenario"], a["rule"], a["arm"]) for a in summary["arms"]}
    for sc in ("words", "sentiment"):
        for rule in ("steps", "loss"):
            assert {(sc, rule, a) for a in ("base", "kappa", "lora")} <= arms
    assert len(summary["seeds"]) == 2 * 2 * 2 * 2  # scenarios x arms x seeds x rules
    assert summary["meta"]["command"].startswith("kappatune bench --config")
    acc = [a for a in summary["arms"] if a["scenario"] == "sentiment" and a["arm"] == "kappa"]
    assert all(0 <= a["task_value_mean"] <= 1 for a in acc)
    # a second identical command reuses every stored run
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    assert main([*_common(files, out), "--config", str(config)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == mtimes


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train", "{missing}", "--heldout", "{held}", "--control", "{control}"], "no such file"),
        (
            ["--train", "{empty}", "--heldout", "{held}", "--control", "{control}"],
            "the file is empty",
        ),
        (
            [
                "--train",
                "{lab_train}",
                "--heldout",
                "{lab_test}",
                "--control",
                "{control}",
                "--task-metric",
                "accuracy",
                "--options",
                "yes",
                "n\u00f6",
            ],
            "label 'no' is not one of the options",
        ),
        (
            [
                "--train",
                "{train}",
                "--heldout",
                "{held}",
                "--control",
                "{control}",
                "--budget-params",
                "90M",
            ],
            "exceeds the",
        ),
        (["nonexistent"], "unknown scenario 'nonexistent'"),
        (["--train", "{train}"], "needs --train, --heldout and --control"),
        (
            [
                "--train",
                "{train}",
                "--heldout",
                "{held}",
                "--control",
                "{control}",
                "--lr",
                "kappa=fast",
            ],
            "cannot read --lr",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    mapping = {k: str(v) for k, v in files.items()} | {"missing": str(tmp_path / "nope.txt")}
    argv = _common(files, tmp_path / "out") + [e.format(**mapping) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # progress lines (model loading) may come first
    assert last.startswith("kappatune: error:") and message in last
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "runs").exists()


def test_options_that_do_not_tokenize(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "\u00e9"}\n{"text": "b", "label": "ok"}\n')
    argv = [
        *_common(files, tmp_path / "out"),
        "--train", str(bad), "--heldout", str(bad), "--control", str(files["control"]),
        "--task-metric", "accuracy", "--options", "\u00e9", "ok",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "label option '\u00e9' tokenizes to the unknown token" in err
