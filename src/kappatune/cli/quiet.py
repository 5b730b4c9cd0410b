"""Keep third-party start-up noise out of a command's output (the CLI only, never the library).

DeepSpeed announces "Setting accelerator to CPU" through its own stdout handler whenever
something imports it; transformers, PEFT and accelerate emit deprecation warnings about each
other's APIs, advisory warnings (PEFT's save_embedding_layers) and advisory log lines. None of it is about the user's run. :func:`quiet_third_party`
filters exactly those, for the duration of a command, and restores everything afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

_DEEPSPEED_LOGGER = "DeepSpeed"
_DEEPSPEED_NOISE = re.compile(r"^Setting (ds_)?accelerator to ")
_LIBRARIES = r"(transformers|peft|accelerate|deepspeed|torch)(\.|$)"
_ADVISORIES = (r"Setting `save_embedding_layers` to `True`",)  # PEFT, saving an embedding LoRA


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Drop DeepSpeed's accelerator notice and the libraries' deprecation warnings."""
    ds_filter = _DropMatching(_DEEPSPEED_NOISE)
    ds_logger = logging.getLogger(_DEEPSPEED_LOGGER)  # the logger DeepSpeed attaches to later
    ds_logger.addFilter(ds_filter)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=_LIBRARIES)
            for message in _ADVISORIES:
                warnings.filterwarnings("ignore", message=message, module=_LIBRARIES)
            yield
    finally:
        ds_logger.removeFilter(ds_filter)


def quiet_transformers() -> None:
    """For commands that report progress themselves: transformers' bars and advisory log lines
    would interleave (imports transformers; call it from a command that uses it anyway)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the command reports the missing extra itself, in one line
        return

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
