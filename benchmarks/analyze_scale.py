"""How analysis cost grows with model size, up to a 7B-class checkpoint, against PEFT's helper.

For each size (shapes of gemma-3-270m, gemma-3-1b, qwen2.5-3b, qwen2.5-7b, or a JSON shape
file) it writes a synthetic bf16 sharded checkpoint with the real tensor names and shapes and a
seeded known spectrum per matrix (see scale_checkpoint.py; free disk is checked first), then
measures in child processes (wall time, peak RSS from wait4):

* ``kappatune analyze DIR --no-cache`` (full metrics) and ``--kappa-only``;
* PEFT's ``KappaTuneSelector._compute_kappas`` (what ``find_kappa_target_modules`` runs) on the
  same files loaded as a bf16 model; when the whole model does not fit in the memory available,
  the matrices PEFT skips (a side above 16384) stay on the meta device, which changes neither
  what it computes nor what it skips;
* ``kappatune analyze --kappa-only`` restricted to the matrices PEFT analyses (the
  like-for-like time: PEFT's helper, too, yields kappa only).

It reports GFLOP of the exact route (Gram m n^2 + tridiagonal eigensolver 4/3 n^3; kappa-only:
Gram + Cholesky n^3/3), achieved GFLOP/s against this machine's measured float64 syrk peak, and
writes per-size JSON under benchmarks/results/analyze_scale/, a table (.md) and a log-log plot.
The checkpoint is deleted after each size.

    python benchmarks/analyze_scale.py --sizes 270m,1b,3b,7b [--workdir /tmp] [--skip-full]
    python benchmarks/analyze_scale.py --sizes 7b --only full   # one route again, the rest kept
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import scale_checkpoint as sc

RESULTS = Path(__file__).parent / "results" / "analyze_scale"
PEFT_MAX_DIM = 16384
STAGE_NAMES = {"kappatune_kappa_only": "kappa-only", "peft": "peft", "kappatune": "full"}


def run_child(cmd: list[str]) -> tuple[int, float, float, str, str]:
    """(returncode, seconds, peak RSS MiB, stdout, stderr) of one child process (wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, seconds, usage.ru_maxrss / 1024, out.read(), err.read()


def syrk_peak() -> dict[str, float]:
    """Measured float64 syrk GFLOP/s (m n^2 flops) on 1 thread and on every core."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    b = np.random.default_rng(0).standard_normal((8192, 2048))
    out = {}
    for label, limit in (("1 thread", 1), ("all cores", os.cpu_count() or 1)):
        with threadpool_limits(limits=limit):
            b.T @ b
            best = min(_timed(lambda: b.T @ b) for _ in range(3))
        out[label] = 8192 * 2048**2 / best / 1e9
    return out


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def route_gflop(shapes: list[tuple[int, int]], kappa_only: bool) -> float:
    total = 0.0
    for a, b in shapes:
        m, n = max(a, b), min(a, b)
        total += m * n * n + (n**3 / 3 if kappa_only else 4 * n**3 / 3)
    return total / 1e9


def kappatune_run(root: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "kappatune.cli.main", "analyze", str(root), "--no-cache"]
    cmd += ["--top", "0", "--output", str(out), *extra]
    rc, seconds, peak, stdout, stderr = run_child(cmd)
    if rc != 0:
        return {"error": stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {rc}"}
    data = json.loads(out.read_text())
    expected = json.loads((root / "expected_kappa.json").read_text())["kappa"]
    rows = data["tensors"]
    kappas = {r["name"]: float(r["kappa"]) for r in rows}
    shapes = [tuple(r["shape"]) for r in rows]
    inner = re.search(r"skipped, ([0-9.]+) s \(", stdout)
    return {
        "seconds": round(seconds, 2),  # the whole process: start, imports, reads, analysis
        "analysis_seconds": float(inner.group(1)) if inner else None,  # as the CLI reports
        "peak_rss_mib": round(peak, 1),
        "matrices": len(rows),
        "params": sum(int(r["numel"]) for r in rows),
        "methods": sorted({r["method"] for r in rows}),
        "max_rel_err_vs_designed": max(abs(kappas[n] / expected[n] - 1) for n in kappas),
        "shapes": shapes,
    }


PEFT_CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
root, full, max_dim = Path(sys.argv[1]), sys.argv[2] == "full", int(sys.argv[3])
device = torch.device(sys.argv[4])
t0 = time.perf_counter()
if full:
    model = AutoModelForCausalLM.from_pretrained(root, torch_dtype=torch.bfloat16)
else:
    config = AutoConfig.from_pretrained(root)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and max(mod.weight.shape) <= max_dim:
            key = name + ".weight"
            with safe_open(root / index[key], "pt") as f:
                mod.weight = torch.nn.Parameter(f.get_tensor(key).to(device), requires_grad=False)
if full:
    model.to(device)
load = time.perf_counter() - t0
from peft.helpers import KappaTuneSelector
sel = KappaTuneSelector(model, show_progress=False, max_dim_size_to_analyze=max_dim)
t1 = time.perf_counter()
sel._compute_kappas()
seconds = time.perf_counter() - t1
linear = {n + ".weight": tuple(m.weight.shape) for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear)}
print(json.dumps({"load_seconds": load, "seconds": seconds,
                  "kappa": {n + ".weight": k for n, k in sel._condition_numbers.items()},
                  "linear": {n: list(s) for n, s in linear.items()}}))
"""


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def peft_run(root: Path, arch: sc.Arch, full_max_gb: float, device: str) -> dict[str, Any]:
    size = sc.checkpoint_bytes(arch)
    full = size <= full_max_gb * 1024**3 and mem_available() > 1.5 * size + 2 * 1024**3
    mode = "full bf16 model" if full else "bf16 model, skipped matrices on meta"
    why = (
        ""
        if full
        else f"the whole model ({size / 1024**3:.1f} GiB) is above --peft-full-max-gb"
        f" {full_max_gb} or the {mem_available() / 1024**3:.1f} GiB available"
    )
    cmd = [
        sys.executable,
        "-c",
        PEFT_CHILD,
        str(root),
        "full" if full else "meta",
        str(PEFT_MAX_DIM),
        device,
    ]
    rc, wall, peak, stdout, stderr = run_child(cmd)
    if rc != 0:
        return {"error": stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {rc}"}
    data = json.loads(stdout.strip().splitlines()[-1])
    expected = json.loads((root / "expected_kappa.json").read_text())["kappa"]
    analysed = data["kappa"]
    linear = data["linear"]
    skipped = [n for n in linear if n not in analysed]
    all_mats = {n: s for n, s in sc.tensors(arch) if len(s) == 2}
    return {
        "mode": mode,
        "why_not_full": why,
        "seconds": round(data["seconds"], 2),
        "load_seconds": round(data["load_seconds"], 2),
        "wall_seconds": round(wall, 2),
        "peak_rss_mib": round(peak, 1),
        "matrices": len(analysed),
        "params": sum(_numel(all_mats[n]) for n in analysed),
        "skipped_linear": len(skipped),
        "not_analysed_matrices": len(all_mats) - len(analysed),
        "not_analysed_params": sum(_numel(s) for n, s in all_mats.items() if n not in analysed),
        "max_rel_err_vs_designed": max(abs(k / expected[n] - 1) for n, k in analysed.items()),
        "analysed": sorted(analysed),
    }


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def measure_size(spec: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    arch = sc.load_arch(spec)
    out_path = args.results / f"{arch.name}.json"
    result: dict[str, Any] = {"arch": arch.__dict__, "bytes": sc.checkpoint_bytes(arch)}
    if args.only and out_path.exists():  # measure some routes again, keep the others
        kept = json.loads(out_path.read_text())
        if kept.get("arch") == result["arch"]:
            result = kept
    root = Path(tempfile.mkdtemp(prefix=f"kappatune-scale-{arch.name}-", dir=workdir))
    try:
        sc.check_disk(root, arch)
        rc, secs, _, _, err = run_child(
            [sys.executable, __file__, "--write-only", str(root), "--sizes", spec]
        )
        if rc != 0:
            raise SystemExit(err.strip().splitlines()[-1] if err.strip() else f"writer exit {rc}")
        result["write_seconds"] = round(secs, 1)
        _log(f"{arch.name}: wrote {result['bytes'] / 1024**3:.2f} GiB in {secs:.0f} s")
        dev = ["--device", args.device]
        gib = result["bytes"] / 1024**3
        stages: list[tuple[str, list[str] | None]] = [("kappatune_kappa_only", ["--kappa-only"])]
        if args.peft_for is None or spec in args.peft_for.split(","):
            stages.append(("peft", None))
        if not args.skip_full and gib <= args.full_max_gb:
            stages.append(("kappatune", []))
        if args.only:
            stages = [st for st in stages if STAGE_NAMES[st[0]] in args.only]
        os.sync()  # the writer's dirty pages go out before anything is timed
        for rnd in range(args.repeats):  # odd rounds run the routes in reverse order
            for label, extra in stages if rnd % 2 == 0 else stages[::-1]:
                if extra is None and rnd == 0:
                    result["peft"] = peft_run(root, arch, args.peft_full_max_gb, args.device)
                    result["peft"]["measured"] = _provenance()
                    names = result["peft"].get("analysed", [])
                    if names:  # the like-for-like run right after PEFT's: one machine state
                        include = "^(" + "|".join(re.escape(n) for n in names) + ")$"
                        shared = ["--kappa-only", "--include", include, *dev]
                        on_peft = kappatune_run(root, root / "shared.json", shared)
                        result["kappatune_on_peft_matrices"] = {
                            **on_peft,
                            "measured": _provenance(),
                        }
                elif extra is not None:
                    run = kappatune_run(root, root / f"{label}.json", [*extra, *dev])
                    run["measured"] = _provenance()
                    result[label] = _best_of(result.get(label) if rnd else None, run)
                _log(f"{arch.name}: {label} done (round {rnd + 1} of {args.repeats})")
                _save(out_path, result, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _best_of(prev: dict[str, Any] | None, run: dict[str, Any]) -> dict[str, Any]:
    """The faster of two runs of one route, with every run's seconds under ``seconds_all``."""
    if "error" in run:
        return run
    if prev is None or "error" in prev:
        return {**run, "seconds_all": [run["seconds"]]}
    best = prev if prev["seconds"] <= run["seconds"] else run
    return {**best, "seconds_all": [*prev["seconds_all"], run["seconds"]]}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _provenance() -> dict[str, str]:
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _save(path: Path, result: dict[str, Any], args: argparse.Namespace) -> None:
    result.update(_provenance())  # the latest run; each route keeps its own under "measured"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="270m,1b,3b,7b", help="presets or JSON shape files")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--skip-full", action="store_true", help="skip the full-metrics route")
    ap.add_argument("--peft-full-max-gb", type=float, default=4.0)
    ap.add_argument("--full-max-gb", type=float, default=1e9, help="full route up to this size")
    ap.add_argument("--peft-for", help="sizes to measure PEFT on (default: all)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each kappatune route, alternating their order; the fastest is reported",
    )
    ap.add_argument(
        "--only",
        action="append",
        choices=sorted(set(STAGE_NAMES.values())),
        help="measure only these routes (repeatable); the size's other stored routes are kept",
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="for both tools")
    ap.add_argument("--results", type=Path, default=RESULTS, help="per-size JSON folder")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plot")
    ap.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats < 1:
        print(f"error: --repeats must be at least 1, got {args.repeats}", file=sys.stderr)
        return 2
    try:
        archs = [sc.load_arch(s) for s in args.sizes.split(",")]
        if args.write_only:  # child: keeps the measuring parent small
            sc.write_checkpoint(args.write_only, archs[0])
            return 0
        if not args.report_only:
            args.workdir.mkdir(parents=True, exist_ok=True)
            for a in archs:  # every size must fit before anything is written
                sc.check_disk(args.workdir, a)
            peak = syrk_peak()
            args.results.mkdir(parents=True, exist_ok=True)
            (args.results / "machine.json").write_text(json.dumps(_machine(peak), indent=1) + "\n")
            for spec in args.sizes.split(","):
                measure_size(spec, args.workdir, args)
    except (sc.ShapeError, sc.NoSpace) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from scale_report import write_report

    print(write_report(args.results))
    return 0


def _machine(peak: dict[str, float]) -> dict[str, Any]:
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
        "syrk_gflops": {k: round(v, 1) for k, v in peak.items()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    raise SystemExit(main())
