"""Sharded analysis across processes (``torchrun`` / ``accelerate launch``).

Every rank plans the same analysis from the checkpoint files, computes a cost-balanced
share of the tensors (through the shared, atomically written cache), and rank 0 gathers
the per-tensor payloads and assembles exactly the Analysis a single process would.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from kappatune.analysis.source_base import Source, TensorEntry
from kappatune.analysis.spectra import (
    Analysis,
    AnalyzeOptions,
    Computed,
    ProgressHook,
    assemble,
    compute,
    matrix_cost,
    plan,
)
from kappatune.errors import KappaTuneError

_ERROR_KEY = "__kappatune_error__"


def launched_world() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun/accelerate with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return (rank, world) if world > 1 else None


def balance(entries: Sequence[TensorEntry], world: int) -> list[list[TensorEntry]]:
    """Longest-processing-time assignment by estimated cost; deterministic (ties by name, rank)."""
    shares: list[list[TensorEntry]] = [[] for _ in range(world)]
    loads = [0.0] * world
    for e in sorted(entries, key=lambda x: (-matrix_cost(x), x.name)):
        r = min(range(world), key=lambda i: (loads[i], i))
        shares[r].append(e)
        loads[r] += matrix_cost(e)
    return shares


def backend_for(device: str, cuda: bool, nccl: bool) -> str:
    """gloo on CPU; on GPUs NCCL for device tensors and gloo for the row objects that are
    gathered to rank 0 (torch sends object collectives over the ``cpu`` backend)."""
    return "cpu:gloo,cuda:nccl" if device != "cpu" and cuda and nccl else "gloo"


def _init_process_group(device: str) -> None:
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        backend = backend_for(device, cuda, cuda and dist.is_nccl_available())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))


def analyze_sharded(
    source: str | os.PathLike[str] | Source | torch.nn.Module | Mapping[str, torch.Tensor],
    options: AnalyzeOptions | None = None,
    progress: ProgressHook | None = None,
) -> Analysis | None:
    """Run one rank's share; rank 0 returns the full Analysis, other ranks return None."""
    options = options or AnalyzeOptions()
    if options.device != "cpu" and torch.cuda.is_available():  # before NCCL sees the device
        local = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))
        torch.cuda.set_device(int(local) % torch.cuda.device_count())
    _init_process_group(options.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    the_plan = plan(source, options)
    part: Computed | dict[str, str]
    try:
        part = compute(
            the_plan, options, only=balance(the_plan.candidates, world)[rank], progress=progress
        )
    except KappaTuneError as exc:
        part = {_ERROR_KEY: f"rank {rank}: {exc}"}
    gathered: list[Any] | None = [None] * world if rank == 0 else None  # each rank's part
    dist.gather_object(part, gathered, dst=0)
    if _ERROR_KEY in part:
        raise KappaTuneError(str(part[_ERROR_KEY]))
    if rank != 0:
        return None
    assert gathered is not None
    merged: Computed = {}
    for g in gathered:
        if _ERROR_KEY in g:
            raise KappaTuneError(str(g[_ERROR_KEY]))
        merged.update(g)
    return assemble(the_plan, merged, options)
