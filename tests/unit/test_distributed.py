import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kappatune.analysis.sharded import balance, launched_world
from kappatune.analysis.source_base import TensorEntry
from kappatune.analysis.spectra import matrix_cost
from tests.conftest import geometric, known_matrix


def test_balance_is_deterministic_longest_first() -> None:
    entries = [TensorEntry(f"t{i}", (100 * (i + 1), 10), "float32") for i in range(5)]
    shares = balance(entries, 2)
    assert [[e.name for e in s] for s in shares] == [["t4", "t1", "t0"], ["t3", "t2"]]
    loads = [sum(matrix_cost(e) for e in s) for s in shares]
    assert max(loads) - min(loads) <= matrix_cost(entries[0])
    assert balance(entries, 2) == shares
    assert sorted(e.name for s in balance(entries, 3) for e in s) == [e.name for e in entries]


def test_launched_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launched_world() == (1, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration  # several processes
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


def test_backend_gloo_on_cpu_nccl_for_device_tensors_on_gpus() -> None:
    from kappatune.analysis.sharded import backend_for

    assert backend_for("cpu", cuda=True, nccl=True) == "gloo"
    assert backend_for("auto", cuda=False, nccl=False) == "gloo"
    assert backend_for("auto", cuda=True, nccl=False) == "gloo"
    assert backend_for("auto", cuda=True, nccl=True) == "cpu:gloo,cuda:nccl"
    assert backend_for("cuda", cuda=True, nccl=True) == "cpu:gloo,cuda:nccl"
