#!/usr/bin/env bash
# Phase 2: incubate the K modules inside the frozen meta model. Two ways:
#   farm:  sbatch --nodes=G slurm/incubate.sh RECIPE [a.b=c ...]
#          one torchrun world over the job's nodes, split into incubate.groups module groups (default: as
#          many as fit, e.g. one per node); group g trains its modules (longest first) independently.
#   array: sbatch --array=0-$((K-1)) slurm/incubate.sh RECIPE [a.b=c ...]
#          one job per module (SLURM_ARRAY_TASK_ID = k): each fails, requeues and resumes alone.
#SBATCH --job-name=modasm-incubate
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-gpu=8
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
exec bash "${MODASM_ROOT:-$SLURM_SUBMIT_DIR}/slurm/phase.sh" incubate "$@"
