"""``kappatune train`` on two CPU processes: torchrun, DeepSpeed ZeRO-2/3 and FSDP launches.

The single-process parts of the accelerate engine are tested in tests/unit/test_distributed_train.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kappatune.selection.core import Selection
from tests.unit._tiny_models import save_tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STOP_AFTER_CHECKPOINT = """
import sys
from kappatune.training import accelerate_engine as dt
save = dt.AccelerateEngine.save_checkpoint
def save_and_stop(self, out, state):
    save(self, out, state)
    raise SystemExit(3)
dt.AccelerateEngine.save_checkpoint = save_and_stop
from kappatune.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def launch(tmp_path: Path) -> Any:
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    env = {**os.environ, "KAPPATUNE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "COLUMNS": "400"}  # fmt: skip
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(var, None)

    def run(
        out: Path, *launcher: str, script: list[str] | None = None, method: str = "selective"
    ) -> Any:
        launcher = launcher or (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()))  # fmt: skip
        argv = [*launcher, *(script or ["-m", "kappatune.cli.main"]), "-v", "train", str(model),
                "--data", str(data), "-o", str(out), "--steps", "4", "--batch-size", "2",
                "--seq-len", "16", "--lr", "1e-2", "--method", method, "--budget-tensors",
                "3", "--checkpoint-every", "2", *(["--lora-r", "4"] if "lora" in method else [])]  # fmt: skip
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)

    return model, run


def rank_selections(stderr: str) -> dict[int, str]:
    found = re.findall(r"INFO: rank (\d) of 2: selection of \d+ tensors, (\S+)", stderr)
    return {int(r): names for r, names in found}


def check_run(model: Path, out: Path, run: Any) -> Selection:
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "log.jsonl",
        "model",
        "result.json",
        "run.json",
        "selection.json",
    ]
    logged = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]  # rank 0 alone writes the log; a resumed run repeats no step
    sel = Selection.load(out / "selection.json")
    assert rank_selections(run.stderr) == {0: ",".join(sel.names), 1: ",".join(sel.names)}
    before = load_file(str(model / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert sorted(after) == sorted(before)
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == sorted(sel.names)  # frozen tensors bit-identical, selected ones trained
    result = json.loads((out / "result.json").read_text())
    assert (result["steps"], result["processes"], result["trainable_params"]) == (
        4,
        2,
        sel.param_count,
    )
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    assert run.stdout.count("done: 4 steps on 2 processes") == 1  # only rank 0 talks
    return sel


def deepspeed_launch(stage: int) -> list[str]:
    """accelerate launch with DeepSpeed ZeRO-``stage`` on two CPU processes (a fresh port)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--use_deepspeed", "--zero_stage", str(stage), "--zero3_init_flag", "true",
            "--main_process_port", str(_free_port())]  # fmt: skip


def check_resume_is_exact(
    model: Path, run: Any, tmp_path: Path, launcher: Callable[[], list[str]]
) -> Selection:
    """A straight run, and one interrupted right after its step-2 checkpoint and resumed by
    rerunning the command, end with the same weights and the same losses."""
    straight = tmp_path / "straight"
    sel = check_run(model, straight, run(straight, *launcher()))
    resumed = tmp_path / "resumed"
    stopper = tmp_path / "stop_after_checkpoint.py"
    stopper.write_text(STOP_AFTER_CHECKPOINT)
    first = run(resumed, *launcher(), script=[str(stopper)])
    assert first.returncode != 0
    assert sorted(p.name for p in resumed.iterdir()) == [
        "checkpoint",
        "log.jsonl",
        "run.json",
        "selection.json",
    ]
    assert sorted(p.name for p in (resumed / "checkpoint").iterdir()) == [
        "accelerate",
        "loop.json",
        "manifest.json",
    ]
    # one RNG file per rank (accelerate on DeepSpeed-on-CPU would name both "0" and collide)
    assert sorted(
        p.name for p in (resumed / "checkpoint" / "accelerate").glob("random_states_*")
    ) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    second = run(resumed, *launcher())
    assert "resuming from step 2 of 4" in second.stdout, second.stderr[-3000:]
    check_run(model, resumed, second)
    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    losses = [json.loads((d / "result.json").read_text())["losses"] for d in (straight, resumed)]
    assert losses[0] == losses[1]
    return sel


def test_two_process_selective_training_and_resume(launch: Any, tmp_path: Path) -> None:
    model, run = launch
    sel = check_resume_is_exact(model, run, tmp_path, list)  # no launcher: torchrun
    assert sel.entry_count == 3


@pytest.mark.parametrize(("stage", "partitioned"), [(2, "0"), (3, "21")])
def test_two_process_deepspeed_freezes_by_name(
    launch: Any, tmp_path: Path, stage: int, partitioned: str
) -> None:
    """ZeRO-2 and ZeRO-3 (parameters partitioned at load) on CPU; needs deepspeed installed."""
    pytest.importorskip("deepspeed")
    model, run = launch
    out = tmp_path / f"zero{stage}"
    result = run(out, *deepspeed_launch(stage))
    check_run(model, out, result)
    assert "on 2 processes (DEEPSPEED" in result.stdout
    counts = re.findall(r"rank (\d): (\d+) parameters partitioned by ZeRO-3", result.stderr)
    assert sorted(counts) == [("0", partitioned), ("1", partitioned)]  # 21: every tensor


def test_two_process_fsdp_requests_on_cpu(launch: Any, tmp_path: Path) -> None:
    """accelerate switches to FSDP only on accelerators: on CPU an FSDP2 launch trains with
    DDP and the command says so; FSDP1 cannot even start (one clear line)."""
    model, run = launch

    def fsdp(version: int) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--use_fsdp", "--fsdp_version", str(version),
                "--main_process_port", str(_free_port())]  # fmt: skip

    result = run(tmp_path / "fsdp2", *fsdp(2))
    check_run(model, tmp_path / "fsdp2", result)
    assert (
        "note: accelerate runs FSDP only on accelerators; this run uses MULTI_CPU (no sharding)"
        in result.stdout
    )
    if torch.cuda.is_available():
        return
    result = run(tmp_path / "fsdp1", *fsdp(1))
    assert result.returncode != 0
    # accelerate's own reason, in its words: < 1.16 finds no device, 1.16 refuses FSDP's
    # parameter initialisation on CPU
    assert re.search(
        r"kappatune: error: accelerate cannot start this launch configuration: (There are"
        r" currently no available devices found|FSDP parameter initialization with"
        r" `sync_module_states=True` is not supported on cpu)",
        result.stderr,
    )
    assert not (tmp_path / "fsdp1").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_resume_is_exact(launch: Any, tmp_path: Path, stage: int) -> None:
    """An interrupted ZeRO run resumes from its collective checkpoint to the same weights."""
    pytest.importorskip("deepspeed")
    model, run = launch
    check_resume_is_exact(model, run, tmp_path, lambda: deepspeed_launch(stage))


def test_two_process_kappa_lora_under_zero2_and_zero3(launch: Any, tmp_path: Path) -> None:
    """KappaTune-LoRA under DeepSpeed: ZeRO-3 saves the gathered adapter, equal to ZeRO-2's."""
    pytest.importorskip("deepspeed")
    model, run = launch
    adapters = []
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        result = run(out, *deepspeed_launch(stage), method="kappa-lora")
        assert result.returncode == 0, result.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == [
            "adapter",
            "log.jsonl",
            "result.json",
            "run.json",
            "selection.json",
        ]
        adapters.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    sel = Selection.load(tmp_path / "zero3" / "selection.json")
    lora = sorted(k for k in adapters[1] if "lora_" in k)
    modules = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in lora})
    assert modules == sorted(n.removesuffix(".weight") for n in sel.names)
    assert all(adapters[1][k].numel() > 0 for k in lora)  # gathered, not ZeRO-3's shape [0]
    card = (tmp_path / "zero3" / "adapter" / "README.md").read_text()
    config = json.loads((tmp_path / "zero3" / "adapter" / "adapter_config.json").read_text())
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert config["base_model_name_or_path"] == str(model)  # as named, the launch's own path
    assert sorted(adapters[0]) == sorted(adapters[1])
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[0])
