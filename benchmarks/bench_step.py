"""Training-step overheads and the incubation's savings, side by side in one run (CPU; docs/benchmarks.md).

    python benchmarks/bench_step.py [--recipe recipes/vit-b16.yaml] [--width 384 --heads 6 --img 112]
                                    [--split 2,2,2,2] [--micro 16] [--steps 4] [--reps 2] [--parts abc]

The recipe's model (split, patch, classes) at a CPU-sized width and resolution, fp32, ZeRO-0, 1 rank,
synthetic images, one torch thread (``--threads``). Each figure twice: wall-clock img/s, and the process's
CPU seconds per optimizer step, which other processes on a shared machine barely change (with one thread
nothing waits for a descheduled sibling). Every measurement is repeated ``--reps`` times, interleaved, and
the best of each is kept.
  (a) one optimizer step of the target (E2E) model: a bare loop (plain PyTorch: the same timm model,
      torch AdamW, the same micro-batch), our DeepSpeed engine alone (launch/bench.py's step), and our
      whole training loop (modasm.train.train: loader, engine, logging, stop and health checks);
  (b) incubation of module 0: our hybrid (meta modules frozen) against the paper's (every parameter
      trainable, only module 0 in the optimizer), both in the bare loop, and ours through the engine;
  (c) each phase's step (meta, every hybrid, target) through the engine, against the target's, next to
      the ratio of their counted FLOPs.
"""
import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modasm import bench, dist, perf, phases, seeds  # noqa: E402
from modasm import model as M  # noqa: E402
from modasm.config import load_recipe  # noqa: E402
from modasm.data.source import MapSource  # noqa: E402
from modasm.metrics import read_jsonl  # noqa: E402
from modasm.train import Job, train  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--recipe", default=str(ROOT / "recipes" / "vit-b16.yaml"))
p.add_argument("--width", type=int, default=384)
p.add_argument("--heads", type=int, default=6)
p.add_argument("--img", type=int, default=112)
p.add_argument("--split", help="module depths, e.g. 2,2,2,2 (default: the recipe's)")
p.add_argument("--micro", type=int, default=16)
p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per measurement (after one warm-up)")
p.add_argument("--reps", type=int, default=2)
p.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run")
p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time robust to load)")
args = p.parse_args()

recipe = load_recipe(args.recipe, [f"model.embed_dim={args.width}", f"model.num_heads={args.heads}",
                                   f"model.img_size={args.img}", "deepspeed.zero_stage=0", "deepspeed.precision=fp32",
                                   "logging.wandb.mode=disabled", "logging.progress=lines"]
                     + ([f"model.split=[{args.split}]"] if args.split else []))
torch.set_num_threads(args.threads)
info = dist.init()
cfg, K, micro = recipe.model, recipe.model.K, args.micro
g = torch.Generator().manual_seed(0)
X = torch.randn(micro, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
Y = torch.randint(0, cfg.num_classes, (micro,), generator=g)


def build(phase, k=None):
    torch.manual_seed(seeds.init(recipe.run.seed, phases.PHASES[phase].salt(k)))
    return phases.PHASES[phase].build(recipe, k, None)


def bare(model, opt_params) -> tuple[float, float]:
    """(img/s, CPU s per step) of plain PyTorch: forward, loss, backward, AdamW step (``opt_params`` stepped)."""
    opt = torch.optim.AdamW(opt_params, lr=1e-4, weight_decay=0.05)

    def step():
        loss = F.cross_entropy(model(X), Y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    return args.steps * micro / (time.perf_counter() - t), (time.process_time() - cpu) / args.steps


def engine_rate(phase, k=None) -> tuple[float, float]:
    r = bench.run_config(recipe, phase, k, info, micro, False, False, steps=args.steps, warmup=1)
    assert r.error is None, r.error
    return r.img_per_s, r.cpu_s


class Synthetic(MapSource):
    """The same random images as a dataset, read through the loop's own loader; notes the clocks whenever
    the loop starts fetching a micro-batch (the loader runs in the main process: workers 0)."""
    train, seed, repeats = True, 0, 1

    def __init__(self, n, train=True):
        self.n, self.train, self.calls, self.clocks = n, train, 0, []

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        if self.train and self.calls % micro == 0:
            self.clocks.append((time.perf_counter(), time.process_time()))
        self.calls += 1
        i = item[0] if isinstance(item, tuple) else item
        return X[i % micro], Y[i % micro], str(i)


def loop_rate() -> tuple[float, float]:
    """(img/s, CPU s per step) of modasm.train.train on the target, over the loop's iterations from the start
    of the second micro-batch fetch to the start of the last (the first step warms up)."""
    with tempfile.TemporaryDirectory() as tmp:
        section = dict(epochs=1, batch_size=micro, micro_batch=0, warmup_epochs=0.0, eval_every_epochs=1,
                       clip_grad=0.0)  # logging as the recipe says (every 20 steps, and the last)
        job = Job(label="e2e", section="e2e", out=Path(tmp), model=build("e2e"),
                  cfg=dataclasses.replace(recipe.e2e, **section), ds=recipe.deepspeed,
                  export=lambda *_: None, seed=recipe.run.seed, speed=recipe.speed)
        data = Synthetic(micro * (args.steps + 2))
        train(job, data, Synthetic(micro, train=False), info)
        assert read_jsonl(Path(tmp) / "metrics.jsonl")[-1]["kind"] == "done"  # it trained to the end
    (w0, c0), (w1, c1) = data.clocks[1], data.clocks[-1]
    return args.steps * micro / (w1 - w0), (c1 - c0) / args.steps


def best(fns: dict) -> dict:
    """Each measurement ``reps`` times, interleaved: {name: (best img/s, best CPU s per step)}."""
    out = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            out[name].append(fn())
    return {name: (max(w for w, _ in v), min(c for _, c in v)) for name, v in out.items()}


def hybrid0(paper: bool):
    model = build("incubate", 0)
    layout = M.hybrid_layout(cfg.split, 0)
    mine = [p for n, p in model.named_parameters() if M.owner(n, layout)[0] == 0]
    if paper:  # the paper's code: every meta module keeps requires_grad; only module 0 is in the optimizer
        for q in model.parameters():
            q.requires_grad_(True)
    return model, mine


def flops(phase, k=None):
    return perf.trace_step(build(phase, k)).flops_per_image


load0 = os.getloadavg()
print(f"model: {args.recipe} at width {args.width}, {args.heads} heads, {args.img} px, split {cfg.split}; fp32, "
      f"ZeRO-0, 1 rank, {torch.get_num_threads()} threads, micro-batch {micro}, best of {args.reps} x {args.steps} "
      f"steps; load average {load0[0]:.2f} at start", flush=True)

if "a" in args.parts:
    target = build("e2e")
    a = best({"bare": lambda: bare(target, list(target.parameters())), "engine": lambda: engine_rate("e2e"),
              "loop": loop_rate})
    print("\n(a) one optimizer step of the target (E2E) model; throughput relative to the bare loop")
    print("| loop | img/s (wall) | vs bare | CPU s / step | vs bare (CPU time) |\n|---|---:|---:|---:|---:|")
    for name, label in [("bare", "bare PyTorch (timm model + torch AdamW)"), ("engine", "DeepSpeed engine alone"),
                        ("loop", "our training loop (modasm.train)")]:
        (w, c), (wb, cb) = a[name], a["bare"]
        print(f"| {label} | {w:.2f} | {w / wb:.3f} | {c:.3f} | {cb / c:.3f} |", flush=True)

if "b" in args.parts:
    ours, paper = hybrid0(False), hybrid0(True)
    b = best({"ours": lambda: bare(*ours), "paper": lambda: bare(*paper), "engine": lambda: engine_rate("incubate", 0)})
    f_ours, f_paper = flops("incubate", 0), perf.trace_step(paper[0]).flops_per_image
    print("\n(b) incubation step of module 0 (hybrid depth "
          f"{sum(M.hybrid_layout(cfg.split, 0))}): step time against the paper-style step")
    print("| step | img/s (wall) | time vs paper-style (wall) | CPU s / step | vs paper-style (CPU) | FLOPs vs "
          "paper-style |\n|---|---:|---:|---:|---:|---:|")
    (wp, cp), fr = b["paper"], f_ours / f_paper
    for name, label in [("paper", "paper-style (all trainable, module 0 stepped), bare loop"),
                        ("ours", "ours (meta modules frozen), bare loop"), ("engine", "ours, DeepSpeed engine")]:
        w, c = b[name]
        print(f"| {label} | {w:.2f} | {wp / w:.3f} | {c:.3f} | {c / cp:.3f} | {1.0 if name == 'paper' else fr:.3f} |",
              flush=True)

if "c" in args.parts:
    cases = [("meta", None)] + [("incubate", k) for k in range(K)] + [("assemble", None)]
    c = best({phases.label(ph, k): (lambda ph=ph, k=k: engine_rate(ph, k)) for ph, k in cases})
    f = {phases.label(ph, k): flops(ph, k) for ph, k in cases}
    print("\n(c) each phase's step against the target's (DeepSpeed engine)")
    print("| model | depth | img/s (wall) | step time vs target (wall) | CPU s / step | vs target (CPU) | FLOPs vs "
          "target |\n|---|---:|---:|---:|---:|---:|---:|")
    (wt, ct) = c["assemble"]
    for ph, k in cases:
        name = phases.label(ph, k)
        depth = sum(phases.PHASES[ph].layout(recipe, k))
        w, cs = c[name]
        print(f"| {name} | {depth} | {w:.2f} | {wt / w:.3f} | {cs:.3f} | {cs / ct:.3f} | "
              f"{f[name] / f['assemble']:.3f} |")

load1 = os.getloadavg()
print(f"\nload average {load1[0]:.2f} at the end (1 / 5 / 15 min: {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f})")
