"""Parse parameter names: layer index, module type, expert index."""

from __future__ import annotations

_PARAM_SUFFIXES = {"weight", "bias", "qweight", "base_layer"}
_EXPERT_TOKENS = ("expert", "exps")


def layer_index(name: str) -> int | None:
    """First integer component of a dotted name (``model.layers.3.mlp`` -> 3)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def module_type(name: str) -> str:
    """Last non-numeric component before the parameter suffix (``...self_attn.q_proj.weight`` -> q_proj)."""
    parts = [p for p in name.split(".") if p and not p.isdigit()]
    while len(parts) > 1 and parts[-1] in _PARAM_SUFFIXES:
        parts.pop()
    return parts[-1] if parts else name


def is_fused_experts(name: str, ndim: int) -> bool:
    """A 3-D tensor whose name says it stacks experts (experts x out x in)."""
    lowered = name.lower()
    return ndim == 3 and any(tok in lowered for tok in _EXPERT_TOKENS)
