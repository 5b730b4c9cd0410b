import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kappatune.analysis.gguf_source import GGUFSource, gguf_to_hf_name
from kappatune.analysis.safetensors_source import SafetensorsSource
from kappatune.analysis.sources import open_source
from kappatune.analysis.torch_source import StateDictSource
from kappatune.errors import KappaTuneError


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(6, 4, generator=g),
        "b.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(3, 3, generator=g).to(torch.float16),
        "c.bias": torch.randn(3, generator=g),
        "ids": torch.arange(4),
    }


def read_all(source) -> dict[str, torch.Tensor]:
    return {e.name: source.read(e)[0] for e in source.entries()}


def test_safetensors_file_reads_every_tensor_exactly(tmp_path: Path) -> None:
    ts = tensors()
    save_file(ts, tmp_path / "m.safetensors")
    src = open_source(tmp_path / "m.safetensors")
    assert isinstance(src, SafetensorsSource)
    got = read_all(src)
    assert set(got) == set(ts)
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    dtypes = {e.name: e.dtype for e in src.entries()}
    assert dtypes["b.weight"] == "bfloat16" and dtypes["ids"] == "int64"


def test_digest_depends_on_content_not_name(tmp_path: Path) -> None:
    ts = tensors()
    save_file(ts, tmp_path / "one.safetensors")
    save_file(ts, tmp_path / "two.safetensors")
    changed = dict(ts)
    changed["a.weight"] = ts["a.weight"].clone()
    changed["a.weight"][0, 0] += 1.0
    save_file(changed, tmp_path / "three.safetensors")

    def digests(p: Path) -> dict[str, str]:
        s = open_source(p)
        return {e.name: s.read(e)[1] for e in s.entries()}

    d1, d2, d3 = (
        digests(tmp_path / f) for f in ("one.safetensors", "two.safetensors", "three.safetensors")
    )
    assert d1 == d2
    assert d1["a.weight"] != d3["a.weight"] and d1["b.weight"] == d3["b.weight"]


def test_sharded_directory_with_index(tmp_path: Path) -> None:
    ts = tensors()
    save_file(
        {k: ts[k] for k in ("a.weight", "c.bias")}, tmp_path / "model-00001-of-00002.safetensors"
    )
    save_file(
        {k: ts[k] for k in ("b.weight", "c.weight", "ids")},
        tmp_path / "model-00002-of-00002.safetensors",
    )
    weight_map = {k: "model-00001-of-00002.safetensors" for k in ("a.weight", "c.bias")}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in ("b.weight", "c.weight", "ids")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    src = open_source(tmp_path)
    assert len(src.files()) == 2
    got = read_all(src)
    assert all(torch.equal(got[k], v) for k, v in ts.items())


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "gone.safetensors"}})
    )
    with pytest.raises(KappaTuneError, match=r"missing files: gone\.safetensors"):
        open_source(tmp_path)


def test_torch_bin_loads_weights_only(tmp_path: Path) -> None:
    ts = tensors()
    torch.save({"state_dict": ts}, tmp_path / "pytorch_model.bin")
    got = read_all(open_source(tmp_path))
    assert set(got) == {f"state_dict.{k}" for k in ts}
    assert torch.equal(got["state_dict.a.weight"], ts["a.weight"])


class _Evil:
    def __reduce__(self):  # would run code on unpickling
        return (print, ("pwned",))


def test_bin_file_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2, 2), "evil": _Evil()}, path)
    with pytest.raises(KappaTuneError, match=r"refusing to load .*weights_only=True"):
        open_source(path).entries()
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(KappaTuneError):
        open_source(raw).entries()


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x01\x02", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 5) + b"{nope"],
)
def test_corrupt_safetensors_header(tmp_path: Path, payload: bytes) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(payload)
    with pytest.raises(KappaTuneError, match="corrupt safetensors file"):
        open_source(p).entries()


def test_truncated_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(tensors(), p)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(KappaTuneError, match="outside the file"):
        open_source(p).entries()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("does/not/exist.safetensors", "no such file or directory"),
        ("nonsense-model", "unknown model 'nonsense-model'"),
        ("owner/not-cached-model", "not a file, a directory, a built-in name"),
    ],
)
def test_unresolvable_sources(spec: str, message: str) -> None:
    with pytest.raises(KappaTuneError, match=message):
        open_source(spec)


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(KappaTuneError, match="no weights found"):
        open_source(tmp_path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    p = tmp_path / "weights.npz"
    p.write_bytes(b"x")
    with pytest.raises(KappaTuneError, match="unsupported file type"):
        open_source(p)


def test_module_source_lists_parameters_once() -> None:
    emb = torch.nn.Embedding(10, 4)
    model = torch.nn.Sequential(emb, torch.nn.Linear(4, 10))
    model[1].weight = emb.weight  # tied
    src = StateDictSource(model)
    assert [e.name for e in src.entries()] == ["0.weight", "1.bias"]


def _write_gguf(path: Path) -> dict[str, np.ndarray]:
    import gguf

    rng = np.random.default_rng(0)
    data = {
        "blk.0.attn_q.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "blk.0.ffn_down.weight": rng.standard_normal((32, 64)).astype(np.float32),
        "output_norm.weight": rng.standard_normal(32).astype(np.float32),
    }
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_tensor("blk.0.attn_q.weight", data["blk.0.attn_q.weight"])
    q = gguf.quants.quantize(data["blk.0.ffn_down.weight"], gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_down.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", data["output_norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data["blk.0.ffn_down.weight"] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    return data


def test_gguf_tensors_are_dequantized_with_hf_names(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    data = _write_gguf(path)
    src = open_source(path)
    assert isinstance(src, GGUFSource)
    entries = {e.name: e for e in src.entries()}
    assert set(entries) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    }
    assert entries["model.layers.0.mlp.down_proj.weight"].dtype == "Q8_0"
    q = src.read(entries["model.layers.0.self_attn.q_proj.weight"])[0]
    d = src.read(entries["model.layers.0.mlp.down_proj.weight"])[0]
    np.testing.assert_array_equal(q.numpy(), data["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(d.numpy(), data["blk.0.ffn_down.weight"])


def test_corrupt_gguf(tmp_path: Path) -> None:
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 3)
    with pytest.raises(KappaTuneError, match="corrupt GGUF file"):
        open_source(p).entries()


def test_gguf_name_mapping() -> None:
    assert (
        gguf_to_hf_name("blk.7.ffn_norm.weight", "gemma3")
        == "model.layers.7.pre_feedforward_layernorm.weight"
    )
    assert (
        gguf_to_hf_name("blk.7.ffn_norm.weight", "llama")
        == "model.layers.7.post_attention_layernorm.weight"
    )
    assert gguf_to_hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("blk.1.something_new.weight", "llama") == "blk.1.something_new.weight"


def test_hugging_face_id_resolves_from_the_local_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("huggingface_hub")
    repo = tmp_path / "hub" / "models--acme--tiny-model"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    save_file({"w.weight": torch.eye(3)}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    src = open_source("acme/tiny-model")
    assert [e.name for e in src.entries()] == ["w.weight"]


def test_fp8_weights_are_read_and_upcast(tmp_path: Path) -> None:
    from kappatune import AnalyzeOptions, analyze

    w = (torch.eye(4) * torch.tensor([1.0, 2.0, 4.0, 8.0])).to(torch.float8_e4m3fn)
    save_file({"l.weight": w}, tmp_path / "m.safetensors")
    a = analyze(tmp_path / "m.safetensors", AnalyzeOptions(use_cache=False))
    assert a.tensors[0].dtype == "float8_e4m3fn"
    assert a.tensors[0].kappa == 8.0
