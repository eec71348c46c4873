#!/usr/bin/env bash
# benchmarks/gpu_check.sh: prove the GPU path on ONE GPU in at most 8 minutes, and write a markdown report.
#
# Steps (each timed, PASS/FAIL in the report, a failure does not stop the others; the most telling first):
#   0. install what the machine lacks from the bundle's wheels (no network), versions of everything;
#      nvJPEG decode ordering: decoded batches vs live tensors while queued kernels run (benchmarks/nvjpeg_check.py)
#   1. launch/bench.py ViT-H/14 and ViT-B/16: meta, incubate k=0 and k=K-1, assemble at the recipe's micro-batch,
#      checkpointing off/on (img/s, TFLOP/s, MFU, allocator peak vs launch/estimate.py's prediction)
#   2. farmed incubation of tests/recipes/tiny.yaml on this one device: the farm in one torchrun
#      (incubate.groups=2, two one-rank groups sharing the GPU), and one torchrun per module group at the same time
#   3. the demo recipe end to end in bf16 under ZeRO-1 (fp32 gradient accumulation; its accuracy table)
#   3b. device augmentation image by image vs per batch: ops, kernels and host ms per image (benchmarks/bench_aug.py)
#   4. launch/bench.py with torch.compile on (compiles take minutes: last; skipped when the budget is spent)
#   5. host syncs per optimizer step of the tiny recipe's loop (CUDA's sync debug mode; counted calls)
#
# On a lent GPU machine (Python 3.12 + torch, no DeepSpeed, no network), e.g. the device `run` tool, which
# copies this tree and brings back what is written under $OUT:
#   here, once (needs the package index):  make gpu-bundle         -> build/gpu-bundle (~40 MB: wheels + data)
#   there:  run(command="bash benchmarks/gpu_check.sh --bundle build/gpu-bundle --out $OUT",
#               carry=["build/gpu-bundle"], timeout_s=540)
#   then read $OUT/gpu_check.md (bench.json: launch/estimate.py RECIPE --measured bench.json; logs/: every step)
# Dry run (CPU, tiny models, part of the tests so the script cannot rot; its figures mean nothing):
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gpu-check
# Options: --budget SECONDS (default 450: no step starts after it), --only STEP,... (run just these steps, e.g.
# --only install,versions,nvjpeg-order), PYTHON=... (default: this checkout's .venv (make setup) when there is one,
# else the first of python3, python that has torch, the GPU machine's: benchmarks/gpu_env.sh).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=0; OUT=${OUT:-$ROOT/runs/gpu-check}; BUNDLE=""; BUDGET=450; ONLY=""
while [ $# -gt 0 ]; do  # paths relative to where the script is called from
  case $1 in
    --dry-run) DRY=1 ;;
    --out) OUT=$(realpath -m "$2"); shift ;;
    --bundle) BUNDLE=$(realpath -m "$2"); shift ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "usage: $0 [--dry-run] [--out DIR] [--bundle DIR] [--budget SECONDS] [--only STEP,...]" >&2; exit 2 ;;
  esac
  shift
done
cd "$ROOT"
[ $DRY = 1 ] && [ "$BUDGET" = 450 ] && BUDGET=1800  # a loaded 2-core CPU is slower than the GPU machine
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
# shellcheck source=benchmarks/gpu_env.sh
source "$ROOT/benchmarks/gpu_env.sh"  # gpu_python: PY (this checkout's .venv first); gpu_install: the bundle's wheels
gpu_python || exit 2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
DEADLINE=$((START + BUDGET))
REPORT=$OUT/gpu_check.md
SUMMARY=()
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
FMNIST=/usr/share/datasets/fashion-mnist
[ -n "$BUNDLE" ] && [ -d "$BUNDLE/fashion-mnist" ] && FMNIST=$(cd "$BUNDLE/fashion-mnist" && pwd)

if [ $DRY = 1 ]; then
  export DS_ACCELERATOR=cpu TORCH_COMPILE_DISABLE=1  # compile rows run eagerly: inductor takes minutes on a CPU
  # the recipes' structure at toy sizes: 4 modules of 1 block, 2 images per micro-batch
  TOY="model.embed_dim=32 model.num_heads=2 model.split=[1,1,1,1] meta.micro_batch=2 incubate.micro_batch=2"
  TINY_H="$TOY assemble.micro_batch=2 model.img_size=28"
  TINY_B="$TOY assemble.micro_batch=2 model.img_size=32"
  DEMO="data.train_limit=256 data.eval_limit=256 data.eval_batch_size=128"
  STEPS="--steps 1 --warmup 1"
  PLAIN="--checkpointing on"; COMPILED="--phase assemble"  # fewer engines: every code path, not every figure
else
  TINY_H=""; TINY_B=""; DEMO=""; STEPS="--steps 5 --warmup 2"; PLAIN="--checkpointing both"; COMPILED=""
fi

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME MIN_SECONDS COMMAND...: run it under the time left, log it, record PASS/FAIL/SKIP
step() {
  local name=$1 need=$2; shift 2
  local t0 rc budget; t0=$(date +%s); budget=$(left)
  if [ -n "$ONLY" ] && [[ $ONLY != *",$name,"* ]]; then
    SUMMARY+=("| $name | SKIP (not in --only) | 0 |"); return 1
  fi
  if [ "$budget" -lt "$need" ]; then
    SUMMARY+=("| $name | SKIP (budget: ${budget} s left, needs ~${need} s) | 0 |"); return 1
  fi
  echo "== $name (${budget} s left)" >&2
  timeout --kill-after=10 "$budget" bash -c '"$@"' "$name" "$@" >"$OUT/logs/$name.log" 2>&1  # functions too
  rc=$?
  local status=PASS; [ $rc = 0 ] || status="FAIL (exit $rc)"; [ $rc = 124 ] && status="FAIL (timed out)"
  SUMMARY+=("| $name | $status | $(( $(date +%s) - t0 )) |")
  return $rc
}

section() { printf '\n## %s\n\n' "$1" >>"$REPORT"; }
code() { printf '```\n' >>"$REPORT"; cat "$@" >>"$REPORT"; printf '```\n' >>"$REPORT"; }

# ---------------------------------------------------------------- 0. install + versions
install_missing() { gpu_install "$BUNDLE" "$WORK/site"; }
export -f install_missing gpu_install

versions() {
  "$PY" - <<'EOF'
import platform, subprocess, sys, torch
import deepspeed, timm
rows = [("python", f"{platform.python_version()} ({sys.executable})"), ("torch", torch.__version__), ("CUDA (torch built with)", torch.version.cuda),
        ("cuDNN", torch.backends.cudnn.version()), ("DeepSpeed", deepspeed.__version__), ("timm", timm.__version__)]
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    rows += [("NCCL", ".".join(map(str, torch.cuda.nccl.version()))), ("GPU", f"{p.name}, {p.total_memory / 2**30:.1f} GiB"),
             ("GPUs visible", torch.cuda.device_count())]
    try:
        rows.append(("driver", subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                              capture_output=True, text=True).stdout.strip()))
    except OSError:
        pass
else:
    rows += [("device", f"CPU ({torch.get_num_threads()} threads): dry run")]
print("| component | version |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
EOF
}
export -f versions

export PY WORK BUNDLE FMNIST DEMO
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  if [ $DRY = 1 ]; then
    echo "**Dry run on CPU at toy sizes** (tests/test_gpu_check.py): it checks that every step runs; its figures are not"
    echo "measurements of anything. torch.compile rows ran with TORCH_COMPILE_DISABLE=1 (eager)."
  else
    echo "One GPU, budget ${BUDGET} s; \`bash benchmarks/gpu_check.sh\` on commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
  fi
} >"$REPORT"
if step install 5 install_missing; then
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
section "Versions"
step versions 5 versions && cat "$OUT/logs/versions.log" >>"$REPORT"
printf '\ninstall: %s\n' "$(tail -n 3 "$OUT/logs/install.log" 2>/dev/null | tr '\n' ' ')" >>"$REPORT"

# ---------------------------------------------------------------- 0b. nvJPEG decode ordering
section "nvJPEG decode while kernels are queued (benchmarks/nvjpeg_check.py; pytorch/vision#9606)"
cat >>"$REPORT" <<'EOF'
Tensors freed while kernels that use them are still queued, then a batch decode: ordered = modasm's nvjpeg path (it
waits for the queued work), unordered = torchvision's decode_jpeg as it is. A bad sum or image is corruption; the
ordered path must have none (the step fails otherwise).

EOF
if [ $DRY = 1 ]; then NVJPEG_ARGS="--iters 3"; else NVJPEG_ARGS="--iters 100"; fi
# shellcheck disable=SC2086
step nvjpeg-order 20 "$PY" benchmarks/nvjpeg_check.py $NVJPEG_ARGS
[ -f "$OUT/logs/nvjpeg-order.log" ] && code "$OUT/logs/nvjpeg-order.log"

# ---------------------------------------------------------------- 1. training steps
bench() {  # bench NAME RECIPE OVERRIDES... -- BENCH_ARGS...
  local name=$1 recipe=$2; shift 2
  local ov=() ; while [ "$1" != "--" ]; do ov+=("$1"); shift; done; shift
  # shellcheck disable=SC2086
  step "$name" 30 "$PY" launch/bench.py "$recipe" "${ov[@]}" --phase meta,incubate,assemble --module 0,-1 $STEPS \
    --json "$OUT/bench.json" --deadline "$((DEADLINE - 15))" "$@"
  grep -E -- "^(model |---|ViT-|per rank)" "$OUT/logs/$name.log" 2>/dev/null | code /dev/stdin  # rows as measured
}
section "1. Training steps: launch/bench.py (synthetic batches, 1 rank, the recipe's micro-batch)"
# shellcheck disable=SC2086
bench bench-vit-h14 recipes/vit-h14.yaml $TINY_H -- --compile off $PLAIN
# shellcheck disable=SC2086
bench bench-vit-b16 recipes/vit-b16.yaml $TINY_B -- --compile off $PLAIN

# ---------------------------------------------------------------- 2. farmed incubation
# The farm in one torchrun: 2 ranks on this one device form 2 module groups of 1 rank (incubate.groups=2).
# One torchrun per module group: what the cluster path may move to (each group its own rendezvous); here
# both at once on the same device. Adapt the two commands below if the launch changes.
farm() {
  local mode=$1 out=$WORK/farm-$1
  local tiny=(tests/recipes/tiny.yaml "data.root=$FMNIST" logging.progress=lines)
  if [ ! -f "$WORK/farm-meta/tiny/meta/export/manifest.json" ]; then  # the meta model both modes incubate in
    "$PY" launch/meta.py "${tiny[@]}" "run.out_dir=$WORK/farm-meta" || return 1
  fi
  mkdir -p "$out/tiny" && cp -r "$WORK/farm-meta/tiny/meta" "$out/tiny/"
  tiny+=("run.out_dir=$out")
  if [ "$mode" = one-torchrun ]; then
    "$PY" -m torch.distributed.run --standalone --nproc-per-node=2 launch/incubate.py "${tiny[@]}" incubate.groups=2 || return 1
  else
    local pids=() k
    for k in 0 1; do
      "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 launch/incubate.py "${tiny[@]}" --module $k &
      pids+=($!)
    done
    for k in "${pids[@]}"; do wait "$k" || return 1; done
  fi
  for k in 00 01; do test -f "$out/tiny/incubate/module-$k/export/manifest.json" || { echo "module $k: no shard set"; return 1; }; done
  echo "both modules' shard sets written"
}
export -f farm
section "2. Farmed incubation of tests/recipes/tiny.yaml on one device"
cat >>"$REPORT" <<'EOF'
one-torchrun: `torchrun --nproc-per-node=2 launch/incubate.py ... incubate.groups=2`, the farm as it runs on a node
(two module groups of one rank). On a single GPU both ranks share it: modasm/dist.py binds local rank r to GPU
r mod (GPUs) and sets LOCAL_RANK to that index, which DeepSpeed takes its device from (else rank 1 asks for cuda:1);
dist.split_world waits on the rendezvous store, not on an NCCL collective (two ranks of one GPU cannot form an NCCL
communicator), then each rank is a one-rank NCCL group. torchrun-per-group: one torchrun per module group
(`--module k`), both at once on the same device, each a one-rank NCCL group.

EOF
for mode in one-torchrun torchrun-per-group; do
  step "farm-$mode" 20 farm $mode
  { echo "**$mode**: ${SUMMARY[-1]}"; echo; } >>"$REPORT"
  grep -E "\[incubate|error|Error|both modules" "$OUT/logs/farm-$mode.log" 2>/dev/null | tail -n 8 \
    | code /dev/stdin
done

# ---------------------------------------------------------------- 3. demo end to end in bf16
demo() {
  # shellcheck disable=SC2086
  "$PY" - recipes/demo-fmnist.yaml "run.out_dir=$WORK/demo" "data.root=$FMNIST" deepspeed.precision=bf16 deepspeed.zero_stage=1 \
    logging.progress=lines $DEMO <<'EOF'
import sys
from modasm import cli, dist, phases
from modasm.report import collect, table
args, recipe = cli.parse("demo", argv=sys.argv[1:])
info = dist.init()
phases.run_pipeline(recipe, info)
print("\n" + table(collect(recipe.run_dir)))
EOF
}
export -f demo
section "3. Demo (recipes/demo-fmnist.yaml) end to end in bf16"
step demo 60 demo
grep -B 2 -A 12 -- "^model  " "$OUT/logs/demo.log" 2>/dev/null | code /dev/stdin

# ---------------------------------------------------------------- 3b. device augmentation per batch (issue 21)
section "3b. Device augmentation image by image vs per batch (benchmarks/bench_aug.py)"
cat >>"$REPORT" <<'EOF'
The nvjpeg/dali device work after the decode (DeiT plans: crop + resize + flip, RandAugment, normalise, erase) for
one micro-batch: image by image (tensor_aug, before issue 21) and per batch (batch_aug). Per image: aten ops, CUDA
kernels, host ms (until the call returns), and img/s; host waits per batch; then how far the batched pixels are from
the per-sample ones on this device (uint8).

EOF
AUG_ARGS="--device cuda --batch 256 --rounds 5"
[ $DRY = 1 ] && AUG_ARGS="--device cpu --batch 8 --size 64 --rounds 1"
# shellcheck disable=SC2086
step aug-batched 20 "$PY" benchmarks/bench_aug.py $AUG_ARGS --check
[ -f "$OUT/logs/aug-batched.log" ] && grep -vE "^(USDT|ERROR|WARNING):" "$OUT/logs/aug-batched.log" | code /dev/stdin

# ---------------------------------------------------------------- 4. compiled
section "4. Training steps with torch.compile"
# shellcheck disable=SC2086
bench bench-vit-b16-compile recipes/vit-b16.yaml $TINY_B -- --compile on --checkpointing off $COMPILED
# shellcheck disable=SC2086
bench bench-vit-h14-compile recipes/vit-h14.yaml $TINY_H -- --compile on --checkpointing off $COMPILED

# ---------------------------------------------------------------- 5. host syncs per optimizer step
host_syncs() {  # tests/recipes/tiny.yaml's e2e on this device; docs/method.md "Host syncs", tests/test_syncs.py
  "$PY" - tests/recipes/tiny.yaml "data.root=$FMNIST" <<'EOF'
import collections, sys, tempfile
import torch
sys.path.insert(0, "tests")
from syncs import SyncCounter, cuda_sync_warnings
from modasm import dist, phases, train
from modasm.config import load_recipe
info, inner, rows, bad = dist.init(), train._Run.micro_step, [], []
gpu = info.device.type == "cuda"
print(f"device: {info.device}; each row: the e2e phase, 8 optimizer steps of 2 micro-steps, the first left out; every"
      " 4th step is logged.\ncounted: tests/syncs.py's calls that sync on a GPU; CUDA: set_sync_debug_mode('warn')\n")
print("| run | counted / step: modasm | DeepSpeed | other | CUDA syncs / step | per logged step |\n|---|---:|---:|---:|---:|---:|")
for label, ov in (("fp32, ZeRO-0, clip 1.0", ["e2e.clip_grad=1.0"]),
                  ("bf16, ZeRO-1", ["deepspeed.precision=bf16", "deepspeed.zero_stage=1"])):
    seen = collections.defaultdict(list)  # step -> [(counter, cuda warnings)]
    def micro_step(self, *args):
        step = self.state.step + 1
        with SyncCounter() as c, cuda_sync_warnings() as w:
            out = inner(self, *args)
        seen[step].append((c, w))
        return out
    train._Run.micro_step = micro_step
    with tempfile.TemporaryDirectory() as out:
        phases.run_e2e(load_recipe(sys.argv[1], [*sys.argv[2:], f"run.out_dir={out}", "e2e.epochs=1",
                                                 "e2e.accum_steps=2", "e2e.log_every_steps=4", *ov]), info)
    plain = [s for s in seen if s > 1 and s % 4 and s != max(seen)]
    logged = [s for s in seen if s > 1 and s not in plain]
    def per(steps, f):
        return sum(f(c, w) for s in steps for c, w in seen[s]) / max(len(steps), 1)
    mine = per(plain, lambda c, w: c.count("modasm"))
    cuda = f"{per(plain, lambda c, w: len(w)):.1f}" if gpu else "n/a on CPU"
    cuda_logged = f"{per(logged, lambda c, w: len(w)):.1f}" if gpu else "n/a on CPU"
    print(f"| {label} | {mine:.1f} | {per(plain, lambda c, w: c.count('deepspeed')):.1f} | "
          f"{per(plain, lambda c, w: c.count() - c.count('modasm') - c.count('deepspeed')):.1f} | {cuda} | {cuda_logged} |")
    origins = collections.Counter((e.package, e.where, e.what) for s in plain for c, w in seen[s] for e in c.events + w)
    rows.append((label, origins, len(plain)))
    if mine != 1:
        bad.append(f"{label}: {mine} of modasm's syncs per optimizer step, not 1 (train.step_flags)")
print()
for label, origins, n in rows:
    print(f"{label}: where, per optimizer step (not logged)")
    for (pkg, where, what), k in origins.most_common(12):
        print(f"  {k / max(n, 1):5.1f}  {what:<28} {where}")
sys.exit("; ".join(bad) if bad else 0)
EOF
}
export -f host_syncs
section "5. Host syncs per optimizer step (tests/recipes/tiny.yaml, e2e)"
step host-syncs 20 host_syncs
code "$OUT/logs/host-syncs.log"

# ---------------------------------------------------------------- summary
section "Summary"
{
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "total $(( $(date +%s) - START )) s; logs of every step in logs/."
} >>"$REPORT"
cat "$REPORT"
printf '%s\n' "${SUMMARY[@]}" | grep -q FAIL && exit 1
exit 0
