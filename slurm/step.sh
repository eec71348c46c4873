#!/usr/bin/env bash
# One task of a job step (slurm/env.sh's srun runs it once per node): the command given, torchrun. It notes a
# SIGTERM from Slurm to the job's steps (a preemption with a GraceTime, `scancel --signal=TERM JOB`) in
# $MODASM_STOP_FILE.term, which tells the batch shell that the ranks saved on a stop request and the job is to
# requeue itself. torchrun's own SIGTERM to its ranks after one of them failed never reaches this shell: then the
# job fails instead of requeueing into the same failure. (torchrun and its ranks get Slurm's signal themselves.)
trap 'touch "$MODASM_STOP_FILE.term"' TERM
"$@"
