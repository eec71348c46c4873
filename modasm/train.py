"""The one training loop every phase uses: step, accumulate, clip, evaluate, checkpoint, resume.

``train(job)`` trains ``job.model`` (whatever of it has ``requires_grad``) through a DeepSpeed
engine, evaluates on the sharded validation set, saves resume state, and finally hands the trained
model to ``job.export``. Re-running a finished job does nothing; re-running an interrupted one
resumes from its newest complete checkpoint at the exact batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from . import engine as ds
from .config import AugConfig, DeepSpeedConfig, PhaseConfig, fingerprint_changes
from .config import fingerprint as config_fingerprint
from .data import Batch, DataHealth, SeededMixup, check_bad, eval_loader, set_epoch, train_loader
from .dist import DistInfo, all_reduce_sum, barrier
from .metrics import CostClock, MetricsLog, Throughput, fmt_eta
from .shards import read_manifest

_STOP = {"requested": False}


def request_stop(*_):
    """Ask the running loop to checkpoint and return at the next optimizer step (signal handler)."""
    _STOP["requested"] = True


STOP_FILE_ENV = "MODASM_STOP_FILE"


def stop_requested(info: DistInfo) -> bool:
    """True on every rank when any rank was asked to stop (they must checkpoint together).

    Asked = SIGUSR1 reached this process, or the file named by $MODASM_STOP_FILE exists (what the Slurm
    scripts touch when the batch shell gets the time-limit signal; it reaches ranks under torchrun on
    every node, which a signal to the batch shell does not).
    """
    stop_file = os.environ.get(STOP_FILE_ENV)  # one stat per step, on the group's first rank only
    asked = _STOP["requested"] or bool(info.rank == 0 and stop_file and os.path.exists(stop_file))
    flag = torch.tensor([1.0 if asked else 0.0], device=info.device)  # NCCL needs device tensors
    if info.world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=info.group)
    stop = bool(flag.item())
    if stop:  # clear only when acting on it: a signal landing during the all-reduce waits for the next step
        _STOP["requested"] = False
    return stop


@dataclass
class Job:
    label: str                 # e.g. "meta", "incubate[2]"
    section: str               # the recipe section of its hyper-parameters
    out: Path                  # runs/<run>/<phase>[/module-XX]
    model: torch.nn.Module
    cfg: PhaseConfig
    ds: DeepSpeedConfig
    export: Callable[[torch.nn.Module, int, dict], None]  # (trained model, step, metrics) -> shard set
    seed: int
    workers: int = 0
    eval_batch: int = 512
    fingerprint: dict | None = None  # recipe keys the result depends on; checked on re-run and resume
    base_hours: float = 0.0          # device-hours the pipeline spent before this phase (cost axis)
    make_log: Callable[[DistInfo], MetricsLog] | None = None  # JSON lines (+ W&B) of this phase
    aug: AugConfig | None = None     # mixup/cutmix (soft targets) when it says so
    num_classes: int = 0             # of the soft targets (mixup)
    max_bad_fraction: float = 0.001  # stop when more of the samples read were unreadable

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "ckpt"

    @property
    def export_dir(self) -> Path:
        return self.out / "export"


@torch.no_grad()
def evaluate(model, loader, info: DistInfo, dtype: torch.dtype = torch.float32,
             max_bad_fraction: float | None = None) -> dict:
    """Top-1/top-5 and loss over the rank-sharded validation set; every sample counted once.

    Unreadable samples are skipped and counted (``eval_bad_samples``); past ``max_bad_fraction`` of
    the samples read, a ValueError.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=info.device)  # correct@1, correct@5, loss sum, count, bad
    examples = []
    for batch in loader:
        if batch.bad:
            sums[4] += len(batch.bad)
            examples += batch.bad[:1]
        if batch.x is None:
            continue
        x, y = batch.x.to(info.device, dtype), batch.y.to(info.device)
        logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[:4] += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(),
                                 F.cross_entropy(logits, y, reduction="sum"),
                                 torch.tensor(len(y), device=y.device)]).double()
    all_reduce_sum(sums, info)
    model.train(was_training)
    n, bad = sums[3].item(), int(sums[4].item())
    if max_bad_fraction is not None:
        check_bad(bad, int(n) + bad, max_bad_fraction, "validation", examples)
    n = max(n, 1)
    return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n,
            "eval_loss": sums[2].item() / n, "eval_samples": int(sums[3].item()), "eval_bad_samples": bad}


def _blank(model: torch.nn.Module, info: DistInfo, dtype) -> torch.Tensor:
    """One zero image of the model's input shape (a micro-batch whose samples were all unreadable)."""
    pe = model.patch_embed
    return torch.zeros(1, pe.proj.in_channels, *pe.img_size, device=info.device, dtype=dtype)


def _loss(eng, batch: Batch, cfg: PhaseConfig, mixup: SeededMixup | None, mix_seed: int, info: DistInfo, dtype):
    if batch.x is None:  # a zero-weight step keeps this rank in lockstep with the others (DeepSpeed collectives)
        return eng(_blank(eng.module, info, dtype)).float().sum() * 0.0
    x, y = batch.x.to(info.device), batch.y.to(info.device)
    if mixup is None:
        return F.cross_entropy(eng(x.to(dtype)).float(), y, label_smoothing=cfg.label_smoothing)
    x, soft = mixup(x, y, mix_seed)  # mixed in fp32, smoothing inside the soft targets
    return SoftTargetCrossEntropy()(eng(x.to(dtype)).float(), soft)


def _refuse_changes(old: dict | None, new: dict | None, what: Path, out: Path) -> None:
    if old is None or new is None:
        return
    changes = fingerprint_changes(old, new)
    if changes:
        raise ValueError(f"{what} was made with other settings ({'; '.join(changes[:5])}); run the original "
                         f"recipe, choose a new run.name, or move {out} aside to redo this phase")


def finished(out: Path, label: str, info: DistInfo, fingerprint: dict | None = None,
             section: str | None = None) -> dict | None:
    """Metrics of a phase whose shard set is complete (and says so), else None.

    A finished phase made with other settings is an error, not a silent skip.
    """
    done = read_manifest(out / "export")
    if done is None:
        return None
    if fingerprint is not None:
        _refuse_changes(config_fingerprint(done["recipe"], section), fingerprint, out / "export", out)
    if info.is_main:
        print(f"[{label}] already complete at step {done['step']} ({out / 'export'}); nothing to do", flush=True)
    return done["metrics"]


def _plan(job: Job, n_train: int, world: int) -> tuple[int, int, int]:
    """(micro-batch per rank, optimizer steps per epoch, total steps) of a job."""
    cfg = job.cfg
    micro = ds.micro_batch(cfg, world, job.section)
    steps_per_epoch = (n_train // world) // micro // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"{job.section}: {n_train} training samples give no full optimizer step of "
                         f"{cfg.batch_size}; lower {job.section}.batch_size")
    return micro, steps_per_epoch, cfg.epochs * steps_per_epoch


def train(job: Job, train_ds, val_ds, info: DistInfo) -> dict:
    if (done := finished(job.out, job.label, info, job.fingerprint, job.section)) is not None:
        return done
    cfg = job.cfg
    micro, steps_per_epoch, total = _plan(job, len(train_ds), info.world)
    loader = train_loader(train_ds, micro, info.rank, info.world, job.seed, job.workers)
    val = eval_loader(val_ds, job.eval_batch, info.rank, info.world, job.workers)
    newest = ds.latest(job.ckpt_dir)
    if newest is not None:  # before DeepSpeed touches it: a checkpoint of other settings is refused
        _refuse_changes(newest[1].get("fingerprint"), job.fingerprint, job.ckpt_dir / ds.tag(newest[0]), job.out)
    eng, sched = ds.build_engine(job.model, cfg, job.ds, info, job.section, total, steps_per_epoch)
    log = job.make_log(info) if job.make_log else MetricsLog(job.out / "metrics.jsonl", job.label, info.is_main)
    try:
        return _loop(job, eng, sched, loader, val, log, info, newest, micro, steps_per_epoch, total)
    finally:
        log.close()


def _loop(job, eng, sched, loader, val, log, info, newest, micro, steps_per_epoch, total) -> dict:
    cfg = job.cfg
    state = {"step": 0, "wall_seconds": 0.0, "device_seconds": 0.0, "last_eval": None, "samples_read": 0,
             "bad_samples": 0}
    if newest is not None:
        client = ds.load(eng, job.ckpt_dir, newest[0], info)
        state.update({k: client.get(k, state[k]) for k in state})
        log.say(f"resuming from step {state['step']}/{total} ({job.ckpt_dir / ds.tag(state['step'])})")
    else:
        torch.manual_seed(job.seed + 1000 * info.rank)  # drop path / dropout; data has its own seeds
        log.write("start", total_steps=total, steps_per_epoch=steps_per_epoch, world=info.world,
                  micro_batch=micro, batch_size=cfg.batch_size, base_hours=job.base_hours,
                  trainable_params=sum(p.numel() for p in job.model.parameters() if p.requires_grad),
                  total_params=sum(p.numel() for p in job.model.parameters()))
    clock = CostClock(info.world, state["wall_seconds"], state["device_seconds"], job.base_hours)
    health = DataHealth(job.max_bad_fraction, state["samples_read"], state["bad_samples"],
                        epoch=steps_per_epoch * cfg.accum_steps * micro * info.world)
    mixup = SeededMixup(job.aug, cfg.label_smoothing, job.num_classes) if job.aug and job.aug.mixes else None

    def checkpoint():
        health.sync(info)
        state.update(samples_read=health.read, bad_samples=health.bad)
        clock.tick()
        state.update(wall_seconds=clock.wall, device_seconds=clock.device)
        ds.save(eng, job.ckpt_dir, state["step"], dict(state), cfg.keep_ckpts, info,
                marker={"fingerprint": job.fingerprint})

    meter = Throughput(total, state["step"])
    eng.train()
    dtype = ds.input_dtype(eng)
    while state["step"] < total:
        epoch, in_epoch = divmod(state["step"], steps_per_epoch)
        set_epoch(loader, epoch, start=in_epoch * cfg.accum_steps * micro)
        n_micro = (steps_per_epoch - in_epoch) * cfg.accum_steps
        for i, batch in enumerate(loader):
            if i == n_micro:
                break
            health.add(batch)
            micro_no = in_epoch * cfg.accum_steps + i  # of this epoch: seeds the mixup draws
            mix_seed = ((job.seed * 1_000_003 + epoch) * 1_000_033 + micro_no) * 4099 + info.rank
            loss = _loss(eng, batch, cfg, mixup, mix_seed, info, dtype)
            eng.backward(loss)
            boundary = eng.is_gradient_accumulation_boundary()
            step_no = state["step"] + 1
            logging_step = boundary and (step_no % cfg.log_every_steps == 0 or step_no == total)
            pre_norm = ds.grad_norm_before_step(eng) if logging_step else None
            lr = sched.get_last_lr()[0]
            eng.step()
            meter.add(micro * info.world)
            if not boundary:
                continue
            state["step"] = step_no
            if logging_step:
                health.sync(info)
                clock.tick()
                rate, eta = meter.window(step_no)
                gn = pre_norm if pre_norm is not None else eng.get_global_grad_norm()
                log.write("train", step=step_no, epoch=epoch, loss=loss.item(), lr=lr, img_per_s=rate,
                          grad_norm=None if gn is None else float(gn), bad_samples=health.bad, **clock.fields())
                log.update(step_no, total, f"ep {epoch + 1}/{cfg.epochs} step {step_no}/{total} "
                           f"loss {loss.item():.4f} lr {lr:.2e} {rate:.0f} img/s ETA {fmt_eta(eta)}")
            if cfg.ckpt_every_steps and step_no % cfg.ckpt_every_steps == 0 and step_no % steps_per_epoch:
                checkpoint()
            if stop_requested(info):
                checkpoint()
                log.say(f"stop requested: saved step {step_no}; re-run the same command to resume")
                return {"interrupted": True, "step": step_no}
        epoch_done = state["step"] // steps_per_epoch
        if epoch_done % cfg.eval_every_epochs == 0 or state["step"] == total:
            metrics = evaluate(eng, val, info, dtype, job.max_bad_fraction)
            clock.tick()
            state["last_eval"] = {**metrics, "epoch": epoch_done, "step": state["step"]}
            log.write("eval", step=state["step"], epoch=epoch_done, **metrics, **clock.fields())
            log.say(f"eval after epoch {epoch_done}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}%")
        checkpoint()

    clock.tick()
    final = {**(state["last_eval"] or {}), **clock.fields(), "steps": total, "world": info.world,
             "bad_samples": state["bad_samples"]}
    with ds.full_params(eng):
        if info.is_main:
            job.export(eng.module, total, final)
    barrier(info)
    log.write("done", **final)
    if log.wandb is not None:
        log.wandb.log_shards(job.label, job.export_dir)
    log.say(f"done: top-1 {final.get('top1', float('nan')):.2f}%, {final['device_seconds']:.0f} device-s; "
            f"shards in {job.export_dir}")
    return final
