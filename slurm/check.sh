#!/usr/bin/env bash
# The pipeline's last job (CPU only), submitted by pipeline.sh. Two uses:
#   report: after assemble and E2E succeed: writes runs/<run>/report/ (table, plots) and prints the table.
#   check REQUIRED: after a phase failed: prints which phase/module is missing (REQUIRED: all, or assemble
#           without the baseline) and the commands that finish it; exits 1.
#SBATCH --job-name=modasm-check
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=00:30:00
source "${MODASM_ROOT:-$SLURM_SUBMIT_DIR}/slurm/env.sh"
what=$1; shift
if [ "$what" = report ]; then
  python launch/report.py "$(python launch/status.py "$@" --get run_dir)"
else
  required=$1; shift
  echo "[slurm] a phase of this pipeline failed or was cancelled:"
  python launch/status.py "$@" --require "$required"
fi
