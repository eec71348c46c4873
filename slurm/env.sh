# Sourced by slurm/phase.sh (every phase job): the one place for the cluster environment. Edit here, not in the jobs.
#   MODASM_ROOT         the modasm checkout (shared by all nodes); default: where you ran sbatch
#   MODASM_VENV         its virtual environment; default: $MODASM_ROOT/.venv (`make setup`)
#   MODASM_NPROC_PER_NODE  ranks per node; default: the GPUs Slurm gave the job on a node (1 without GPUs)
#   MODASM_MASTER_ADDR  the rendezvous host; default: the job's first node (scontrol show hostnames)
#   MODASM_STOP_TIMEOUT seconds the ranks have to save after the time limit's USR1 before their steps are killed and
#                       the job requeues all the same (a hung rank); default 240, under the scripts' --signal=B:USR1@300
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
# How a running job ends early (docs/method.md, "Preemption and requeue"):
#   USR1 to this shell (sbatch's --signal=B:USR1@300, five minutes before the time limit): it touches the stop file
#     every rank polls at each optimizer step ($MODASM_STOP_FILE, on the shared checkout); the ranks save together
#     at their next step and exit, and the job requeues itself. Steps still running MODASM_STOP_TIMEOUT seconds
#     later (a hung rank) are killed, and the job requeues all the same (the rerun resumes from the newest complete
#     checkpoint).
#   SIGTERM to the job's steps only (a preemption with a GraceTime; scancel --signal=TERM JOB): the ranks get it and
#     save at their next step; slurm/step.sh notes it, and the job requeues itself.
#   SIGTERM to this shell (scancel JOB, the time limit reached, the end of a preemption's grace time): the job is
#     ending; it does not requeue itself.
#   A step that exits non-zero on its own (a rank failed; torchrun stops the others with SIGTERM, and they may
#     save): the job ends FAILED, the ranks' errors as the last lines of its log; never requeued (a failure that
#     recurs would requeue forever).
MODASM_STOP_TIMEOUT=${MODASM_STOP_TIMEOUT:-240}
if ! [[ $MODASM_STOP_TIMEOUT =~ ^[1-9][0-9]*$ ]]; then
  echo "slurm/env.sh: MODASM_STOP_TIMEOUT='$MODASM_STOP_TIMEOUT' must be a whole number of seconds (how long the ranks" \
       "may take to save after the time limit's USR1; default 240, below sbatch's --signal=B:USR1@300)" >&2
  exit 2
fi

modasm_launch() {
  local per_node=0
  if [ "$1" = --per-node ]; then per_node=1; shift; fi
  export MODASM_STOP_FILE="$MODASM_ROOT/runs/.stop/job-$SLURM_JOB_ID"
  mkdir -p "$(dirname "$MODASM_STOP_FILE")"
  rm -f "$MODASM_STOP_FILE" "$MODASM_STOP_FILE".*
  echo "[slurm] job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}" \
       "restart ${SLURM_RESTART_COUNT:-0}: $SLURM_JOB_NUM_NODES node(s) x $NPROC_PER_NODE rank(s)" \
       "$([ $per_node = 1 ] && echo "(one torchrun per node)"), rendezvous $MASTER_ADDR:$MASTER_PORT: $(modasm_redact "$*")"
  MODASM_STOP_AT="" MODASM_ENDING=0 MODASM_KILLED=0
  trap modasm_stop USR1
  trap modasm_ending TERM
  # each torchrun gets all of its node's CPUs (srun does not inherit sbatch's per-task CPUs)
  local step=(srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}")
  local task=(bash "$MODASM_ROOT/slurm/step.sh" torchrun)
  local steps=() i
  if [ $per_node = 1 ]; then
    for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
      modasm_step "$i" "${step[@]}" --nodes=1 --ntasks=1 --relative="$i" \
        "${task[@]}" --standalone --nproc-per-node="$NPROC_PER_NODE" "$@" --part "$i/$SLURM_JOB_NUM_NODES"
      steps+=($!)
    done
  else
    modasm_step 0 "${step[@]}" --ntasks="$SLURM_JOB_NUM_NODES" \
      "${task[@]}" --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$NPROC_PER_NODE" \
      --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" "$@"
    steps+=($!)
  fi
  modasm_wait "${steps[@]}"
  trap - USR1 TERM
  local rc=0 r
  for i in "${!steps[@]}"; do  # the first step that failed gives the job's exit code
    r=$(cat "$MODASM_STOP_FILE.rc$i" 2>/dev/null) || r=1
    if [ "$r" != 0 ] && [ "$rc" = 0 ]; then rc=$r; fi
  done
  # Requeue after a stop request, never after a failure: the steps were killed at the stop's deadline; Slurm sent
  # SIGTERM to the steps (slurm/step.sh's mark; torchrun then exits 1 whatever its ranks did); or the ranks saved
  # on the stop file and all exited 0. Not when TERM reached this shell, nor when the controller no longer reports
  # the job RUNNING (Slurm is ending it: scancel, the time limit, a preemption's end), and not when a step exited
  # non-zero on its own: torchrun stops the healthy ranks with SIGTERM when one fails, and they save.
  local failed requeue=0
  failed=$(awk '!seen[$0]++' "$MODASM_STOP_FILE.failed" 2>/dev/null | head -n 5) || true
  if [ "$MODASM_ENDING" = 0 ] && { [ "$MODASM_KILLED" = 1 ] || [ -e "$MODASM_STOP_FILE.term" ] ||
                                   { [ -e "$MODASM_STOP_FILE.saved" ] && [ "$rc" = 0 ]; }; }; then
    if scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -q 'JobState=RUNNING'; then
      requeue=1
    else
      echo "[slurm] not requeueing: Slurm is ending job $SLURM_JOB_ID (it is no longer RUNNING)"
      MODASM_ENDING=1
    fi
  fi
  rm -f "$MODASM_STOP_FILE" "$MODASM_STOP_FILE".*
  if [ $requeue = 1 ]; then
    echo "[slurm] requeueing job $SLURM_JOB_ID (re-running resumes from the newest complete checkpoint)"
    scontrol requeue "$SLURM_JOB_ID"
  elif [ "$rc" != 0 ] && [ "$MODASM_ENDING" = 0 ]; then
    echo "[slurm] job $SLURM_JOB_ID failed: the step exited $rc; not requeued (the same failure would come back on" \
         "every run)${failed:+. The error:}"
    if [ -n "$failed" ]; then
      printf '%s\n' "$failed" | sed 's/^/[slurm]   /'
    else
      echo "[slurm]   (no rank reported an error: the lines of torchrun or srun above say what ended the step, e.g." \
           "a rank killed by the kernel's OOM killer)"
    fi
  fi
  return "$rc"
}

# modasm_step N srun ...: one job step in the background ($! is its subshell), whose exit status lands in
# $MODASM_STOP_FILE.rcN. Not `wait`'s: interrupted by a trapped signal just as the step ends, bash's `wait` returns
# 128 + the signal, and may lose the step's status for good. The subshell runs srun in the foreground (no trap
# interrupts that wait) and outlives a SIGTERM to the whole batch step (scancel) long enough to write it.
modasm_step() {
  local n=$1; shift
  ( set +e; trap : TERM; "$@"; echo $? > "$MODASM_STOP_FILE.rc$n" ) &
}

# modasm_wait PID...: until the step subshells end; once a stop was asked (USR1), for at most MODASM_STOP_TIMEOUT
# seconds, then kills the steps (srun SIGKILLs its tasks on SIGTERM) and waits for them to go.
modasm_wait() {
  local pid p
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null; do
      if [ -z "$MODASM_STOP_AT" ]; then
        wait "$pid" || true  # returns when the step ends, or at a trapped signal
      elif ((SECONDS < MODASM_STOP_AT + MODASM_STOP_TIMEOUT)); then
        sleep 1 & wait $! || true
      else
        echo "[slurm] the ranks did not stop within $MODASM_STOP_TIMEOUT s of the stop request" \
             "(MODASM_STOP_TIMEOUT): killing the job's steps; the rerun resumes from the newest complete checkpoint"
        MODASM_KILLED=1 MODASM_STOP_AT=""
        for p in "$@"; do pkill -TERM -P "$p" || true; done
      fi
    done
  done
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
  echo "[slurm] USR1: asking the ranks to checkpoint at their next step (within $MODASM_STOP_TIMEOUT s); then the job" \
       "requeues itself"
  touch "$MODASM_STOP_FILE"
  if [ -z "$MODASM_STOP_AT" ] && [ "$MODASM_KILLED" = 0 ]; then MODASM_STOP_AT=$SECONDS; fi
}

modasm_ending() {
  echo "[slurm] TERM: the job is ending (scancel, the time limit, or the end of a preemption's grace time); it will" \
       "not requeue itself"
  MODASM_ENDING=1
}
