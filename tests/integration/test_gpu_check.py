"""benchmarks/gpu_check.sh --dry-run on CPU: every step resolves, nothing heavy runs.

About 6 s: the dry run imports each benchmark script and the CLI once to parse its flags.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    "preflight",
    "analyze_speed",
    "analyze_scale_7b",
    "analyze_sharded",
    "train_selective",
    "train_kappa-lora",
    "train_full",
    "bench_digits",
]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path / "gpu"))
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def test_dry_run_resolves_every_step_and_writes_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    names = [ln.split("]")[0][1:] for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert names == STEPS
    assert proc.stdout.splitlines()[-1] == "dry run: 8 steps resolve"
    assert not (tmp_path / "gpu").exists()


def test_a_step_that_does_not_parse_fails_the_dry_run() -> None:
    bad = f"{sys.executable} benchmarks/analyze_speed.py --no-such-flag"
    missing = f"{sys.executable} benchmarks/no_such_script.py"
    cli = f"{sys.executable} -m kappatune.cli.main train m --data d -o o --method nope"
    proc = subprocess.run(
        [sys.executable, "benchmarks/resolve_command.py", bad, missing, cli, "no-such-tool-xyz"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("does not resolve")]
    assert lines == [
        f"does not resolve: {bad}: exit 2 while parsing its arguments",
        f"does not resolve: {missing}: no such script: benchmarks/no_such_script.py",
        f"does not resolve: {cli}: exit 2 while parsing its arguments",
        "does not resolve: no-such-tool-xyz: not on PATH: no-such-tool-xyz",
    ]
