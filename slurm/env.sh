# Sourced by slurm/phase.sh (every phase job): the one place for the cluster environment. Edit here, not in the jobs.
#   MODASM_ROOT         the modasm checkout (shared by all nodes); default: where you ran sbatch
#   MODASM_VENV         its virtual environment; default: $MODASM_ROOT/.venv (`make setup`)
#   MODASM_NPROC_PER_NODE  ranks per node; default: the GPUs Slurm gave the job on a node (1 without GPUs)
#   MODASM_MASTER_ADDR  the rendezvous host; default: the job's first node (scontrol show hostnames)
set -euo pipefail
MODASM_ROOT=${MODASM_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$MODASM_ROOT"
# shellcheck disable=SC1091
source "${MODASM_VENV:-$MODASM_ROOT/.venv}/bin/activate"

# The rendezvous host: the first node of the allocation (the batch script runs there; torchrun's c10d store
# lives there). Not `hostname --ip-address`: on Debian-family hosts that is 127.0.1.1, unreachable from the
# other nodes. Sites whose node names do not resolve on the fabric set MODASM_MASTER_ADDR.
modasm_master_addr() {
  if [ -n "${MODASM_MASTER_ADDR:-}" ]; then echo "$MODASM_MASTER_ADDR"; return; fi
  scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}" | head -n 1
}
export MASTER_ADDR=${MASTER_ADDR:-$(modasm_master_addr)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
NPROC_PER_NODE=${MODASM_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}

if nvidia-smi -L >/dev/null 2>&1; then
  # NCCL: fail fast on a hung collective instead of waiting for the job's time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # site-specific: export NCCL_SOCKET_IFNAME / NCCL_IB_HCA here for your fabric
else
  export DS_ACCELERATOR=cpu            # no GPU on this node: gloo on CPU (tests, CPU clusters)
  # gloo binds to the interface that routes to the rendezvous host
  master_ip=$(getent ahostsv4 "$MASTER_ADDR" 2>/dev/null | awk 'NR == 1 {print $1}')
  GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$(ip -o route get "${master_ip:-$MASTER_ADDR}" 2>/dev/null | awk '{for(i=1;i<NF;i++) if($i=="dev") print $(i+1)}')}
  if [ -n "$GLOO_SOCKET_IFNAME" ]; then export GLOO_SOCKET_IFNAME; else unset GLOO_SOCKET_IFNAME; fi
fi
export PYTHONUNBUFFERED=1

# modasm_launch [--per-node] launch/x.py RECIPE [args]: torchrun on every node of the job, as one world (one
# rendezvous on the first node), or with --per-node one torchrun per node, each its own world and rendezvous,
# told `--part i/N` (a farmed incubation: no node's group depends on another node's torchrun).
# Preemption, scancel and the time limit: SIGTERM (scancel, preemption; torchrun forwards it to its ranks) and
# sbatch's `--signal=B:USR1@...` (this shell only) both touch the stop file every rank polls at each optimizer
# step ($MODASM_STOP_FILE, on the shared checkout): the ranks save a checkpoint together at their next step and
# exit; then the job requeues itself and the next run resumes at that step.
modasm_launch() {
  local per_node=0
  if [ "$1" = --per-node ]; then per_node=1; shift; fi
  export MODASM_STOP_FILE="$MODASM_ROOT/runs/.stop/job-$SLURM_JOB_ID"
  mkdir -p "$(dirname "$MODASM_STOP_FILE")"
  rm -f "$MODASM_STOP_FILE" "$MODASM_STOP_FILE.saved"
  echo "[slurm] job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}" \
       "restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x $NPROC_PER_NODE rank(s)" \
       "$([ $per_node = 1 ] && echo "(one torchrun per node)"), rendezvous $MASTER_ADDR:$MASTER_PORT: $(modasm_redact "$*")"
  MODASM_REQUEUE=0
  trap 'modasm_stop USR1' USR1
  trap 'modasm_stop TERM' TERM
  # each torchrun gets all of its node's CPUs (srun does not inherit sbatch's per-task CPUs)
  local step=(srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}")
  local pids=() i
  if [ $per_node = 1 ]; then
    for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
      "${step[@]}" --nodes=1 --ntasks=1 --relative="$i" \
        torchrun --standalone --nproc-per-node="$NPROC_PER_NODE" "$@" --part "$i/$SLURM_JOB_NUM_NODES" &
      pids+=($!)
    done
  else
    "${step[@]}" --ntasks="$SLURM_JOB_NUM_NODES" \
      torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$NPROC_PER_NODE" \
      --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" "$@" &
    pids+=($!)
  fi
  local rc=0 r pid
  for pid in "${pids[@]}"; do
    while :; do  # a trapped signal interrupts `wait`; keep waiting until the step really ended
      wait "$pid" && r=0 || r=$?
      kill -0 "$pid" 2>/dev/null || break
    done
    [ "$r" = 0 ] || rc=$r
  done
  trap - USR1 TERM
  # requeue when this shell got the signal, or when ranks saved on a signal only they got (scancel --signal=TERM
  # without --full/--batch): the next run resumes from the newest complete checkpoint
  [ -e "$MODASM_STOP_FILE.saved" ] && MODASM_REQUEUE=1
  rm -f "$MODASM_STOP_FILE" "$MODASM_STOP_FILE.saved"
  if [ "$MODASM_REQUEUE" = 1 ]; then
    echo "[slurm] requeueing job $SLURM_JOB_ID (re-running resumes from the newest complete checkpoint)"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}

# modasm_redact TEXT: TEXT with the value of every secret-looking environment variable (TOKEN, SECRET, PASSWORD,
# API_KEY, ...; 8 characters or more) replaced by $NAME, as modasm/redact.py does for everything the run writes.
modasm_redact() {
  local text=$1 name value
  while IFS= read -r name; do
    value=${!name-}
    if [ ${#value} -ge 8 ]; then text=${text//"$value"/\$$name}; fi
  done < <(compgen -e | grep -iE 'TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH')
  printf '%s\n' "$text"
}

modasm_stop() {
  echo "[slurm] $1: asking the ranks to checkpoint at their next step; the job requeues itself"
  touch "$MODASM_STOP_FILE"
  MODASM_REQUEUE=1
}
