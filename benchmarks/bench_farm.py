"""Farmed incubation: each module group's training throughput alone vs. all groups at once.

    python benchmarks/bench_farm.py [--ranks-per-group 1] [--groups 2] [--recipe recipes/demo-fmnist.yaml]

Trains the recipe's meta model once (1 epoch on a slice), then incubates every module twice:
  alone: the modules of one group at a time (torchrun with the group's ranks, --module k),
  farm:  all groups at once (torchrun with groups x ranks-per-group ranks, incubate.groups=G).
Prints each group's median training img/s (from its metrics.jsonl) in both runs and the ratio farm/alone.
A ratio near 1 means the groups do not slow each other down (no cross-group collective); below 1 on a
machine with fewer cores than ranks, they only compete for the cores.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modasm.config import load_recipe  # noqa: E402
from modasm.metrics import read_jsonl  # noqa: E402
from modasm.phases import deal  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--recipe", default=str(ROOT / "recipes" / "demo-fmnist.yaml"))
p.add_argument("--groups", type=int, default=2)
p.add_argument("--ranks-per-group", type=int, default=1)
p.add_argument("--train-limit", type=int, default=12800)
args = p.parse_args()

env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
base = ["model.split=[2,2,2,2]", f"data.train_limit={args.train_limit}", "meta.epochs=1", "incubate.epochs=1",
        "incubate.log_every_steps=5", "logging.wandb.mode=disabled", "logging.progress=lines"]


def run(script, out, *extra, nproc=1):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "launch" / script), args.recipe, f"run.out_dir={out}", *base, *extra]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")


def rate(out, k):
    recipe = load_recipe(args.recipe, [f"run.out_dir={out}", *base])
    recs = read_jsonl(recipe.run_dir / "incubate" / f"module-{k:02d}" / "metrics.jsonl")
    rates = [r["img_per_s"] for r in recs if r["kind"] == "train"][1:]  # the first window holds start-up
    return statistics.median(rates)


with tempfile.TemporaryDirectory() as tmp:
    alone, farm = Path(tmp) / "alone", Path(tmp) / "farm"
    run("meta.py", alone)
    recipe = load_recipe(args.recipe, [f"run.out_dir={alone}", *base])
    plan = deal(recipe.model.split, args.groups)
    os.makedirs(farm / recipe.run.name)
    subprocess.run(["cp", "-r", str(recipe.run_dir / "meta"), str(farm / recipe.run.name / "meta")], check=True)
    for mods in plan:
        for k in mods:
            run("incubate.py", alone, "incubate.groups=1", "--module", str(k), nproc=args.ranks_per_group)
    run("incubate.py", farm, f"incubate.groups={args.groups}", nproc=args.groups * args.ranks_per_group)
    print(f"recipe {Path(args.recipe).name}, split {recipe.model.split}, {args.groups} groups x "
          f"{args.ranks_per_group} rank(s), {os.cpu_count()} CPU cores, 1 thread per rank")
    print(f"{'group':>5} {'modules':>10} {'alone img/s':>12} {'farm img/s':>11} {'farm/alone':>11}")
    for g, mods in enumerate(plan):
        a = statistics.mean(rate(alone, k) for k in mods)
        f = statistics.mean(rate(farm, k) for k in mods)
        print(f"{g:>5} {str(mods):>10} {a:>12.0f} {f:>11.0f} {f / a:>11.2f}")
