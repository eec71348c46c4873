# Sourced by every slurm/*.sh: the one place for the cluster environment. Edit here, not in the jobs.
#   MODASM_ROOT     the modasm checkout (shared by all nodes); default: where you ran sbatch
#   MODASM_VENV     its virtual environment; default: $MODASM_ROOT/.venv (`make setup`)
#   MODASM_NPROC_PER_NODE  ranks per node; default: the GPUs Slurm gave the job on a node (1 without GPUs)
set -euo pipefail
MODASM_ROOT=${MODASM_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$MODASM_ROOT"
# shellcheck disable=SC1091
source "${MODASM_VENV:-$MODASM_ROOT/.venv}/bin/activate"

# Rendezvous: the batch script runs on the allocation's first node; torchrun's c10d store lives there.
export MASTER_ADDR=${MASTER_ADDR:-$(hostname --ip-address | awk '{print $1}')}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
NPROC_PER_NODE=${MODASM_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

if nvidia-smi -L >/dev/null 2>&1; then
  # NCCL: fail fast on a hung collective instead of waiting for the job's time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # site-specific: export NCCL_SOCKET_IFNAME / NCCL_IB_HCA here for your fabric
else
  export DS_ACCELERATOR=cpu            # no GPU on this node: gloo on CPU (tests, CPU clusters)
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$(ip -o route get "$MASTER_ADDR" 2>/dev/null | awk '{for(i=1;i<NF;i++) if($i=="dev") print $(i+1)}')}
  [ -n "$GLOO_SOCKET_IFNAME" ] || unset GLOO_SOCKET_IFNAME
fi
export PYTHONUNBUFFERED=1

# modasm_launch launch/x.py RECIPE [args]: torchrun on every node of the job.
# Preemption / time limit: sbatch's `--signal=B:USR1@...` reaches this shell only. It touches the stop
# file every rank polls at each optimizer step ($MODASM_STOP_FILE, on the shared checkout); the ranks
# save a checkpoint together and exit 0; then the job requeues itself and the next run resumes.
modasm_launch() {
  export MODASM_STOP_FILE="$MODASM_ROOT/runs/.stop/job-$SLURM_JOB_ID"
  mkdir -p "$(dirname "$MODASM_STOP_FILE")"
  rm -f "$MODASM_STOP_FILE"
  echo "[slurm] job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}" \
       "restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x $NPROC_PER_NODE rank(s): $*"
  MODASM_REQUEUE=0
  trap 'echo "[slurm] USR1: asking the ranks to checkpoint; the job requeues itself"; touch "$MODASM_STOP_FILE"; MODASM_REQUEUE=1' USR1
  # one torchrun per node, given all of the node's CPUs (srun does not inherit sbatch's per-task CPUs)
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES" --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
    torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" "$@" &
  local pid=$! rc=0
  while :; do  # a trapped signal interrupts `wait`; keep waiting until the step really ended
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1
  rm -f "$MODASM_STOP_FILE"
  if [ "$MODASM_REQUEUE" = 1 ] && [ "$rc" = 0 ]; then
    echo "[slurm] checkpoint saved; requeueing job $SLURM_JOB_ID (re-running resumes)"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}
