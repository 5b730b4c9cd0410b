"""The synthetic real-shape checkpoints of benchmarks/analyze_scale.py."""

from __future__ import annotations

import json
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from safetensors import safe_open

from kappatune.analysis import linalg
from kappatune.analysis.spectra import AnalyzeOptions, analyze

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale_checkpoint as sc  # noqa: E402

TINY = sc.Arch("tiny", "qwen2", 2, 64, 160, 4, 2, 16, 300, False)


def test_qwen_7b_shapes_match_the_real_checkpoint() -> None:
    t = dict(sc.tensors(sc.PRESETS["7b"]))
    assert len(t) == 339 and t["lm_head.weight"] == (152064, 3584)
    assert t["model.layers.27.mlp.down_proj.weight"] == (3584, 18944)
    assert t["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)
    assert t["model.layers.0.self_attn.k_proj.bias"] == (512,)
    assert sc.checkpoint_bytes(sc.PRESETS["7b"]) == 2 * 7_615_616_512


def test_written_checkpoint_has_the_designed_spectra(tmp_path: Path) -> None:
    sc.write_checkpoint(tmp_path, TINY)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert list(index) == [n for n, _ in sc.tensors(TINY)]
    expected = json.loads((tmp_path / "expected_kappa.json").read_text())["kappa"]
    with safe_open(str(tmp_path / index["lm_head.weight"]), "pt") as f:
        w = f.get_tensor("lm_head.weight")
    s = linalg.reference_svdvals(w)
    assert abs(s[0] / s[-1] / expected["lm_head.weight"] - 1) < 5e-3  # bf16 storage
    a = analyze(tmp_path, AnalyzeOptions(use_cache=False))
    assert sorted(r.name for r in a.tensors) == sorted(expected)
    assert max(abs(r.kappa / expected[r.name] - 1) for r in a.tensors) < 1e-2


def test_a_shape_that_is_not_an_architecture_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import analyze_scale

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY.__dict__, "heads": 5}))
    with pytest.raises(sc.ShapeError, match=r"heads \(5\) must be a multiple of kv_heads \(2\)"):
        sc.load_arch(str(bad))
    monkeypatch.setattr(sys, "argv", ["analyze_scale.py", "--sizes", str(bad)])
    assert analyze_scale.main() == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: shape 'tiny': heads (5) must be a multiple of kv_heads (2)"
    ]
    bad.write_text(json.dumps({"name": "x", "layers": 2}))
    with pytest.raises(sc.ShapeError, match="must be a JSON object with exactly"):
        sc.load_arch(str(bad))


def test_not_enough_disk_is_checked_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sc.shutil, "disk_usage", lambda p: usage(10**9, 0, 10**6))
    with pytest.raises(sc.NoSpace, match=r"need 0\.3 GiB, 0\.0 GiB free"):
        sc.write_checkpoint(tmp_path / "ckpt", TINY)
    assert list((tmp_path / "ckpt").iterdir()) == []
