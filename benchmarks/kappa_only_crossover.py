"""Where the kappa-only route (Cholesky + two Lanczos runs) beats the full eigensolver.

For Gram matrices of growing side n (from a seeded 3n x n matrix with a geometric spectrum,
kappa 20), best-of-3 single-thread time of LAPACK syevd (``numpy.linalg.eigvalsh``, today's
full route after the Gram) against ``kappatune.analysis.linalg._gram_extremes``, and the relative
kappa difference between the two.

    python benchmarks/kappa_only_crossover.py [--sizes 256 640 1024 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from kappatune.analysis import linalg

RESULTS = Path(__file__).parent / "results"


def best(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 640, 1024, 2048])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(limits=1):
        for n in args.sizes:
            a = rng.standard_normal((3 * n, n)) * np.geomspace(1.0, 0.05, n)
            g = a.T @ a
            eigs = np.linalg.eigvalsh(g)
            ext = linalg._gram_extremes(g)
            assert ext is not None
            diff = abs(np.sqrt(ext[0] / ext[1]) / np.sqrt(eigs[-1] / eigs[0]) - 1)
            t_full = best(lambda g=g: np.linalg.eigvalsh(g))
            t_ko = best(lambda g=g: linalg._gram_extremes(g))
            rows.append({"n": n, "syevd_s": t_full, "kappa_only_s": t_ko, "rel_kappa_diff": diff})
            print(f"n={n}: syevd {t_full:.4f} s, kappa-only {t_ko:.4f} s ({t_full / t_ko:.2f}x)")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# Kappa-only route against the full eigensolver, after the Gram (1 thread)",
        "",
        f"Command: `{command}` ({date}; load average {os.getloadavg()[0]:.1f}: shared machine)",
        "",
        "| n | syevd s | Cholesky + Lanczos s | speedup | rel. kappa difference |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['n']} | {r['syevd_s']:.4f} | {r['kappa_only_s']:.4f}"
        f" | {r['syevd_s'] / r['kappa_only_s']:.2f}x | {r['rel_kappa_diff']:.1e} |"
        for r in rows
    ]
    (RESULTS / "kappa_only_crossover.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "kappa_only_crossover.json").write_text(
        json.dumps({"command": command, "date": date, "rows": rows}, indent=2) + "\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
