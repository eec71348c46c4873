#!/usr/bin/env bash
# Phase 1: pre-train the meta model.     sbatch slurm/meta.sh RECIPE [a.b=c ...]
# Sized for one 8-GPU node; change the lines below or pass sbatch flags (e.g. --nodes=4).
#SBATCH --job-name=modasm-meta
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-gpu=8
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
exec bash "${MODASM_ROOT:-$SLURM_SUBMIT_DIR}/slurm/phase.sh" meta "$@"
