import json
from pathlib import Path

import pytest

from kappatune.cli.main import main


@pytest.fixture(scope="module")
def files(toy_bench: dict[str, Path]) -> dict[str, Path]:
    return toy_bench


def _common(files: dict[str, Path], out: Path) -> list[str]:
    return [
        "bench", "--model", str(files["model"]), "--arms", "kappa", "lora", "--seeds", "0", "1",
        "--steps", "2", "--checkpoints", "2", "--lr-grid", "kappa=1e-4", "lora=3e-4,1e-3",
        "--seq-len", "16", "--budget-params", "2500", "--task-sequences", "3",
        "--control-sequences", "10", "--control-seq-len", "16", "--task-examples", "6", "--knowledge", str(files["mc"]),
        "--bootstrap", "20", "--output", str(out),
    ]  # fmt: skip


def test_end_to_end_text_and_label_scenarios(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny end-to-end sweep CI runs (about 10 s on 2 cores): two scenarios (text and label)
    x 3 (arm, lr) x 2 seeds x 2 checkpoints, every report file, then a rerun that reuses all."""
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
    captured = capsys.readouterr()
    text = captured.out
    # not on a terminal: plain progress lines, no bars
    assert "\r" not in captured.err
    assert "kappatune: [1/12] words kappa lr 0.0001 seed 0: training 2 steps" in captured.err
    assert "kappatune: [1/12] words kappa lr 0.0001 seed 0: step 2/2, loss " in captured.err
    assert "kappatune bench" in text and "sentiment" in text and "words" in text
    assert text.strip().splitlines()[-1].startswith("conclusion: sentiment, control ppl: ")
    for name in (
        "report.md",
        "report.html",
        "summary.csv",
        "summary.json",
        "seeds.csv",
        "pareto.png",
        "gain_vs_forgetting.png",
        "bench.json",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    arms = {(a["scenario"], a["arm"], a["lr"], a["step"]) for a in summary["arms"]}
    for sc in ("words", "sentiment"):
        assert (sc, "base", 0.0, 0) in arms
        assert {(sc, "kappa", 1e-4, s) for s in (1, 2)} <= arms
        assert {(sc, "lora", lr, s) for lr in (3e-4, 1e-3) for s in (1, 2)} <= arms
    # scenarios x (1 + 2 learning rates) x seeds x checkpoints
    assert len(summary["seeds"]) == 2 * 3 * 2 * 2
    assert summary["meta"]["command"].startswith("kappatune bench --config")
    measures = {(v["scenario"], v["measure"]) for v in summary["verdicts"]}
    assert measures == {
        (sc, m)
        for sc in ("words", "sentiment")
        for m in ("control ppl", "KL from base", "knowledge")
    }
    report_md = (out / "report.md").read_text()
    assert report_md.splitlines()[2].startswith("**Verdict.** sentiment, control ppl: ")
    base = json.loads((out / "runs" / "words" / "base.json").read_text())
    size = f"which text; 10 rows, {sum(base['control_tokens'])} tokens)"
    assert len(base["control_tokens"]) == 10
    assert report_md.count(size) == 2  # the floor line of each scenario (same control text)
    acc = [a for a in summary["arms"] if a["scenario"] == "sentiment" and a["arm"] == "kappa"]
    assert all(0 <= a["task_value_mean"] <= 1 for a in acc)
    # a second identical command reuses every stored run
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    assert main([*_common(files, out), "--config", str(config)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == mtimes


DATA = ["--train", "{train}", "--heldout", "{held}", "--control", "{control}"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train", "{missing}", "--heldout", "{held}", "--control", "{control}"], "no such file"),
        (["--train", "{empty}", "--heldout", "{held}", "--control", "{control}"],
         "the file is empty"),
        (["--train", "{lab_train}", "--heldout", "{lab_test}", "--control", "{control}",
          "--task-metric", "accuracy", "--options", "yes", "n\u00f6"],
         "label 'no' is not one of the options"),
        ([*DATA, "--budget-params", "90M"], "exceeds the"),
        (["nonexistent"], "unknown scenario 'nonexistent'"),
        (["--train", "{train}"], "needs --train, --heldout and --control"),
        ([*DATA, "--lr-grid", "kappa=fast"], "cannot read --lr-grid"),
        (["code", "--lr-grid", "kappa=1e-4,-1e-4"], "every learning rate must be positive"),
        (["code", "--checkpoints", "3"], "--checkpoints 3 must be between 1 and --steps 2"),
        ([*DATA, "--control-sequences", "5"], "5 control sequences are too few for a noise floor"),
        ([*DATA, "--knowledge", "{bad_mc}"], "answer ' 9' is not among the options"),
        ([*DATA, "--knowledge", "{unk_mc}"], "option 'é' of 'q' does not tokenize"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    bad_mc, unk_mc = tmp_path / "bad_mc.jsonl", tmp_path / "unk_mc.jsonl"
    bad_mc.write_text(json.dumps({"question": "q", "options": [" 1", " 2"], "answer": " 9"}))
    unk_mc.write_text(json.dumps({"question": "q", "options": [" 1", "é"], "answer": " 1"}))
    mapping = {k: str(v) for k, v in files.items()} | {
        "missing": str(tmp_path / "nope.txt"), "bad_mc": str(bad_mc), "unk_mc": str(unk_mc),
    }  # fmt: skip
    argv = _common(files, tmp_path / "out") + [e.format(**mapping) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # progress lines (model loading) may come first
    assert last.startswith("kappatune: error:") and message in last
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


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


def test_presets_resolve_and_flags_win() -> None:
    import argparse

    from kappatune.cli import bench as cli_bench
    from kappatune.cli.main import build_parser

    parser = build_parser()
    args = cli_bench.resolve(
        parser.parse_args(["bench", "--preset", "cpu", "--seeds", "7", "8", "9"])
    )
    s = cli_bench.settings_from_args(args)
    assert args.scenarios == ["code"] and s.model == "gemma-3-270m"
    assert s.arms == ("full", "lora", "kappa", "random") and s.seeds == (7, 8, 9)
    assert [len(s.lrs_for(a)) for a in s.arms] == [3, 3, 3, 3]
    assert s.steps == 8 and s.checkpoints == 2 and s.sizes.control_sequences == 24
    assert s.knowledge == "builtin:dictd" and s.sizes.knowledge_questions == 400
    gpu = cli_bench.settings_from_args(
        cli_bench.resolve(parser.parse_args(["bench", "--preset", "gpu"]))
    )
    assert gpu.device == "cuda" and gpu.steps == 200 and len(gpu.arms) == 7
    assert all(len(gpu.lrs_for(a)) == 5 for a in gpu.arms) and gpu.sizes.control_sequences == 512
    plain = cli_bench.resolve(parser.parse_args(["bench"]))
    assert plain.scenarios == [] and plain.steps == 16 and plain.arms is None
    assert isinstance(plain, argparse.Namespace)


def test_gpu_preset_runs_a_tiny_sweep_on_cpu(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gpu preset's code path with a tiny model: every knob it sets, shrunk by flags."""
    argv = [
        "bench", "--preset", "gpu", "--device", "cpu", "--model", str(files["model"]),
        "--arms", "kappa", "--seeds", "0", "--steps", "2", "--checkpoints", "1",
        "--lr-grid", "1e-4", "--seq-len", "16", "--batch-size", "2", "--eval-batch-size", "4",
        "--budget-params", "2500", "--task-sequences", "3", "--control-sequences", "10",
        "--control-seq-len", "16",
        "--knowledge", str(files["mc"]), "--bootstrap", "20",
        "--train", str(files["train"]), "--heldout", str(files["held"]),
        "--control", str(files["control"]), "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(argv) == 0
    meta = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert meta["preset"] == "gpu" and meta["settings"]["device"] == "cpu"
    assert meta["settings"]["fisher_tokens"] == 16384  # from the preset
    assert "--preset" not in meta["command"] and "--fisher-tokens 16384" in meta["command"]
