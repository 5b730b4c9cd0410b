"""The ``--device`` choice that analyze, train and bench share."""

from __future__ import annotations

import torch

from kappatune.errors import KappaTuneError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is a device, else the CPU; ``cuda`` without one is an error."""
    if name not in DEVICES:
        raise KappaTuneError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise KappaTuneError("--device cuda was asked for but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
