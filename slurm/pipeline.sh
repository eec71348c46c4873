#!/usr/bin/env bash
# Submit a whole pipeline: meta -> incubate -> assemble, the E2E baseline in parallel, then a report.
# A recipe whose assemble starts from another run's target (assemble.init_from: the high-resolution fine-tunes)
# has no meta model or incubation: only assemble and e2e are submitted.
#   slurm/pipeline.sh [--array | --farm-nodes N] [--no-e2e] RECIPE [a.b=c ...]
#     (default) incubation farmed over one job (slurm/incubate.sh's #SBATCH nodes; --farm-nodes N for N <= K,
#               checked before anything is submitted)
#     --array   one incubation job per module (each fails, requeues and resumes alone)
#     --no-e2e  skip the baseline
# Extra sbatch flags for every job (partition, account, ...): MODASM_SBATCH="--partition=gpu --account=me".
# Each job waits for the previous with --dependency=afterok; a failed phase cancels the jobs after it and
# runs the check job, whose log says what is missing and the commands that finish it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=farm nodes="" nodes_set=0 e2e=1
while [ $# -gt 0 ]; do
  case $1 in
    --array) mode=array; shift ;;
    --farm-nodes) nodes=${2-} nodes_set=1; shift $(($# > 1 ? 2 : 1)) ;;
    --no-e2e) e2e=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { sed -n '2,12p' "$0"; exit 2; }
if [ $nodes_set = 1 ] && ! [[ $nodes =~ ^[1-9][0-9]*$ ]]; then
  echo "slurm/pipeline.sh: --farm-nodes '$nodes' is not a number of nodes (e.g. --farm-nodes 2)" >&2; exit 2
fi
if [ $nodes_set = 1 ] && [ "$mode" = array ]; then
  echo "slurm/pipeline.sh: --array and --farm-nodes $nodes are alternatives (one job per module, or one farm job over" \
       "N nodes): give one of them" >&2; exit 2
fi
py=${MODASM_VENV:-.venv}/bin/python
farm=()  # a farm over N nodes must fit the recipe (N <= K, groups a multiple of N): checked before anything runs
[ "$mode" = farm ] && [ -n "$nodes" ] && farm=(--farm-nodes "$nodes")
K=$("$py" launch/status.py "$@" ${farm[@]+"${farm[@]}"} --get K)   # also validates the recipe and overrides before submitting
run_dir=$("$py" launch/status.py "$@" --get run_dir)
init_from=$("$py" launch/status.py "$@" --get init_from)
logs="$run_dir/slurm"
mkdir -p "$logs"
# shellcheck disable=SC2086
submit() { sbatch --parsable ${MODASM_SBATCH:-} "$@" | cut -d';' -f1; }

after=""
if [ -z "$init_from" ]; then
  meta=$(submit --output="$logs/meta-%j.out" slurm/meta.sh "$@")
  if [ "$mode" = array ]; then
    inc=$(submit --dependency="afterok:$meta" --kill-on-invalid-dep=yes --array="0-$((K - 1))" \
          --output="$logs/incubate-%A_%a.out" slurm/incubate.sh "$@")
  else
    inc=$(submit --dependency="afterok:$meta" --kill-on-invalid-dep=yes ${nodes:+--nodes=$nodes} \
          --output="$logs/incubate-%j.out" slurm/incubate.sh "$@")
  fi
  after="--dependency=afterok:$inc --kill-on-invalid-dep=yes"
fi
# shellcheck disable=SC2086
asm=$(submit $after --output="$logs/assemble-%j.out" slurm/assemble.sh "$@")
last="afterok:$asm" failed="afternotok:$asm" required=assemble
if [ "$e2e" = 1 ]; then
  base=$(submit --output="$logs/e2e-%j.out" slurm/e2e.sh "$@")
  last="afterok:$asm:$base" failed="afternotok:$asm?afternotok:$base" required=all
fi
report=$(submit --dependency="$last" --kill-on-invalid-dep=yes --output="$logs/report-%j.out" slurm/check.sh report "$@")
check=$(submit --dependency="$failed" --kill-on-invalid-dep=yes --output="$logs/check-%j.out" slurm/check.sh check "$required" "$@")

[ -n "$init_from" ] && mode=none
echo "submitted pipeline $(basename "$run_dir") (K=$K, incubation: $mode)"
if [ -z "$init_from" ]; then
  echo "  meta      $meta"
  echo "  incubate  $inc$([ "$mode" = array ] && echo " (array 0-$((K - 1)))")"
else
  echo "  (no meta model or incubation: assemble fine-tunes $init_from)"
fi
echo "  assemble  $asm"
[ "$e2e" = 1 ] && echo "  e2e       $base"
echo "  report    $report   (runs when assemble${base:+ and e2e} succeed)"
echo "  check     $check   (runs only if a phase fails: says what is missing and how to finish it)"
echo "logs:    $logs/"
echo "results: $run_dir/{meta,incubate,assemble,e2e}/ (shards in export/, metrics.jsonl), report: $run_dir/report/report.md"
echo "status:  $py launch/status.py $*      W&B: $run_dir/wandb/ (offline; wandb sync)"
echo "jobs:   ${meta:+ $meta}${inc:+ $inc} $asm${base:+ $base} $report $check"
