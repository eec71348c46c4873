"""The one training loop every phase uses: step, accumulate, clip, evaluate, checkpoint, resume.

``train(job, train_ds, val_ds, info)`` trains ``job.model`` (whatever of it has ``requires_grad``)
through a DeepSpeed engine, evaluates on the sharded validation set, saves resume state, and finally
hands the trained model to ``job.export``. Re-running a finished job does nothing; re-running an
interrupted one resumes from its newest complete checkpoint at the exact batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from . import engine as ds
from . import faults, perf, seeds, speed
from .config import AugConfig, DeepSpeedConfig, PhaseConfig, SpeedConfig, fingerprint_changes
from .config import fingerprint as config_fingerprint
from .data import Bad, Batch, SeededMixup, eval_loader, to_device, train_loader
from .dist import DistInfo, all_reduce_sum, barrier
from .errors import UserError
from .metrics import CostClock, MetricsLog
from .shards import read_manifest

_STOP = {"requested": False}


def request_stop(*_):
    """Ask the running loop to checkpoint and return at the next optimizer step (signal handler).

    Repeats change nothing: under Slurm a preemption's SIGTERM reaches a rank twice (from slurmstepd and
    forwarded by torchrun); a hard stop is SIGKILL (Slurm's KillWait, torchrun's 30 s grace)."""
    _STOP["requested"] = True


STOP_FILE_ENV = "MODASM_STOP_FILE"


def note_failure(message: str) -> None:
    """Under the Slurm scripts ($MODASM_STOP_FILE set): add this process's error, as one line, to the job's record
    of failures (``<stop file>.failed``), which the batch shell prints as the last lines of a failed job's log."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    if stop_file:
        with contextlib.suppress(OSError), open(f"{stop_file}.failed", "a") as f:
            f.write(" ".join(message.split())[:500] + "\n")


def step_flags(info: DistInfo, bad_loss: torch.Tensor | None = None,
               grad_norm: torch.Tensor | None = None) -> tuple[bool, bool, bool]:
    """(stop, non-finite loss, non-finite gradients) of this optimizer step, the same on every rank of the group:
    the step's one host sync (one all-reduce of three flags, one read), so checking the loss and gradients of
    every step costs no synchronisation of its own.

    Stop = SIGUSR1/SIGTERM reached any rank, or the file named by $MODASM_STOP_FILE exists (what the Slurm
    scripts touch when the batch shell gets the time-limit signal; it reaches ranks under torchrun on every
    node, which a signal to the batch shell does not): the ranks must checkpoint together. ``bad_loss``: a
    device flag, set when any micro-batch of the step had a non-finite loss on this rank; ``grad_norm``: the
    reduced gradients' norm on the device (the plain engine; the others check their gradients themselves).
    """
    stop_file = os.environ.get(STOP_FILE_ENV)  # one stat per step, on the group's first rank only
    asked = _STOP["requested"] or bool(info.rank == 0 and stop_file and os.path.exists(stop_file))
    # NCCL needs device tensors; made there (a fill), not copied from the host (a blocking copy)
    flags = [torch.ones((), device=info.device) if asked else torch.zeros((), device=info.device)]
    flags.append(bad_loss.float() if bad_loss is not None else torch.zeros((), device=info.device))
    flags.append((~torch.isfinite(grad_norm)).float() if grad_norm is not None else torch.zeros((), device=info.device))
    flags = torch.stack(flags)
    if info.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=info.group)
    stop, loss, grads = (v > 0 for v in flags.tolist())
    if stop:  # clear only when acting on it: a signal landing during the all-reduce waits for the next step
        _STOP["requested"] = False
    return stop, loss, grads


def stop_requested(info: DistInfo) -> bool:
    """True on every rank when any rank was asked to stop (see ``step_flags``)."""
    return step_flags(info)[0]


class NonFiniteError(UserError):
    """A phase met a non-finite loss or gradient norm (more often than its section's max_nonfinite_steps), or
    non-finite weights at a save."""


@dataclass
class Job:
    label: str                 # e.g. "meta", "incubate[2]"
    section: str               # the recipe section of its hyper-parameters
    out: Path                  # runs/<run>/<phase>[/module-XX]
    model: torch.nn.Module
    cfg: PhaseConfig
    ds: DeepSpeedConfig
    export: Callable[[dict, int, dict], None]  # (trained state dict, fp32 masters; step, metrics) -> shard set
    seed: int
    workers: int = 0
    eval_batch: int = 512
    fingerprint: dict | None = None  # recipe keys the result depends on; checked on re-run and resume
    base_hours: float = 0.0          # device-hours the pipeline spent before this phase (cost axis)
    base_flops: float = 0.0          # counted training FLOPs of the pipeline before this phase
    make_log: Callable[..., MetricsLog] | None = None  # (info, W&B run id or None) -> JSON lines (+ W&B)
    aug: AugConfig | None = None     # mixup/cutmix (soft targets) when it says so
    num_classes: int = 0             # of the soft targets (mixup)
    max_bad_fraction: float = 0.001  # stop when more of the samples read were unreadable
    speed: SpeedConfig = dataclasses.field(default_factory=SpeedConfig)  # fast paths (compile, checkpointing)
    peak_tflops: float = 0.0         # the device peak MFU is measured against (0: modasm.perf's table or probe)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "ckpt"

    @property
    def export_dir(self) -> Path:
        return self.out / "export"


@dataclass
class TrainState:
    """What a resume restores besides the engine (saved as DeepSpeed's client state)."""
    step: int = 0                  # optimizer steps done
    wall_seconds: float = 0.0      # of this phase, across resumes
    device_seconds: float = 0.0
    last_eval: dict | None = None
    best_top1: float | None = None  # the best evaluation so far (the paper reports the best epoch)
    samples_read: int = 0          # training samples read (group total), and how many were unreadable
    bad_samples: int = 0
    nonfinite_steps: int = 0       # optimizer steps skipped for a non-finite loss or gradient norm

    @classmethod
    def from_client(cls, client: dict) -> "TrainState":
        return cls(**{f.name: client[f.name] for f in dataclasses.fields(cls) if f.name in client})


# ---------------------------------------------------------------- unreadable samples


def check_bad(bad: int, read: int, max_fraction: float, what: str, examples: list[Bad], at_least: int = 0) -> None:
    if bad and bad > max_fraction * max(read, at_least):
        e = (f"; e.g. {examples[0].where} (key {examples[0].key}: {examples[0].reason})" if examples
             else " (examples on the other ranks)")
        raise UserError(f"{bad} of {read} {what} samples read so far ({bad / read:.2%}) were unreadable, more than "
                        f"data.max_bad_fraction={max_fraction}{e}. Repair or remove those files (or re-make the "
                        "shards with launch/make_shards.py), or raise data.max_bad_fraction")


class DataHealth:
    """Unreadable samples of a phase: counted per rank, summed over the group at log/eval time.

    ``read``/``bad`` are group totals as of the last ``sync`` (kept in resume state). A phase stops with
    a UserError once more than ``max_fraction`` of the samples read were bad, counting at least one
    epoch's worth (``epoch``): a few bad samples early in the first epoch do not stop a phase that
    stays under the limit.
    """

    def __init__(self, max_fraction: float, read: int = 0, bad: int = 0, epoch: int = 0):
        self.max_fraction, self.read, self.bad, self.epoch = max_fraction, read, bad, epoch
        self._read = self._bad = 0
        self.examples: list[Bad] = []

    def add(self, batch: Batch) -> None:
        self._read += len(batch.keys) + len(batch.bad)
        self._bad += len(batch.bad)
        self.examples += batch.bad[:max(0, 5 - len(self.examples))]

    def pending(self, info: DistInfo) -> torch.Tensor:
        """The counts since the last sync, summed over the group: a device tensor [read, bad], enqueued (no host
        sync: copied from pinned memory). Read it and hand the values to ``settle``."""
        local = torch.tensor([self._read, self._bad], dtype=torch.float64)
        self._read = self._bad = 0
        if info.device.type == "cuda":
            return all_reduce_sum(local.pin_memory().to(info.device, non_blocking=True), info)
        return all_reduce_sum(local.to(info.device), info)

    def settle(self, read: float, bad: float) -> None:
        """Add the group's counts read from ``pending``; past the limit, a UserError."""
        self.read += int(read)
        self.bad += int(bad)
        check_bad(self.bad, self.read, self.max_fraction, "training", self.examples, self.epoch)

    def sync(self, info: DistInfo) -> None:
        self.settle(*self.pending(info).tolist())


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, info: DistInfo, dtype: torch.dtype = torch.float32,
             max_bad_fraction: float | None = None, dataset=None, non_blocking: bool = False) -> dict:
    """Top-1/top-5 and loss over the rank-sharded validation set; every sample counted once.

    Unreadable samples are skipped and counted (``eval_bad_samples``); past ``max_bad_fraction`` of
    the samples read, a UserError. ``dataset``: the loader's, whose transform finishes its batches on the
    device (uint8 / GPU decode backends). The batches only enqueue work: one host sync per evaluation (its read).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=info.device)  # correct@1, correct@5, loss sum, count, bad
    examples = []
    for batch in loader:
        batch = to_device(dataset, batch, info.device, non_blocking)
        if batch.bad:
            sums[4] += len(batch.bad)
            examples += batch.bad[:1]
        if batch.x is None:
            continue
        x, y = batch.x.to(dtype), batch.y
        logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[:4] += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(),
                                 F.cross_entropy(logits, y, reduction="sum"),
                                 y.new_full((), len(y))]).double()  # a fill, not a copy from the host
    all_reduce_sum(sums, info)
    model.train(was_training)
    top1, top5, loss, n, bad = sums.tolist()  # the evaluation's one read
    n, bad = int(n), int(bad)
    if max_bad_fraction is not None:
        check_bad(bad, n + bad, max_bad_fraction, "validation", examples)
    count = max(n, 1)
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count,
            "eval_loss": loss / count, "eval_samples": n, "eval_bad_samples": bad}


# ---------------------------------------------------------------- finished phases and changed settings


def _refuse_changes(old: dict | None, new: dict | None, what: Path, out: Path) -> None:
    if old is None or new is None:
        return
    changes = fingerprint_changes(old, new)
    if changes:
        raise UserError(f"{what} was made with other settings ({'; '.join(changes[:5])}); run the original "
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


# ---------------------------------------------------------------- the loop


def train(job: Job, train_ds, val_ds, info: DistInfo) -> dict:
    if (done := finished(job.out, job.label, info, job.fingerprint, job.section)) is not None:
        return done
    plan = ds.plan(job.cfg, info.world, job.section, len(train_ds))
    fast = dict(pin_memory=speed.pin_memory(job.speed, info.device), uint8=speed.wanted(job.speed.uint8_batches, info.device))
    loader = train_loader(train_ds, plan.micro, info.rank, info.world, job.workers, **fast)
    val = eval_loader(val_ds, job.eval_batch, info.rank, info.world, job.workers, **fast)
    faults.set_phase(job.label)
    newest = ds.latest(job.ckpt_dir)
    universal = False
    if newest is not None:  # before DeepSpeed touches it: a checkpoint of other settings is refused
        _refuse_changes(newest[1].get("fingerprint"), job.fingerprint, job.ckpt_dir / ds.tag(newest[0]), job.out)
        ds.verify(job.ckpt_dir, newest[0], newest[1], info)  # what was saved here, file for file, or refused
        if universal := ds.needs_universal(job.ckpt_dir, newest[0], newest[1], info.world):
            ds.to_universal(job.ckpt_dir, newest[0], info)
    # model FLOPs per image, counted on a meta copy before the fast paths (no data, RNG or weight touched)
    meter = perf.Meter.for_model(job.model, info.device, job.ds.precision, job.peak_tflops)
    speed.prepare_model(job.model, job.speed, info.device)
    eng, sched = ds.build_engine(job.model, job.cfg, job.ds, info, plan, speed.optimizer_kwargs(job.speed, info.device),
                                 universal)
    wandb_id = newest[1].get("wandb_run_id") if newest is not None else None  # one W&B run across restarts
    log = (job.make_log(info, wandb_id) if job.make_log
           else MetricsLog(job.out / "metrics.jsonl", job.label, info.is_main))
    try:
        return _Run(job, plan, eng, sched, train_ds, loader, (val, val_ds), log, info, meter).run(newest, universal)
    finally:
        log.close()


class _Run:
    """One run of a phase's loop, from a fresh start or a checkpoint to its end or a stop request."""

    def __init__(self, job: Job, plan: ds.Plan, eng, sched: ds.Schedule, train_ds, loader, val, log: MetricsLog,
                 info: DistInfo, meter: perf.Meter):
        self.job, self.cfg, self.plan, self.eng, self.sched, self.meter = job, job.cfg, plan, eng, sched, meter
        self.train_ds, self.loader, (self.val, self.val_ds), self.log, self.info = train_ds, loader, val, log, info
        self.non_blocking = speed.pin_memory(job.speed, info.device)
        self.mixup = SeededMixup(job.aug, job.cfg.label_smoothing, job.num_classes) if job.aug and job.aug.mixes else None
        self.dtype = ds.input_dtype(eng)
        self.stop, self.bad_loss = False, None
        self.wandb_id = None  # the W&B run this phase logs to, kept in every checkpoint's marker

    def run(self, newest, universal: bool = False) -> dict:
        job, plan, info, log = self.job, self.plan, self.info, self.log
        self.state = TrainState()
        self.restart_epoch_data = False  # the data of the resumed epoch starts over (see below)
        if newest is not None:
            self.state = TrainState.from_client(ds.load(self.eng, job.ckpt_dir, newest[0], info, universal))
            self.sched.restore(self.state.step)
            self.wandb_id = newest[1].get("wandb_run_id")
            log.backfill_wandb(self.state.step)  # what a killed run's W&B service dropped
            log.write("resume", step=self.state.step, world=info.world)  # later records supersede any after it
            saved_world = newest[1].get("world", info.world)
            log.say(f"resuming from step {self.state.step}/{plan.total} ({job.ckpt_dir / ds.tag(self.state.step)})"
                    + (f" on {info.world} ranks (saved by {saved_world})" if saved_world != info.world else ""))
            if saved_world != info.world and not self.train_ds.position_is_global and self.state.step % plan.steps_per_epoch:
                # a stream's position is per rank: on another number of ranks the epoch's data starts over
                self.restart_epoch_data = True
                log.say(f"the rank count changed mid-epoch: this epoch's data restarts from its beginning (the "
                        f"{self.state.step % plan.steps_per_epoch} steps already taken in it see their samples again)")
        else:
            torch.manual_seed(seeds.rank(job.seed, info.rank))  # drop path / dropout; data has its own seeds
            log.say(f"plan: {plan.describe(self.cfg.batch_size)}")
            log.write("start", total_steps=plan.total, steps_per_epoch=plan.steps_per_epoch, world=info.world,
                      micro_batch=plan.micro, accum_steps=plan.accum, batch_size=self.cfg.batch_size,
                      base_hours=job.base_hours, base_flops=job.base_flops, flops_per_image=self.meter.flops_per_image,
                      peak_tflops=self.meter.peak.tflops, peak_source=self.meter.peak.source,
                      trainable_params=sum(p.numel() for p in job.model.parameters() if p.requires_grad),
                      total_params=sum(p.numel() for p in job.model.parameters()))
        self.clock = CostClock(info.world, self.state.wall_seconds, self.state.device_seconds, job.base_hours)
        self.health = DataHealth(job.max_bad_fraction, self.state.samples_read, self.state.bad_samples,
                                 epoch=plan.steps_per_epoch * plan.accum * plan.micro * info.world)
        per_step = self.cfg.batch_size
        log.meter(plan.total * per_step, self.state.step * per_step)
        self.eng.train()
        while self.state.step < plan.total:
            stopped = self.train_epoch()
            if self.state.step % plan.steps_per_epoch == 0:  # the epoch is complete (also when stopped at its end)
                self.maybe_evaluate()
                self.sched.after_epoch(self.state.step // plan.steps_per_epoch - 1)
            self.checkpoint()
            if stopped:
                log.say(f"stop requested: saved step {self.state.step}; re-run the same command to resume")
                stop_file = os.environ.get(STOP_FILE_ENV)
                if stop_file and info.is_main:  # tells the Slurm job to requeue, whoever got the signal
                    Path(f"{stop_file}.saved").touch()
                return {"interrupted": True, "step": self.state.step}
        return self.finish()

    # -- an epoch (or what is left of it after a resume) and its steps

    def train_epoch(self) -> bool:
        """Train to the end of the current epoch; True when a stop was requested (at ``state.step``)."""
        plan, cfg = self.plan, self.cfg
        epoch, in_epoch = divmod(self.state.step, plan.steps_per_epoch)
        start = 0 if self.restart_epoch_data else in_epoch * plan.accum * plan.micro
        self.restart_epoch_data = False
        self.train_ds.set_epoch(epoch, start=start)
        n_micro = (plan.steps_per_epoch - in_epoch) * plan.accum
        seen = 0
        for i, batch in enumerate(self.loader):
            if i == n_micro:
                break
            seen += 1
            if self.micro_step(batch, epoch, in_epoch * plan.accum + i):
                if self.stop:
                    return True
                step_no = self.state.step
                if cfg.ckpt_every_steps and step_no % cfg.ckpt_every_steps == 0 and step_no % plan.steps_per_epoch:
                    self.checkpoint()
        if seen < n_micro:
            raise UserError(f"{self.job.label}: epoch {epoch} gave {seen} of the {n_micro} micro-batches planned on "
                            f"rank {self.info.rank}: the training data changed under the run (fewer samples than "
                            "when the phase was planned); restore it, or move the phase's directory aside to restart")
        return False

    def micro_step(self, batch: Batch, epoch: int, micro_no: int) -> bool:
        """Forward/backward one micro-batch (the optimizer steps at accumulation boundaries); True at one.

        At a boundary, the step's one host sync (``step_flags``) tells every rank alike whether to stop after it,
        and whether its loss or gradients were non-finite: such a step never changes the weights (``nonfinite``).
        """
        cfg, plan, info, eng = self.cfg, self.plan, self.info, self.eng
        batch = to_device(self.train_ds, batch, info.device, self.non_blocking)  # GPU backends: decode failures -> bad
        self.health.add(batch)
        step_no = self.state.step + 1
        loss = faults.poison(self._loss(batch, seeds.mixup(self.job.seed, epoch, micro_no, info.rank)), step_no)
        bad = ~torch.isfinite(loss.detach())  # stays on the device until the step's sync
        self.bad_loss = bad if self.bad_loss is None else self.bad_loss | bad
        eng.backward(loss)
        if not eng.is_gradient_accumulation_boundary():
            eng.step()
            self.log.advance(plan.micro * info.world)
            return False
        logging_step = step_no % cfg.log_every_steps == 0 or step_no == plan.total
        pre_norm = ds.grad_norm_before_step(eng)  # plain engine only; on the device
        self.stop, bad_loss, bad_grads = step_flags(info, self.bad_loss, pre_norm)
        self.bad_loss = None
        lr = self.sched.lr
        if bad_loss or bad_grads:
            self.nonfinite(step_no, epoch, "loss" if bad_loss else "grad norm")  # raises unless it may be skipped
        # ZeRO / bf16 engines skip a step with inf/NaN gradients themselves; the plain one is told to
        with ds.step_skipped(eng) if (bad_loss or bad_grads) and ds.grads_on_params(eng) else contextlib.nullcontext():
            eng.step()
        self.log.advance(plan.micro * info.world)
        if not (bad_loss or bad_grads) and not eng.was_step_applied():  # ZeRO / bf16: DeepSpeed found inf/NaN
            self.nonfinite(step_no, epoch, "grad norm")
        faults.poison_weights(eng.module, step_no)
        self.state.step = step_no
        self.sched.after_step(step_no)
        if logging_step:
            self.log_step(epoch, loss, lr, pre_norm)
        faults.after_step(step_no)
        return True

    def nonfinite(self, step_no: int, epoch: int, what: str, skippable: bool = True) -> None:
        """Optimizer step ``step_no`` had a non-finite ``what``: it is skipped (the weights stay as they were)
        while ``max_nonfinite_steps`` allows, else the phase stops here, saving nothing from this step."""
        job, allowed = self.job, (self.cfg.max_nonfinite_steps if skippable else 0)
        self.state.nonfinite_steps += 1
        n = self.state.nonfinite_steps
        self.log.write("nonfinite", step=step_no, epoch=epoch, what=what, count=n, allowed=allowed)
        if n <= allowed:
            self.log.say(f"step {step_no}: non-finite {what}; step skipped, the weights unchanged ({n} of "
                         f"{job.section}.max_nonfinite_steps={allowed})")
            return
        steps = ds.complete_steps(job.ckpt_dir)
        resume = (f"the newest checkpoint (step {steps[-1]}, {job.ckpt_dir / ds.tag(steps[-1])}) stays the one a "
                  "re-run resumes from" if steps else "there is no checkpoint yet: a re-run starts the phase over")
        limit = (f"this is non-finite step {n}, more than {job.section}.max_nonfinite_steps={allowed}" if allowed else
                 f"lower {job.section}.lr or check the data" + (
                     f", or let up to N such steps be skipped (as mixed-precision loss scalers do) with "
                     f"{job.section}.max_nonfinite_steps=N" if skippable else ""))
        when = ("stopped before this step changed the weights, nothing of it was saved" if skippable else
                "stopped before they were saved")
        raise NonFiniteError(f"{job.label}: non-finite {what} at step {step_no}/{self.plan.total} (epoch {epoch + 1}); "
                             f"{when}: {resume}; {limit}")

    def _loss(self, batch: Batch, mix_seed: int) -> torch.Tensor:
        eng, info, dtype = self.eng, self.info, self.dtype
        if batch.x is None:  # a zero-weight step keeps this rank in lockstep with the others (DeepSpeed collectives)
            pe = eng.module.patch_embed
            blank = torch.zeros(1, pe.proj.in_channels, *pe.img_size, device=info.device, dtype=dtype)
            return eng(blank).float().sum() * 0.0
        x, y = batch.x, batch.y  # on the device (to_device)
        if self.mixup is None:
            return F.cross_entropy(eng(x.to(dtype)).float(), y, label_smoothing=self.cfg.label_smoothing)
        x, soft = self.mixup(x, y, mix_seed)  # mixed in fp32, smoothing inside the soft targets
        return SoftTargetCrossEntropy()(eng(x.to(dtype)).float(), soft)

    def log_step(self, epoch: int, loss: torch.Tensor, lr: float, pre_norm: torch.Tensor | None) -> None:
        """The logged step's record: its one host sync reads the loss, the grad norm and the group's data-health
        counts together (``pre_norm``: the plain engine's norm on the device; the others report their own)."""
        step_no, total, log = self.state.step, self.plan.total, self.log
        gn = pre_norm if pre_norm is not None else self.eng.get_global_grad_norm()
        reads = [loss.detach().double().reshape(1), self.health.pending(self.info)]
        on_device = isinstance(gn, torch.Tensor) and gn.device == loss.device
        if on_device:
            reads.append(gn.detach().double().reshape(1))
        loss, read, bad, *norm = torch.cat(reads).tolist()  # the one read
        self.health.settle(read, bad)
        gn = norm[0] if on_device else gn
        self.clock.tick()
        rate, eta = log.rate_eta()
        perf_fields = self.meter.fields(rate / self.info.world)  # model TFLOP/s and MFU per rank
        log.write("train", step=step_no, epoch=epoch, loss=loss, lr=lr, img_per_s=rate,
                  grad_norm=None if gn is None else float(gn), bad_samples=self.health.bad, **perf_fields,
                  **self.cost())
        mfu = "" if perf_fields["mfu"] is None else f" MFU {100 * perf_fields['mfu']:.1f}%"
        log.show(f"ep {epoch + 1}/{self.cfg.epochs} step {step_no}/{total} loss {loss:.4f} lr {lr:.2e} "
                 f"{rate:.0f} img/s{mfu} ETA {eta}")

    def cost(self) -> dict:
        """What the phase has spent so far: device time (measured: wall x ranks) and training FLOPs (counted: the
        model's FLOPs per image x the images of the optimizer steps done), each also for the pipeline so far."""
        flops = self.meter.flops_per_image * self.cfg.batch_size * self.state.step
        return {**self.clock.fields(), "train_flops": flops, "pipeline_train_flops": self.job.base_flops + flops}

    # -- evaluation, checkpoints, the end

    def maybe_evaluate(self) -> None:
        epoch_done = self.state.step // self.plan.steps_per_epoch
        if epoch_done % self.cfg.eval_every_epochs and self.state.step != self.plan.total:
            return
        metrics = evaluate(self.eng, self.val, self.info, self.dtype, self.job.max_bad_fraction, self.val_ds,
                           self.non_blocking)
        self.clock.tick()
        self.state.last_eval = {**metrics, "epoch": epoch_done, "step": self.state.step}
        self.state.best_top1 = max(self.state.best_top1 or metrics["top1"], metrics["top1"])
        self.log.write("eval", step=self.state.step, epoch=epoch_done, **metrics, **self.cost())
        self.log.say(f"eval after epoch {epoch_done}: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}%")

    def check_weights(self) -> None:
        """No checkpoint or shard set is ever written from non-finite weights (an update can overflow with finite
        gradients): one pass over the weights and one sync per save, which syncs anyway."""
        flag = (~ds.weights_finite(self.eng)).float()
        if bool(all_reduce_sum(flag, self.info).item()):
            step = self.state.step
            self.nonfinite(step, (step - 1) // self.plan.steps_per_epoch, "weights", skippable=False)

    def checkpoint(self) -> None:
        self.check_weights()
        self.health.sync(self.info)
        self.clock.tick()
        self.state.samples_read, self.state.bad_samples = self.health.read, self.health.bad
        self.state.wall_seconds, self.state.device_seconds = self.clock.wall, self.clock.device
        wandb = self.log.wandb.id if self.log.wandb is not None else self.wandb_id
        ds.save(self.eng, self.job.ckpt_dir, self.state.step, dataclasses.asdict(self.state), self.cfg.keep_ckpts,
                self.info, marker={"fingerprint": self.job.fingerprint, "wandb_run_id": wandb})

    def finish(self) -> dict:
        job, log, info = self.job, self.log, self.info
        self.check_weights()
        self.clock.tick()
        final = {**(self.state.last_eval or {}), **self.cost(), "steps": self.plan.total, "world": info.world,
                 "bad_samples": self.state.bad_samples, "best_top1": self.state.best_top1}
        state = ds.master_state(self.eng)  # fp32 masters under bf16; collective under ZeRO: every rank
        if info.is_main:
            job.export(state, self.plan.total, final)
        barrier(info)
        log.write("done", **final)
        if log.wandb is not None:
            log.wandb.log_shards(job.label, job.export_dir)
        log.say(f"done: top-1 {final.get('top1', float('nan')):.2f}%, {final['device_seconds']:.0f} device-s; "
                f"shards in {job.export_dir}")
        return final
