"""Training-step throughput with and without each fast path of the ``speed:`` section (make bench-speed).

One process, one rank, real DeepSpeed engines (modasm.engine.build_engine) on whatever device is there:
a small ViT (width 192, 3 heads, 6 blocks, 64 px, patch 8: 65 tokens) so that a CPU measures it in a
few minutes. Each row changes one thing against the plain row (eager, no checkpointing, unfused AdamW,
fp32, fused attention on: timm's default). Images per second of forward + backward + optimizer step: median of
the timed steps of a round, best of the rounds, rows interleaved (compile's first step is its compilation,
reported apart).
Figures go to docs/benchmarks.md ("Fast paths"). On a GPU, benchmarks/gpu_check.sh measures the recipes'
ViT-B/L/H shapes instead (issue 12's instruments).
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modasm import dist, speed  # noqa: E402
from modasm import engine as ds  # noqa: E402
from modasm import model as M  # noqa: E402
from modasm.config import DeepSpeedConfig, ModelConfig, PhaseConfig, SpeedConfig  # noqa: E402

ROWS = [  # (name, speed overrides, deepspeed overrides)
    ("plain (eager, fp32, unfused AdamW)", {}, {}),
    ("torch.compile", {"compile": True}, {}),
    ("activation checkpointing", {"checkpointing": True}, {}),
    ("fused AdamW", {"fused_optimizer": True}, {}),
    ("fused attention off (explicit softmax)", {"fused_attention": False}, {}),
    ("bf16 (ZeRO-1, fp32 accumulation)", {}, {"precision": "bf16", "zero_stage": 1}),
    ("all on: compile + fused AdamW + bf16", {"compile": True, "fused_optimizer": True},
     {"precision": "bf16", "zero_stage": 1}),
]


def build(info, model_cfg, batch, speed_kw, ds_kw):
    """(engine, input, labels, seconds of the first step: compile's compilation)."""
    base = {"compile": False, "fused_optimizer": False, "checkpointing": False}
    cfg = SpeedConfig(**{**base, **speed_kw})
    phase = PhaseConfig(epochs=1, batch_size=batch, warmup_epochs=0.0, drop_path=0.0)
    torch.manual_seed(0)
    model = M.build_target(model_cfg).to(info.device)
    speed.prepare_model(model, cfg, info.device)
    plan = ds.plan(phase, 1, "e2e", batch * 1000)
    eng, _ = ds.build_engine(model, phase, DeepSpeedConfig(**ds_kw), info, plan,
                             speed.optimizer_kwargs(cfg, info.device))
    x = torch.randn(batch, 3, model_cfg.img_size, model_cfg.img_size, device=info.device).to(ds.input_dtype(eng))
    y = torch.randint(0, model_cfg.num_classes, (batch,), device=info.device)
    first = step(eng, x, y)
    return eng, x, y, first


def step(eng, x, y) -> float:
    t = time.perf_counter()
    eng.backward(torch.nn.functional.cross_entropy(eng(x).float(), y))
    eng.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row and round (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: per-core figures)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = dist.init()
    model_cfg = ModelConfig(embed_dim=192, num_heads=3, patch_size=8, img_size=64, num_classes=100, split=[3, 3])
    where = torch.cuda.get_device_name() if info.device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"# ViT width 192, 6 blocks, 64 px / patch 8, batch {args.batch}, {where}, torch {torch.__version__}, "
          f"{args.threads} threads, load avg {os.getloadavg()[0]:.1f}")
    engines = [(name, build(info, model_cfg, args.batch, sk, dk)) for name, sk, dk in ROWS]
    best = {name: 0.0 for name, _ in engines}
    for _ in range(args.rounds):  # rows interleaved, best round kept: a shared machine's load hits all rows alike
        for name, (eng, x, y, _) in engines:
            for _ in range(args.warmup):
                step(eng, x, y)
            times = [step(eng, x, y) for _ in range(args.steps)]
            best[name] = max(best[name], args.batch / statistics.median(times))
    print(f"# load avg after: {os.getloadavg()[0]:.1f}")
    print(f"{'path':44s} {'img/s':>8s} {'vs plain':>9s} {'first step s':>13s}")
    plain = best[ROWS[0][0]]
    for name, (_, _, _, first) in engines:
        print(f"{name:44s} {best[name]:8.1f} {best[name] / plain:9.2f} {first:13.1f}")
    dist.shutdown()


if __name__ == "__main__":
    main()
