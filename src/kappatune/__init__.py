"""kappatune: condition-number guided fine-tuning that forgets less.

The library is quiet (it only logs through ``logging.getLogger(__name__)``); the
``kappatune`` command line configures logging and progress output.
"""

from kappatune.errors import KappaTuneError
from kappatune.spectra import Analysis, AnalyzeOptions, SkippedRow, SpectrumRow, analyze

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "AnalyzeOptions",
    "KappaTuneError",
    "SkippedRow",
    "SpectrumRow",
    "__version__",
    "analyze",
]
