#!/usr/bin/env bash
# The E2E baseline: the same target trained from scratch, same data and logging.
#   sbatch slurm/e2e.sh RECIPE [a.b=c ...]
#SBATCH --job-name=modasm-e2e
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-gpu=8
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
exec bash "${MODASM_ROOT:-$SLURM_SUBMIT_DIR}/slurm/phase.sh" e2e "$@"
