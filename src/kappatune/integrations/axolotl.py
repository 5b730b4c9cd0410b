"""Axolotl plugin: let Axolotl train only the lowest-kappa matrices, chosen at start-up.

In the Axolotl YAML::

    base_model: ./my-model            # or a built-in name kappatune knows, or a cached hub id
    plugins:
      - kappatune.integrations.axolotl.KappaTunePlugin
    kappatune_budget_params: 5%       # or kappatune_budget_tensors: 20
    kappatune_policy: lowest-kappa    # optional, as `kappatune select --policy`

Before the model is loaded, the plugin analyses ``base_model`` (or ``kappatune_model``),
selects with kappatune's policy and budget rules and sets ``unfrozen_parameters``, which
Axolotl's own ``freeze_layers_except`` then applies, as it does for Spectrum's plugin.
Axolotl imports this module; kappatune itself never does.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from kappatune.selection.budget import Budget

Config = MutableMapping[str, Any]  # Axolotl's configuration (a DictDefault): YAML values


class KappaTuneArgs(BaseModel):
    """The ``kappatune_*`` keys Axolotl accepts once the plugin is listed."""

    kappatune_model: str | None = None
    kappatune_policy: str = "lowest-kappa"
    kappatune_budget_params: str | None = None
    kappatune_budget_tensors: int | None = None
    kappatune_fill: str = "prefix"
    kappatune_seed: int = 0


def _budget(cfg: Config) -> Budget:
    from kappatune.selection.budget import Budget

    params, tensors = cfg.get("kappatune_budget_params"), cfg.get("kappatune_budget_tensors")
    if (params is None) == (tensors is None):
        raise KappaTuneError(
            "the kappatune plugin needs exactly one of kappatune_budget_params and"
            " kappatune_budget_tensors"
        )
    return Budget.parse_params(str(params)) if tensors is None else Budget(tensors=int(tensors))


def unfrozen_parameters(cfg: Config) -> list[str]:
    """Axolotl ``unfrozen_parameters`` for the configuration's model, policy and budget."""
    from kappatune.analysis.spectra import analyze
    from kappatune.selection.budget import SelectOptions
    from kappatune.selection.core import select
    from kappatune.selection.exports import axolotl_patterns
    from kappatune.selection.policies import policy_spec
    from kappatune.training.layout import model_type_of
    from kappatune.training.models import analysis_source

    source = cfg.get("kappatune_model") or cfg.get("base_model")
    if not source:
        raise KappaTuneError("the kappatune plugin needs base_model (or kappatune_model)")
    policy = cfg.get("kappatune_policy") or "lowest-kappa"
    if policy_spec(policy).needs_scores:
        raise KappaTuneError(
            f"the kappatune plugin does not run the {policy} policy (it needs Fisher-type scores)"
        )
    options = SelectOptions(
        seed=int(cfg.get("kappatune_seed") or 0), fill=cfg.get("kappatune_fill") or "prefix"
    )
    selection = select(analyze(analysis_source(source)), policy, _budget(cfg), options)
    return axolotl_patterns(selection, model_type_of(source))


class KappaTunePlugin(BasePlugin):  # type: ignore[misc]
    """Sets ``unfrozen_parameters`` to the kappatune selection before the model loads."""

    def get_input_args(self) -> str:
        return "kappatune.integrations.axolotl.KappaTuneArgs"

    def pre_model_load(self, cfg: Config) -> None:
        if cfg.get("unfrozen_parameters"):
            raise KappaTuneError(
                "the kappatune plugin sets unfrozen_parameters itself; remove them from the config"
            )
        cfg["unfrozen_parameters"] = unfrozen_parameters(cfg)
