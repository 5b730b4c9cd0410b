"""The ``--device`` choice that analyze, train and bench share."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:  # the device names stay importable without torch (CLI choices)
    import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is a device, else the CPU; ``cuda`` without one is an error."""
    import torch

    if name not in DEVICES:
        raise KappaTuneError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise KappaTuneError("--device cuda was asked for but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=8)
def _has_float64(device: str) -> bool:
    import torch

    try:
        x = torch.ones((2, 2), dtype=torch.float64, device=device)
        return bool(torch.isfinite(x @ x).all())
    except (RuntimeError, TypeError):
        return False


def require_float64(device: torch.device) -> None:
    """Analysis needs float64 on its device (the 1e-9 accuracy bar); one clear error if not."""
    if device.type != "cpu" and not _has_float64(str(device)):
        raise KappaTuneError(
            f"the {device} device does not support float64, which exact spectra need;"
            " use --device cpu"
        )
