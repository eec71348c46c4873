#!/usr/bin/env bash
# benchmarks/gpu_study.sh: the depth study's GPU twin (studies/gpu-fmnist-depth.yaml; issue 20) on ONE GPU within a
# time budget: width 192, 3 heads, depth 32 and 128 (split [8]*4, [32]*4), 10 % of Fashion-MNIST, bf16 (ZeRO-1,
# fp32 accumulation), the CPU study's schedule and learning rates; cells in the order depth 32 then 128, seed by seed.
# Every finished cell's table, metrics and plots are written under OUT as it goes (OUT/results: README.md with the
# table, summary.json, cells/<cell>/<phase>/metrics.jsonl + manifest.json), so a timeout still returns the finished
# cells; the cell running at the deadline is stopped (it saves at its next step; in a scratch directory).
#
# On a lent GPU machine (Python 3.12 + torch, no DeepSpeed, no network), after benchmarks/gpu_check.sh:
#   here, once:  make gpu-bundle                      -> build/gpu-bundle (wheels + Fashion-MNIST)
#   there:       run(command="bash benchmarks/gpu_study.sh --bundle build/gpu-bundle --out $OUT",
#                    carry=["build/gpu-bundle"], timeout_s=540)
#   then read OUT/gpu_study.md, and copy OUT/results to docs/studies/gpu-fmnist-depth (measured figures only)
# Dry run (CPU, toy sizes, part of the tests): bash benchmarks/gpu_study.sh --dry-run --out /tmp/gpu-study
# Options: --budget SECONDS (default 480: the study is stopped then), PYTHON=... (see benchmarks/gpu_env.sh).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=0; OUT=$ROOT/runs/gpu-study; BUNDLE=""; BUDGET=480
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) OUT=$(realpath -m "$2"); shift ;;
    --bundle) BUNDLE=$(realpath -m "$2"); shift ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "usage: $0 [--dry-run] [--out DIR] [--bundle DIR] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
cd "$ROOT"
# shellcheck source=benchmarks/gpu_env.sh
source "$ROOT/benchmarks/gpu_env.sh"
gpu_python || exit 2
START=$(date +%s)
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
REPORT=$OUT/gpu_study.md
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
FMNIST=/usr/share/datasets/fashion-mnist
[ -n "$BUNDLE" ] && [ -d "$BUNDLE/fashion-mnist" ] && FMNIST=$(cd "$BUNDLE/fashion-mnist" && pwd)
SET=(--set "data.root=$FMNIST")
FIRST=0
if [ $DRY = 1 ]; then
  export DS_ACCELERATOR=cpu
  FIRST=2  # seed 0 at both depths
  # the study's structure at toy sizes (every cell's phases, bf16 ZeRO-1, the budget-matched E2E); figures mean nothing
  for ov in model.embed_dim=32 model.num_heads=2 "model.split=[1,1,1,1]" data.train_limit=256 data.eval_limit=256 \
            meta.epochs=2 incubate.epochs=1 assemble.epochs=1 meta.eval_every_epochs=1 incubate.eval_every_epochs=1 \
            assemble.eval_every_epochs=1 e2e.eval_every_epochs=1 data.eval_batch_size=128; do
    SET+=(--set "$ov")
  done
fi

{
  echo "# GPU depth study ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  if [ $DRY = 1 ]; then
    echo "**Dry run on CPU at toy sizes** (tests/test_gpu_study.py): seed 0 at both depths, every phase; the figures mean nothing."
  else
    echo "\`bash benchmarks/gpu_study.sh\` on commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET} s."
  fi
  echo
  "$PY" - <<'PYEOF'
import platform, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
print(f"device: {dev}; python {platform.python_version()}, torch {torch.__version__}")
PYEOF
} >"$REPORT" 2>&1

if ! gpu_install "$BUNDLE" "$WORK/site" >"$OUT/install.log" 2>&1; then
  { echo; echo "install failed:"; tail -n 5 "$OUT/install.log"; } >>"$REPORT"
  cat "$REPORT"; exit 1
fi
export PYTHONPATH="$PYTHONPATH:$WORK/site"

left=$(( BUDGET - ($(date +%s) - START) ))
[ "$left" -ge 1 ] || left=1  # (timeout 0 would mean no limit)
# SIGTERM at the deadline: the study hands it to the running cell, which saves at its next step and exits
timeout --signal=TERM --kill-after=30 "$left" "$PY" launch/study.py studies/gpu-fmnist-depth.yaml \
  --out-dir "$WORK/runs" --results "$OUT/results" --first "$FIRST" "${SET[@]}" >"$OUT/study.log" 2>&1
rc=$?
{
  echo
  case $rc in
    0) echo "All cells finished in $(( $(date +%s) - START )) s." ;;
    124) echo "Stopped at the budget (${BUDGET} s): the finished cells are below, the one running was cut." ;;
    *) echo "The study stopped with exit $rc (see study.log):"; echo '```'; tail -n 15 "$OUT/study.log"; echo '```' ;;
  esac
  echo
  grep -E "^\[study\] .*(finished|cell [0-9]+/)" "$OUT/study.log" | sed 's/^/    /'
  echo
  if [ -f "$OUT/results/README.md" ]; then sed -n '/^| /,/^$/p' "$OUT/results/README.md"; else echo "(no cell finished)"; fi
} >>"$REPORT"
cat "$REPORT"
[ $rc = 0 ] || [ $rc = 124 ]
