"""What ``analyze`` analyses and how: :class:`AnalyzeOptions`, importable without torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kappatune.devices import DEVICES
from kappatune.errors import KappaTuneError
from kappatune.settings import check_regexes, setting

if TYPE_CHECKING:
    import torch

DEFAULT_BLOCK_ROWS = 8192  # rows of a matrix streamed per block (kappatune.analysis.linalg)
_NOT_RESULTS = "how the same numbers are computed or stored, not which numbers"


@dataclass(frozen=True)
class AnalyzeOptions:
    """What to analyse and how. Validated on construction."""

    include: str | None = setting(None, help="analyse only tensors whose name matches this regex")
    exclude: str | None = setting(None, help="skip tensors whose name matches this regex")
    max_dim: int | None = setting(
        None, help="skip matrices with a dimension above this (off by default)"
    )
    device: str = setting("auto", help=f"{', '.join(DEVICES[:-1])} or {DEVICES[-1]}")
    workers: int = setting(
        0,
        help="parallel workers (default: cores, max 4)",  # 0: one per core (at most 4), 1 on GPU
        key=False,
        why="threads share out whole matrices; each matrix's numbers are the same",
    )
    use_cache: bool = setting(
        True,
        flag="--no-cache",
        help="neither read nor write the result cache",
        key=False,
        why=_NOT_RESULTS,
    )
    cache_dir: Path | None = setting(
        None, help="cache directory (default: ~/.cache/kappatune)", key=False, why=_NOT_RESULTS
    )
    verify_cache: bool = setting(
        False,
        help="hash every tensor instead of trusting unchanged file stats (slower second runs)",
        key=False,
        why=_NOT_RESULTS,
    )
    block_rows: int = setting(
        DEFAULT_BLOCK_ROWS, cli=False, help="rows of a streamed matrix per block"
    )
    memory_budget_mb: int = setting(
        768,
        cli=False,
        help="memory the workers' tensors, blocks and Grams hold together (kappatune.analysis.memory)",
    )
    kappa_only: bool = setting(
        False,
        help="compute only kappa, sigma_max and sigma_min (faster on CPU; the other metrics "
        "are left empty)",
    )

    def __post_init__(self) -> None:
        check_regexes(include=self.include, exclude=self.exclude)
        if self.max_dim is not None and self.max_dim < 1:
            raise KappaTuneError(f"--max-dim must be at least 1, got {self.max_dim}")
        if self.device not in DEVICES:
            raise KappaTuneError(
                f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}"
            )
        if self.workers < 0 or self.workers > 256:
            raise KappaTuneError(f"--workers must be between 0 and 256, got {self.workers}")
        if self.block_rows < 1:
            raise KappaTuneError(f"block_rows must be at least 1, got {self.block_rows}")
        if self.memory_budget_mb < 16:
            raise KappaTuneError(
                f"memory budget must be at least 16 MB, got {self.memory_budget_mb}"
            )

    def torch_device(self) -> torch.device:
        from kappatune.devices import require_float64, resolve_device

        device = resolve_device(self.device)
        require_float64(device)
        return device

    def worker_count(self, device: torch.device) -> int:
        if self.workers:
            return self.workers
        return 1 if device.type != "cpu" else max(1, min(4, os.cpu_count() or 1))
