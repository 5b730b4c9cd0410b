"""kappatune: condition-number guided fine-tuning that forgets less.

The library is quiet (it only logs through ``logging.getLogger(__name__)``); the
``kappatune`` command line configures logging and progress output. The analysis API is
imported on first use, so ``import kappatune`` and ``kappatune --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from kappatune.spectra import Analysis, AnalyzeOptions, SkippedRow, SpectrumRow, analyze

__version__ = "0.1.0"

_LAZY = {
    name: "kappatune.spectra"
    for name in ("Analysis", "AnalyzeOptions", "SkippedRow", "SpectrumRow", "analyze")
}

__all__ = [
    "Analysis",
    "AnalyzeOptions",
    "KappaTuneError",
    "SkippedRow",
    "SpectrumRow",
    "__version__",
    "analyze",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kappatune' has no attribute {name!r}")
