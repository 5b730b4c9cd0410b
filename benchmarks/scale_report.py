"""Table (.md) and log-log plot (.png) from the per-size JSON files of analyze_scale.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analyze_scale import route_gflop

ROUTES = (("kappatune", False), ("kappatune_kappa_only", True))


def _load(results: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    machine = json.loads((results / "machine.json").read_text())
    sizes = []
    for p in sorted(results.glob("*.json")):
        if p.name != "machine.json":
            sizes.append(json.loads(p.read_text()))
    return machine, sorted(sizes, key=lambda d: d["bytes"])


def _commands(sizes: list[dict[str, Any]]) -> list[str]:
    """Every distinct command that measured a stored route, in size order."""
    seen: dict[str, None] = {}
    for d in sizes:
        for key in ("kappatune_kappa_only", "peft", "kappatune"):
            r = d.get(key)
            if r:
                seen[r.get("measured", d)["command"]] = None
    return list(seen)


def _route_cells(d: dict[str, Any], key: str, kappa_only: bool, peak: float) -> list[str]:
    r = d.get(key)
    if not r or "error" in r:
        return ["not run" if not r else r["error"][:40], "", "", "", ""]
    gflop = route_gflop([tuple(s) for s in r["shapes"]], kappa_only)
    rate = gflop / r["seconds"]
    runs = r.get("seconds_all", [r["seconds"]])
    best = f"{r['seconds']:.1f}" + (
        f" (best of {', '.join(f'{x:.1f}' for x in runs)})" if len(runs) > 1 else ""
    )
    return [
        best,
        f"{r['peak_rss_mib']:.0f}",
        f"{gflop:.0f}",
        f"{rate:.1f} ({rate / peak:.0%})",
        f"{r['matrices']} ({r['max_rel_err_vs_designed']:.1e})",
    ]


def write_report(results: Path) -> str:
    machine, sizes = _load(results)
    peak = float(max(machine["syrk_gflops"].values()))
    lines = [
        "# Analysis cost by model size (synthetic bf16 checkpoints with real shapes)",
        "",
        "Commands (each route's own is stored with it in its size's JSON): "
        + "; ".join(f"`{c}`" for c in _commands(sizes)),
        "",
        f"Machine: {machine['machine']}; measured float64 syrk peak:"
        + ", ".join(f" {k} {v} GFLOP/s" for k, v in machine["syrk_gflops"].items()),
        "",
        "GFLOP: Gram m n^2 + eigensolver 4/3 n^3 (full) or Cholesky n^3/3 (kappa-only), n the"
        " smaller side. Rate: GFLOP / wall seconds, and its share of the all-core syrk peak."
        " Matrices (max rel. kappa error vs the designed spectrum; bf16 storage moves kappa by"
        " up to ~0.5 %).",
        "",
        "| model | GiB | route | seconds | peak RSS MiB | GFLOP | GFLOP/s (of peak) | matrices (err) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for d in sizes:
        name, gib = d["arch"]["name"], d["bytes"] / 1024**3
        for key, ko in ROUTES:
            label = "kappatune analyze" + (" --kappa-only" if ko else "")
            lines.append(
                f"| {name} | {gib:.2f} | {label} | "
                + " | ".join(_route_cells(d, key, ko, peak))
                + " |"
            )
    lines += [
        "",
        "## Against PEFT's find_kappa_target_modules (KappaTuneSelector._compute_kappas)",
        "",
        "| model | PEFT load | PEFT seconds | PEFT peak RSS MiB | PEFT matrices | not analysed by PEFT"
        " (matrices / params) | kappatune on PEFT's matrices: s (RSS MiB) | speedup (analysis"
        " alone) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    peft_note = (
        "PEFT seconds: `_compute_kappas` alone (its model load not counted). kappatune seconds:"
        " the whole process (start, imports, reading the files, analysis); in brackets the"
        " speedup against the analysis time the CLI reports."
    )
    for d in sizes:
        p, k = d.get("peft"), d.get("kappatune_on_peft_matrices")
        if not p or "error" in p:
            lines.append(
                f"| {d['arch']['name']} | {'not run' if not p else p['error']} |  |  |  |  |  |  |"
            )
            continue
        ks = f"{k['seconds']:.1f} ({k['peak_rss_mib']:.0f})" if k and "error" not in k else "n/a"
        speed = "n/a"
        if k and "error" not in k:
            speed = f"{p['seconds'] / k['seconds']:.1f}x"
            if k.get("analysis_seconds"):
                speed += f" ({p['seconds'] / k['analysis_seconds']:.1f}x)"
        lines.append(
            f"| {d['arch']['name']} | {p['mode']} | {p['seconds']:.1f} | {p['peak_rss_mib']:.0f}"
            f" | {p['matrices']} | {p['not_analysed_matrices']} / {p['not_analysed_params']:,}"
            f" | {ks} | {speed} |"
        )
    lines += ["", peft_note]
    notes = results / "NOTES.md"  # conditions and reading, written by hand, kept on regeneration
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    text = "\n".join(lines) + "\n"
    (results.parent / "analyze_scale.md").write_text(text)
    _plot(sizes, results.parent / "analyze_scale.png")
    return text


def _plot(sizes: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, label in (
        ("kappatune", "kappatune analyze"),
        ("kappatune_kappa_only", "kappatune --kappa-only"),
        ("peft", "PEFT (matrices it does not skip)"),
    ):
        pts = [
            (d["bytes"] / 2, d[key]["seconds"])
            for d in sizes
            if d.get(key) and "error" not in d[key]
        ]
        if pts:
            ax.loglog(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xlabel("parameters")
    ax.set_ylabel("seconds")
    ax.set_title("analysis time by model size (log-log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plan_table(specs: list[str]) -> str:
    """What each size holds and costs, from the shapes alone (nothing is written or run)."""
    import scale_checkpoint as sc

    lines = [
        "| model | GiB (bf16) | matrices kappatune analyses | their params | GFLOP full route"
        " | GFLOP kappa-only | of these, PEFT's helper leaves out: matrices / params |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for spec in specs:
        arch = sc.load_arch(spec)
        mats = [(n, (int(s[0]), int(s[1]))) for n, s in sc.tensors(arch) if len(s) == 2]

        # PEFT analyses nn.Linear weights with no side above 16384: never the embedding module;
        # a tied lm_head is the embedding's matrix, so that matrix counts as analysed iff it fits
        untied_embed = "" if arch.tied else "model.embed_tokens.weight"
        left = [s for n, s in mats if n == untied_embed or max(s) > 16384]
        shapes = [s for _, s in mats]
        lines.append(
            f"| {arch.name} | {sc.checkpoint_bytes(arch) / 1024**3:.2f} | {len(mats)}"
            f" | {sum(a * b for a, b in shapes):,} | {route_gflop(shapes, False):,.0f}"
            f" | {route_gflop(shapes, True):,.0f}"
            f" | {len(left)} / {sum(a * b for a, b in left):,} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    print(plan_table(sys.argv[1:] or ["270m", "1b", "3b", "7b"]))
