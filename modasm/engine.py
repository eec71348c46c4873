"""DeepSpeed in one place: config derived from the recipe, engine build, checkpoints, export.

Every phase trains through a real DeepSpeed engine (ZeRO stage, bf16/fp32, gradient clipping and
accumulation from the recipe). Resume state is DeepSpeed's own checkpoint, saved under
``ckpt/step-XXXXXXXX`` with a ``COMPLETE`` marker written after every rank has saved; the newest
complete step is found by number. (DeepSpeed's loader unpickles: resume state is only ever the
run's own output. Hand-offs between phases are safetensors shard sets, see shards.py.)
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch

if not torch.cuda.is_available():  # name DeepSpeed's CPU accelerator instead of letting it guess
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from .config import DeepSpeedConfig, PhaseConfig  # noqa: E402
from .dist import DistInfo, barrier  # noqa: E402
from .model import param_groups  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
CKPT_PREFIX = "step-"
COMPLETE = "COMPLETE"


def micro_batch(cfg: PhaseConfig, world: int, section: str) -> int:
    per = cfg.accum_steps * world
    if cfg.batch_size % per:
        raise ValueError(f"{section}.batch_size={cfg.batch_size} is not divisible by accum_steps x ranks "
                         f"= {cfg.accum_steps} x {world}; pick a multiple of {per}")
    return cfg.batch_size // per


def ds_config(cfg: PhaseConfig, ds: DeepSpeedConfig, world: int, section: str) -> dict:
    return {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch(cfg, world, section),
        "gradient_accumulation_steps": cfg.accum_steps,
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def lr_lambda(peak: float, min_lr: float, warmup_steps: int, total_steps: int):
    """Per-step schedule as a multiplier of the peak lr: linear warm-up, then cosine to min_lr."""
    floor = min_lr / peak if peak > 0 else 0.0

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def build_engine(model: torch.nn.Module, cfg: PhaseConfig, ds: DeepSpeedConfig, info: DistInfo,
                 section: str, total_steps: int, steps_per_epoch: int):
    peak = cfg.lr * cfg.batch_size / 512
    groups = param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999))
    schedule = lr_lambda(peak, cfg.min_lr, int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config(cfg, ds, info.world, section), dist_init_required=False)
    return engine, scheduler


def input_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def grad_norm_before_step(engine) -> float | None:
    """Global gradient norm (before clipping) where the plain fp32 engine leaves grads on the params.

    ZeRO and bf16 engines keep gradients in their own buffers and report the norm themselves
    (``get_global_grad_norm`` after the step); for those this returns None.
    """
    if engine.zero_optimization() or engine.bfloat16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


@contextlib.contextmanager
def full_params(engine):
    """All parameters materialised on every rank (a no-op below ZeRO-3)."""
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            yield
    else:
        yield


# ---------------------------------------------------------------- resume checkpoints


def tag(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def complete_steps(ckpt_dir: Path) -> list[int]:
    """Steps of complete checkpoints, ascending by number (never by text order)."""
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for d in ckpt_dir.iterdir():
        if d.name.startswith(CKPT_PREFIX) and (d / COMPLETE).is_file():
            try:
                steps.append(int(d.name[len(CKPT_PREFIX):]))
            except ValueError:
                continue
    return sorted(steps)


def _rng_file(ckpt_dir: Path, step: int, rank: int) -> Path:
    return ckpt_dir / tag(step) / f"rng-rank{rank:05d}.pt"


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, info: DistInfo,
         marker: dict | None = None) -> None:
    """Every rank saves (its own RNG too); then the main rank marks the step complete and prunes."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag(step), client_state=client_state, save_latest=False)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, _rng_file(ckpt_dir, step, info.rank))
    barrier(info)
    if info.is_main:
        (ckpt_dir / tag(step) / COMPLETE).write_text(json.dumps({"step": step, **(marker or {})}))
        for old in complete_steps(ckpt_dir)[:-keep]:
            shutil.rmtree(ckpt_dir / tag(old), ignore_errors=True)
    barrier(info)


def latest(ckpt_dir: Path) -> tuple[int, dict] | None:
    """(step, marker) of the newest complete checkpoint, or None."""
    steps = complete_steps(ckpt_dir)
    if not steps:
        return None
    return steps[-1], json.loads((ckpt_dir / tag(steps[-1]) / COMPLETE).read_text())


def load(engine, ckpt_dir: Path, step: int, info: DistInfo) -> dict:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the client state."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag(step))
    if path is None:
        raise RuntimeError(f"{ckpt_dir / tag(step)}: DeepSpeed could not load this checkpoint; "
                           "move it aside to restart the phase from the previous one")
    rng = _rng_file(ckpt_dir, step, info.rank)
    if rng.is_file():  # absent when the world size changed: this rank keeps its fresh seed
        state = torch.load(rng, weights_only=True)
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    return client
