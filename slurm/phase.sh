#!/usr/bin/env bash
# One phase of the pipeline as a Slurm job: the body behind meta.sh, incubate.sh, assemble.sh, e2e.sh (which carry
# the #SBATCH lines and `exec` this script, so it stays the batch shell that gets the signals).
#   slurm/phase.sh meta|incubate|assemble|e2e RECIPE [a.b=c ...]
phase=${1:?usage: slurm/phase.sh meta|incubate|assemble|e2e RECIPE [a.b=c ...]}
shift
case $phase in
  meta|incubate|assemble|e2e) ;;
  *) echo "slurm/phase.sh: unknown phase '$phase' (meta, incubate, assemble or e2e)" >&2; exit 2 ;;
esac
source "${MODASM_ROOT:-$SLURM_SUBMIT_DIR}/slurm/env.sh"
one_module=0  # --module k (or an array task): one module, one torchrun world over all the job's nodes
[ -n "${SLURM_ARRAY_TASK_ID:-}" ] && one_module=1
for arg in "$@"; do case $arg in --module|--module=*) one_module=1 ;; esac; done
if [ "$phase" = incubate ] && [ $one_module = 0 ] && [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; then
  modasm_launch --per-node launch/incubate.py "$@"   # a farm: one torchrun per node (its own rendezvous)
else
  modasm_launch "launch/$phase.py" "$@"   # incubate.py reads SLURM_ARRAY_TASK_ID itself (array mode)
fi
