import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kappatune import Analysis, AnalyzeOptions, KappaTuneError, analyze
from kappatune.analysis.linalg import reference_svdvals
from tests.conftest import geometric, known_matrix


def state() -> dict[str, torch.Tensor]:
    experts = torch.stack(
        [known_matrix(12, 8, geometric(k, 8), seed=i) for i, k in enumerate([2.0, 9.0, 4.0])]
    )
    nan = torch.ones(4, 4)
    nan[1, 1] = math.nan
    return {
        "model.layers.0.self_attn.q_proj.weight": known_matrix(16, 8, geometric(10.0, 8)).float(),
        "model.layers.0.self_attn.q_proj.bias": torch.ones(16),
        "model.layers.1.self_attn.v_proj.weight": known_matrix(8, 16, geometric(3.0, 8)).to(
            torch.bfloat16
        ),
        "model.layers.1.mlp.experts.gate_up_proj": experts,
        "conv.weight": torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0)),
        "model.layers.1.zero.weight": torch.zeros(5, 5),
        "model.layers.1.broken.weight": nan,
        "position_ids": torch.arange(8).reshape(1, 8),
    }


def test_rows_skips_and_values() -> None:
    a = analyze(state(), AnalyzeOptions(use_cache=False))
    keys = [(r.name, r.expert) for r in a.tensors]
    assert keys == [
        ("model.layers.0.self_attn.q_proj.weight", None),
        ("model.layers.1.self_attn.v_proj.weight", None),
        ("model.layers.1.mlp.experts.gate_up_proj", 0),
        ("model.layers.1.mlp.experts.gate_up_proj", 1),
        ("model.layers.1.mlp.experts.gate_up_proj", 2),
        ("conv.weight", None),
        ("model.layers.1.zero.weight", None),
    ]
    q = a.row("model.layers.0.self_attn.q_proj.weight")
    assert q.kappa == pytest.approx(10.0, rel=1e-6)  # float32 storage
    assert (q.layer, q.module_type, q.dtype, q.numel, q.shape) == (
        0,
        "q_proj",
        "float32",
        128,
        (16, 8),
    )
    assert [
        a.row("model.layers.1.mlp.experts.gate_up_proj", e).kappa for e in range(3)
    ] == pytest.approx([2.0, 9.0, 4.0], rel=1e-12)
    e1 = a.row("model.layers.1.mlp.experts.gate_up_proj", 1)
    assert (e1.shape, e1.numel, e1.module_type) == ((12, 8), 96, "gate_up_proj")
    conv = a.row("conv.weight")
    s = reference_svdvals(state()["conv.weight"])
    assert conv.kappa == pytest.approx(s[0] / s[-1], rel=1e-9) and conv.shape == (6, 2, 3)
    assert a.row("model.layers.1.zero.weight").kappa == math.inf
    skipped = {s.name: s.reason for s in a.skipped}
    assert skipped == {
        "model.layers.0.self_attn.q_proj.bias": "not a matrix (1-D)",
        "model.layers.1.broken.weight": "non-finite weights (1 NaN, 0 Inf)",
        "position_ids": "integer dtype int64 (not floating-point weights)",
    }


def test_filters_and_max_dim() -> None:
    a = analyze(
        state(), AnalyzeOptions(include=r"layers\.1\.", exclude="zero", max_dim=12, use_cache=False)
    )
    assert [(r.name, r.expert) for r in a.tensors] == [
        ("model.layers.1.mlp.experts.gate_up_proj", e) for e in range(3)
    ]
    reasons = {s.name: s.reason for s in a.skipped}
    assert reasons["model.layers.1.zero.weight"] == "matched by --exclude"
    assert reasons["conv.weight"] == "not matched by --include"
    assert reasons["model.layers.1.self_attn.v_proj.weight"] == "a dimension exceeds --max-dim 12"


def test_json_round_trip_keeps_inf(tmp_path: Path) -> None:
    a = analyze(state(), AnalyzeOptions(use_cache=False))
    a.save(tmp_path / "a.json")
    raw = json.loads((tmp_path / "a.json").read_text())
    assert raw["schema_version"] == 2
    assert set(raw) == {"schema_version", "source", "fingerprint", "tensors", "skipped"}
    zero = next(t for t in raw["tensors"] if t["name"] == "model.layers.1.zero.weight")
    assert (
        zero["kappa"] == "inf" and zero["log_volume"] == "-inf" and zero["effective_rank"] is None
    )
    assert {
        "name",
        "shape",
        "dtype",
        "numel",
        "expert",
        "kappa",
        "sigma_max",
        "sigma_min",
        "log_volume",
        "entropy_deficit",
        "stable_rank",
        "effective_rank",
        "snr",
    } <= set(zero)
    assert zero["snr"] is None  # the all-zero matrix: Spectrum's score is undefined (nan)
    b = Analysis.load(tmp_path / "a.json")
    assert (
        b.tensors[:6] == a.tensors[:6] and b.skipped == a.skipped and b.fingerprint == a.fingerprint
    )
    assert b.row("model.layers.1.zero.weight").kappa == math.inf


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    s = state()
    f1 = analyze(s, AnalyzeOptions(use_cache=False)).fingerprint
    s["conv.weight"] = s["conv.weight"] * 2.0
    f2 = analyze(s, AnalyzeOptions(use_cache=False)).fingerprint
    assert f1 != f2


def test_parallel_workers_give_identical_rows(tmp_path: Path) -> None:
    ts = {
        f"model.layers.{i}.mlp.down_proj.weight": known_matrix(
            40, 20, geometric(1.5 + i, 20), seed=i
        ).float()
        for i in range(6)
    }
    save_file(ts, tmp_path / "m.safetensors")
    one = analyze(tmp_path / "m.safetensors", AnalyzeOptions(workers=1, use_cache=False))
    four = analyze(tmp_path / "m.safetensors", AnalyzeOptions(workers=4, use_cache=False))
    assert one.tensors == four.tensors
    assert [r.kappa for r in one.tensors] == pytest.approx([1.5 + i for i in range(6)], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": "("}, "invalid --include regex"),
        ({"max_dim": 0}, "--max-dim must be at least 1"),
        ({"device": "tpu"}, "--device must be one of auto, cpu, cuda"),
        ({"workers": -1}, "--workers must be between 0 and 256"),
    ],
)
def test_invalid_options(kwargs: dict, message: str) -> None:
    with pytest.raises(KappaTuneError, match=message):
        AnalyzeOptions(**kwargs)


def test_cuda_requested_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(KappaTuneError, match="no CUDA device"):
        analyze(state(), AnalyzeOptions(device="cuda", use_cache=False))


def test_unsupported_schema_version() -> None:
    with pytest.raises(KappaTuneError, match="unsupported analysis schema_version 99"):
        Analysis.from_json({"schema_version": 99})


def test_numpy_free_of_state_mutation() -> None:
    s = state()
    before = {k: v.clone() for k, v in s.items()}
    analyze(s, AnalyzeOptions(use_cache=False))
    for k, v in s.items():
        assert torch.equal(v, before[k]) or (
            torch.isnan(v).any() and torch.equal(torch.nan_to_num(v), torch.nan_to_num(before[k]))
        )
    assert np.isfinite(1.0)


def test_streamed_rows_equal_whole_tensor_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kappatune.analysis import spectra as spectra_mod

    ts = {
        "tall.weight": known_matrix(1000, 24, geometric(40.0, 24), seed=5).to(torch.bfloat16),
        "wide.weight": known_matrix(24, 1000, geometric(7.0, 24), seed=6).float(),
        "nan.weight": torch.ones(500, 8),
    }
    ts["nan.weight"][300, 2] = math.inf
    save_file(ts, tmp_path / "m.safetensors")
    whole = analyze(tmp_path / "m.safetensors", AnalyzeOptions(use_cache=False))
    monkeypatch.setattr(spectra_mod, "STREAM_MIN_BYTES", 1)
    streamed = analyze(tmp_path / "m.safetensors", AnalyzeOptions(use_cache=False, block_rows=64))
    assert streamed.fingerprint == whole.fingerprint
    assert [r.name for r in streamed.tensors] == [r.name for r in whole.tensors]
    assert {r.name for r in streamed.tensors} == {"tall.weight", "wide.weight"}
    for a, b in zip(whole.tensors, streamed.tensors, strict=True):
        assert a.kappa == pytest.approx(b.kappa, rel=1e-11)
        assert (a.shape, a.numel, a.dtype) == (b.shape, b.numel, b.dtype)
    assert streamed.skipped == whole.skipped
    assert {s.name: s.reason for s in streamed.skipped} == {
        "nan.weight": "non-finite weights (0 NaN, 1 Inf)"
    }
