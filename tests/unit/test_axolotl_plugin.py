"""The Axolotl plugin, loaded and run by Axolotl's own plugin manager and freezing function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kappatune.analysis.spectra import analyze
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.selection.core import select
from tests.unit._tiny_models import save_tiny_model

PLUGIN = "kappatune.integrations.axolotl.KappaTunePlugin"


def _axolotl() -> Any:
    try:
        from axolotl.integrations.base import PluginManager
        from axolotl.integrations.config import merge_input_args
        from axolotl.utils.config import prepare_plugins
        from axolotl.utils.dict import DictDefault
        from axolotl.utils.freeze import freeze_layers_except
    except ImportError as exc:  # the Makefile installs axolotl (no deps) and addict
        print(f"axolotl not importable ({exc}); `pip install --no-deps axolotl addict`")
        pytest.skip(f"axolotl not importable: {exc}")
    return PluginManager, merge_input_args, prepare_plugins, DictDefault, freeze_layers_except


def test_plugin_unfreezes_exactly_the_selection_through_axolotl(tmp_path: Path) -> None:
    manager, merge_input_args, prepare_plugins, dict_default, freeze = _axolotl()
    from transformers import AutoModelForCausalLM

    from kappatune.integrations.axolotl import KappaTuneArgs

    model_dir = save_tiny_model(tmp_path / "tiny")
    cfg = dict_default(
        {"base_model": str(model_dir), "plugins": [PLUGIN], "kappatune_budget_params": "20%"}
    )
    prepare_plugins(cfg)  # Axolotl imports and registers the plugin by its name
    _, input_config = merge_input_args()
    assert issubclass(input_config, KappaTuneArgs)  # the kappatune_* keys join Axolotl's schema
    manager.get_instance().pre_model_load(cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    freeze(model, cfg.unfrozen_parameters)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = select(analyze(model_dir), "lowest-kappa", Budget(params_percent=20))
    assert trainable == set(expected.names) == {"model.embed_tokens.weight"}
    cfg = dict_default({"base_model": str(model_dir), "kappatune_budget_tensors": 3})
    manager.get_instance().plugins[PLUGIN].pre_model_load(cfg)
    assert cfg.unfrozen_parameters == [
        "^model.embed_tokens.weight$",
        "^lm_head.weight$",
        "^model.layers.1.self_attn.v_proj.weight$",
    ]
    with pytest.raises(KappaTuneError, match="sets unfrozen_parameters itself"):
        manager.get_instance().plugins[PLUGIN].pre_model_load(cfg)
    with pytest.raises(KappaTuneError, match="exactly one of kappatune_budget_params"):
        manager.get_instance().plugins[PLUGIN].pre_model_load(
            dict_default({"base_model": str(model_dir)})
        )
