import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from kappatune.cli.main import main
from tests.conftest import geometric, known_matrix


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    ts = {
        "model.layers.0.self_attn.q_proj.weight": known_matrix(16, 8, geometric(12.0, 8)).float(),
        "model.layers.0.self_attn.v_proj.weight": known_matrix(16, 8, geometric(3.0, 8)).float(),
        "model.norm.weight": known_matrix(8, 8, [1.0] * 8).float()[0],
    }
    save_file(ts, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


def test_analyze_writes_json_csv_and_plot(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "analyze",
            str(checkpoint),
            "--output",
            str(out / "a.json"),
            "--csv",
            str(out / "a.csv"),
            "--plot",
            str(out / "a.png"),
        ]
    )
    assert rc == 0
    data = json.loads((out / "a.json").read_text())
    assert [t["name"] for t in data["tensors"]] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
    ]
    assert data["skipped"] == [
        {"name": "model.norm.weight", "shape": [8], "reason": "not a matrix (1-D)"}
    ]
    lines = (out / "a.csv").read_text().splitlines()
    assert lines[0].startswith("name,expert,layer,module_type") and len(lines) == 3
    assert (out / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = capsys.readouterr().out
    assert "lowest kappa" in shown and "v_proj" in shown and "by module type" in shown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["analyze", "missing/model.safetensors"], "no such file or directory"),
        (["analyze", "no-such-builtin"], "unknown model 'no-such-builtin'"),
        (["analyze", "{ckpt}", "--workers", "-3"], "--workers must be between 0 and 256"),
        (["analyze", "{ckpt}", "--device", "tpu"], "--device must be one of"),
        (["analyze", "{ckpt}", "--max-dim", "0"], "--max-dim must be at least 1"),
        (["analyze", "{ckpt}", "--include", "nothing-matches"], "no candidate matrices"),
        (["analyze", "{ckpt}", "--output", "{tmp}/x.txt"], "should end in .json"),
        (["analyze", "{ckpt}", "--workers", "two"], "invalid int value"),
        (["analyze", "{empty}"], "no weights found"),
        (["analyze", "{corrupt}"], "corrupt safetensors file"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 20)
    subs = {
        "{ckpt}": str(checkpoint),
        "{tmp}": str(tmp_path),
        "{empty}": str(tmp_path / "empty"),
        "{corrupt}": str(tmp_path / "corrupt.safetensors"),
    }
    argv = [subs.get(a, a).replace("{tmp}", str(tmp_path)) for a in argv]
    out_json = tmp_path / "never.json"
    rc = main([*argv, "--output", str(out_json)] if "--output" not in argv else argv)
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kappatune: error: ") and len(err.splitlines()) == 1
    assert message in err
    assert not out_json.exists() and not (tmp_path / "x.txt").exists()


def test_env_prints_versions(capsys: pytest.CaptureFixture) -> None:
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "kappatune" in out and "cache dir" in out
