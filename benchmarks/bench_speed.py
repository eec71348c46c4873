"""Training-step throughput with and without each fast path of the ``speed:`` section (make bench-speed).

One process, one rank, real DeepSpeed engines (modasm.engine.build_engine) on whatever device is there:
a small ViT (width 192, 3 heads, 6 blocks, 64 px, patch 8: 65 tokens) so that a CPU measures it in a
minute or two. Each row changes one thing against the plain row (eager, no checkpointing, unfused AdamW,
fp32, fused attention on: timm's default). Images per second of forward + backward + optimizer step, median
of the timed steps after warm-up (compile's first steps are its compilation, reported apart).
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


def measure(info, model_cfg, batch, steps, warmup, speed_kw, ds_kw) -> tuple[float, float]:
    base = {"compile": False, "fused_optimizer": False, "checkpointing": False}
    cfg = SpeedConfig(**{**base, **speed_kw})
    phase = PhaseConfig(epochs=1, batch_size=batch, warmup_epochs=0.0, drop_path=0.0)
    torch.manual_seed(0)
    model = M.build_target(model_cfg).to(info.device)
    speed.prepare_model(model, cfg, info.device)
    plan = ds.plan(phase, 1, "e2e", batch * (steps + warmup))
    eng, _ = ds.build_engine(model, phase, DeepSpeedConfig(**ds_kw), info, plan,
                             speed.optimizer_kwargs(cfg, info.device))
    dtype = ds.input_dtype(eng)
    x = torch.randn(batch, 3, model_cfg.img_size, model_cfg.img_size, device=info.device).to(dtype)
    y = torch.randint(0, model_cfg.num_classes, (batch,), device=info.device)
    times = []
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            first = time.perf_counter() - t0
        t = time.perf_counter()
        eng.backward(torch.nn.functional.cross_entropy(eng(x).float(), y))
        eng.step()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times[warmup:]), first


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = dist.init()
    model_cfg = ModelConfig(embed_dim=192, num_heads=3, patch_size=8, img_size=64, num_classes=100, split=[3, 3])
    where = torch.cuda.get_device_name() if info.device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"# ViT width 192, 6 blocks, 64 px / patch 8, batch {args.batch}, {where}, torch {torch.__version__}, "
          f"{args.threads} threads, load avg {os.getloadavg()[0]:.1f}")
    print(f"{'path':44s} {'img/s':>8s} {'vs plain':>9s} {'warm-up s':>10s}")
    plain = None
    for name, sk, dk in ROWS:
        rate, first = measure(info, model_cfg, args.batch, args.steps, args.warmup, sk, dk)
        plain = plain or rate
        print(f"{name:44s} {rate:8.1f} {rate / plain:9.2f} {first:10.1f}", flush=True)
    dist.shutdown()


if __name__ == "__main__":
    main()
