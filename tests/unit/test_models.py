from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kappatune.analysis.spectra import AnalyzeOptions, analyze
from kappatune.errors import KappaTuneError
from kappatune.training import models
from tests.unit._tiny_models import save_tiny_model, tiny_llama


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAPPATUNE_CACHE", str(tmp_path / "cache"))


def test_load_local_dir_names_match_analysis(tmp_path: Path) -> None:
    d = save_tiny_model(tmp_path / "tiny")
    model, tok = models.load_causal_lm(d)
    assert not model.training
    assert tok("ab")["input_ids"] == [2, 14, 15]
    source = models.analysis_source(d)
    assert source == str(d.resolve())
    rows = analyze(source, AnalyzeOptions(workers=1)).tensors
    params = set(models.parameter_names(model))
    assert {r.name for r in rows} <= params
    assert len({r.name for r in rows}) == 2 * 7 + 2  # 7 linears per layer, embed, lm_head


def test_load_dtype(tmp_path: Path) -> None:
    d = save_tiny_model(tmp_path / "tiny")
    model, _ = models.load_causal_lm(d, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_parameter_counts_with_tied_weights() -> None:
    m = tiny_llama(layers=1, tied=True)
    names = models.parameter_names(m)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    untied = tiny_llama(layers=1)
    assert models.total_parameters(untied) - models.total_parameters(m) == 128 * 32


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "unknown model"),
        ("plainfile", "is a file"),
        ("noconfig", "has no config.json"),
        ("encoder", "not a causal language model"),
    ],
)
def test_resolve_errors(tmp_path: Path, setup: str, message: str) -> None:
    spec: str
    if setup == "missing":
        spec = "no-such-model"
    elif setup == "plainfile":
        f = tmp_path / "weights.safetensors"
        f.write_bytes(b"x")
        spec = str(f)
    elif setup == "noconfig":
        (tmp_path / "empty").mkdir()
        spec = str(tmp_path / "empty")
    else:
        spec = "all-minilm-l6-v2"
    with pytest.raises(KappaTuneError, match=message):
        models.load_causal_lm(spec)


def test_missing_tokenizer_is_one_line_error(tmp_path: Path) -> None:
    d = tmp_path / "notok"
    tiny_llama().save_pretrained(d)
    with pytest.raises(KappaTuneError, match="tokenizer") as info:
        models.load_causal_lm(d)
    assert "\n" not in str(info.value)


def test_hub_id_offline_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(KappaTuneError, match="cannot load causal LM 'nobody/nothing'"):
        models.load_causal_lm("nobody/nothing")


def test_gguf_dequantized_cache_keyed_by_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF-one")
    calls: list[Path] = []

    def fake_write(src: Path, target: Path) -> None:  # stands in for the minute-long dequantization
        calls.append(src)
        tmp = target.parent / ".tmp"
        save_tiny_model(tmp)
        (tmp / "kappatune.json").write_text(json.dumps({"format": 1}))
        tmp.rename(target)

    monkeypatch.setattr(models, "_write_dequantized", fake_write)
    first = models.ensure_dequantized(gguf)
    assert first.parent == tmp_path / "cache" / "models"
    assert models.ensure_dequantized(gguf) == first and len(calls) == 1
    model, _ = models.load_causal_lm(gguf)
    assert type(model).__name__ == "LlamaForCausalLM" and len(calls) == 1
    gguf.write_bytes(b"GGUF-two")  # new content: new directory
    second = models.ensure_dequantized(gguf)
    assert second != first and len(calls) == 2
    # an incomplete directory (interrupted write) is rebuilt
    (second / "model.safetensors").unlink()
    assert models.ensure_dequantized(gguf) == second and len(calls) == 3


def test_unique_state_drops_tied_alias() -> None:
    state = models._unique_state(tiny_llama(layers=1, tied=True))
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state
