#!/usr/bin/env bash
# Every GPU check in one command (about 8 minutes on one GPU); results under benchmarks/results/gpu/.
#
#   bash benchmarks/gpu_check.sh            # run everything (needs a CUDA device with float64)
#   bash benchmarks/gpu_check.sh --dry-run  # print each step and check it resolves; runs nothing heavy
#
# Steps: analysis speed on CUDA against PEFT's helper on CUDA; the 7B-class synthetic analysis
# on the GPU; sharded analysis under torchrun (NCCL, one process per visible GPU); a few
# selective, KappaTune-LoRA and full fine-tuning steps; the smallest bench preset (digits, one
# seed). Each step has its own time limit and log; summary.md lists status and seconds.
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ $# -gt 0 && $DRY -eq 0 ]]; then
  echo "gpu_check.sh: unknown argument '$1' (only --dry-run)" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-benchmarks/results/gpu}"
NGPU="${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
[[ "$NGPU" -ge 1 ]] 2>/dev/null || NGPU=1
DATA="$OUT/train.txt"

STEPS=()  # "name|seconds|command"
STEPS+=("preflight|30|$PY -m kappatune.cli.main env")
STEPS+=("analyze_speed|90|$PY benchmarks/analyze_speed.py --device cuda --repeat 3 --output $OUT/analyze_speed")
STEPS+=("analyze_scale_7b|240|$PY benchmarks/analyze_scale.py --sizes 7b --skip-full --device cuda --results $OUT/analyze_scale")
STEPS+=("analyze_sharded|60|$PY benchmarks/analyze_sharded.py --nproc $NGPU --repeat 1 --output $OUT/analyze_sharded")
for m in selective kappa-lora full; do
  STEPS+=("train_$m|45|$PY -m kappatune.cli.main train gemma-3-270m --data $DATA --method $m --budget-params 1% --steps 3 --batch-size 4 --seq-len 128 --device cuda -o $OUT/train-$m")
done
STEPS+=("bench_digits|90|$PY -m kappatune.cli.main bench digits --seeds 0 --device cuda --output $OUT/bench")

if [[ $DRY -eq 1 ]]; then
  cmds=()
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name secs cmd <<<"$s"
    echo "[$name] (limit ${secs}s) $cmd"
    cmds+=("$cmd")
  done
  command -v nvidia-smi >/dev/null || echo "note: nvidia-smi not found (NGPU=$NGPU)"
  PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/resolve_command.py "${cmds[@]}" || exit 2
  echo "dry run: ${#STEPS[@]} steps resolve"
  exit 0
fi

"$PY" - <<'PYEOF' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device is available")
try:
    torch.ones(2, dtype=torch.float64, device="cuda").sum().item()
except (RuntimeError, TypeError):
    sys.exit("gpu_check.sh: the CUDA device does not support float64")
PYEOF
mkdir -p "$OUT"
"$PY" -c "import pydoc_data.topics as t; print('\n\n'.join(t.topics[k] for k in sorted(t.topics)[:60]))" >"$DATA"
summary="$OUT/summary.md"
{ echo "# GPU check"; echo; echo "Command: \`bash benchmarks/gpu_check.sh\` ($(date -u +%FT%TZ), $NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"; echo;
  echo "| step | status | seconds |"; echo "|---|---|---:|"; } >"$summary"
failed=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r name secs cmd <<<"$s"
  echo "[$name] $cmd"
  start=$(date +%s)
  timeout "$secs" bash -c "$cmd" >"$OUT/$name.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  status=ok; [[ $rc -eq 124 ]] && status="timed out (${secs}s)"; [[ $rc -ne 0 && $rc -ne 124 ]] && status="failed (exit $rc)"
  [[ $rc -ne 0 ]] && failed=$((failed + 1)) && tail -3 "$OUT/$name.log"
  echo "| $name | $status | $took |" >>"$summary"
done
cat "$summary"
[[ $failed -eq 0 ]]
