#!/usr/bin/env bash
# Phase 3: assemble the K incubated modules and fine-tune end to end (DeepSpeed; multi-node srun torchrun).
#   sbatch slurm/assemble.sh RECIPE [a.b=c ...]        (refuses to start while a module is missing)
#SBATCH --job-name=modasm-assemble
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-gpu=8
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
exec bash "${MODASM_ROOT:-$SLURM_SUBMIT_DIR}/slurm/phase.sh" assemble "$@"
