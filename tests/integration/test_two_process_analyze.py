"""``kappatune analyze`` sharded over two processes (torchrun, gloo) writes what one process writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.conftest import geometric, known_matrix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_gloo_run_writes_what_one_process_writes(tmp_path: Path) -> None:
    ts = {
        f"model.layers.{i}.mlp.{m}.weight": known_matrix(
            48, 24, geometric(2.0 + i + j, 24), seed=i * 3 + j
        ).float()
        for i in range(3)
        for j, m in enumerate(("gate_proj", "up_proj", "down_proj"))
    }
    ts["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack(
        [known_matrix(16, 8, geometric(k, 8), seed=k) for k in (2, 3, 5, 7)]
    )
    ts["model.norm.weight"] = torch.ones(24)
    save_file(ts, tmp_path / "model.safetensors")
    env = {**os.environ, "KAPPATUNE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single.json"
    sharded = tmp_path / "sharded.json"
    cli = [
        sys.executable,
        "-m",
        "kappatune.cli.main",
        "analyze",
        str(tmp_path / "model.safetensors"),
    ]
    subprocess.run(
        [*cli, "--no-cache", "--output", str(single)], check=True, env=env, capture_output=True
    )
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
    ]
    run = subprocess.run(
        [
            *launcher,
            "-m",
            "kappatune.cli.main",
            "analyze",
            str(tmp_path / "model.safetensors"),
            "--output",
            str(sharded),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(sharded.read_text()) == json.loads(single.read_text())
    assert run.stdout.count("lowest kappa") == 1  # only rank 0 reports
