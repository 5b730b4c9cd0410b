from __future__ import annotations

from pathlib import Path

import pytest

from kappatune.cli.main import build_parser, main


def parse(argv: list[str]) -> object:
    return build_parser().parse_args(argv)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_supplies_flags_and_the_command_line_overrides(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "model: ./my-model\n"
        "data: [a.txt, b.jsonl]\n"
        "method: selective\n"
        "output: runs/x\n"
        "steps: 40\n"
        "lr: 2.0e-4\n"
        "batch-size: 8\n"
        "no_pack: true\n"
        "scheduler: cosine\n"
        "report_to: tensorboard\n",
    )
    args = parse(["train", "--config", cfg])
    assert (args.model, args.data, args.method, args.output) == (
        "./my-model",
        ["a.txt", "b.jsonl"],
        "selective",
        Path("runs/x"),
    )
    assert (args.steps, args.epochs, args.lr, args.batch_size) == (40, None, 2e-4, 8)
    assert (args.no_pack, args.scheduler, args.report_to) == (True, "cosine", ["tensorboard"])
    # flags override; a flag of the same exclusive group (--epochs) replaces the file's --steps
    args = parse(
        ["train", "other", "--config", cfg, "--lr", "1e-3", "--epochs", "2", "--data", "c.txt"]
    )
    assert (args.model, args.lr, args.steps, args.epochs, args.data) == (
        "other",
        1e-3,
        None,
        2.0,
        ["c.txt"],
    )
    # without --config nothing changes: the flags are required as before
    args = parse(["train", "m", "--data", "d.txt", "--method", "full", "-o", "o", "--steps", "1"])
    assert (args.lr, args.batch_size, args.no_pack, args.report_to) == (1e-4, 4, False, ["none"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lrr: 0.1\n", "unknown key 'lrr' (keys are the flag names, e.g. batch_size)"),
        ("lr: fast\n", "config key 'lr' (--lr): invalid value 'fast'"),
        ("steps: 1.5\n", "config key 'steps' (--steps): invalid value 1.5"),
        ("method: sgd\n", "config key 'method' (--method): 'sgd' is not one of selective,"),
        ("no_pack: 3\n", "config key 'no_pack' (--no-pack) takes true or false"),
        ("lr: [1, 2]\n", "config key 'lr' (--lr) takes one value"),
        ("steps: 3\nepochs: 1\n", "sets both --steps and --epochs"),
        ("- a\n- b\n", "must hold a mapping of flag names to values"),
        ("lr: [\n", "is not valid YAML (line 2)"),
    ],
)
def test_bad_config_is_one_line_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    cfg = write(tmp_path, text)
    code = main(["train", "m", "--data", "d.txt", "--method", "full", "-o", "o", "--config", cfg])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("kappatune: error: ") and err.count("\n") == 1
    assert message in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--config", str(tmp_path / "none.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot read --config {tmp_path / 'none.yaml'}" in err
