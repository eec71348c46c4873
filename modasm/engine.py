"""DeepSpeed in one place: config derived from the recipe, engine build, checkpoints, export.

Every phase trains through a real DeepSpeed engine (ZeRO stage, bf16/fp32, gradient clipping and
accumulation from the recipe). Resume state is DeepSpeed's own checkpoint, saved under
``ckpt/step-XXXXXXXX`` with a ``COMPLETE`` marker written after every rank has saved; the newest
complete step is found by number. DeepSpeed's loader unpickles, so the marker records every file's digest
and is signed (integrity.py): a checkpoint is verified before DeepSpeed loads or converts it. (Hand-offs
between phases are safetensors shard sets, see shards.py.)
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # name DeepSpeed's CPU accelerator instead of letting it guess
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from . import faults, integrity  # noqa: E402
from .config import DeepSpeedConfig, PhaseConfig  # noqa: E402
from .dist import DistInfo, barrier  # noqa: E402
from .errors import UserError  # noqa: E402
from .model import param_groups  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
CKPT_PREFIX = "step-"
COMPLETE = integrity.COMPLETE


@dataclass(frozen=True)
class Plan:
    """How a phase's global batch is made on this launch, and how long the phase is."""
    micro: int            # images per rank per forward/backward
    accum: int            # micro-batches per optimizer step
    world: int            # data-parallel ranks
    steps_per_epoch: int
    total: int

    def describe(self, batch: int) -> str:
        return (f"global batch {batch} = micro-batch {self.micro} x accumulation {self.accum} x {self.world} "
                f"rank(s); {self.steps_per_epoch} optimizer steps per epoch, {self.total} in all")


def accumulation(cfg: PhaseConfig, world: int, section: str) -> tuple[int, int]:
    """(micro-batch, accumulation steps) making ``cfg.batch_size`` on ``world`` ranks.

    With ``micro_batch`` (a per-rank limit) the accumulation is the fewest steps whose micro-batch fits;
    otherwise ``accum_steps`` as given.
    """
    if cfg.micro_batch:
        if cfg.batch_size % world:
            raise UserError(f"{section}.batch_size={cfg.batch_size} does not split over {world} ranks; use a "
                            f"multiple of {world}, or another number of ranks")
        per_rank = cfg.batch_size // world
        for accum in range(-(-per_rank // cfg.micro_batch), per_rank + 1):
            if per_rank % accum == 0:
                return per_rank // accum, accum
    per = cfg.accum_steps * world
    if cfg.batch_size % per:
        raise UserError(f"{section}.batch_size={cfg.batch_size} is not divisible by accum_steps x ranks "
                        f"= {cfg.accum_steps} x {world}; pick a multiple of {per}, or set {section}.micro_batch "
                        "(the per-GPU limit) instead of accum_steps")
    return cfg.batch_size // per, cfg.accum_steps


def plan(cfg: PhaseConfig, world: int, section: str, n_train: int) -> Plan:
    micro, accum = accumulation(cfg, world, section)
    steps_per_epoch = n_train // cfg.batch_size  # = (n // ranks) // micro // accum: the same on any rank count
    if steps_per_epoch < 1:
        raise UserError(f"{section}: {n_train} training samples give no full optimizer step of "
                        f"{cfg.batch_size}; lower {section}.batch_size")
    return Plan(micro, accum, world, steps_per_epoch, cfg.epochs * steps_per_epoch)


def ds_config(cfg: PhaseConfig, ds: DeepSpeedConfig, p: Plan) -> dict:
    zero = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=True if ds.overlap_comm is None else ds.overlap_comm,
                    contiguous_gradients=ds.contiguous_gradients)
        if ds.reduce_bucket_size:
            zero["reduce_bucket_size"] = ds.reduce_bucket_size
    out = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": p.micro,
        "gradient_accumulation_steps": p.accum,
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronizes the device at every forward and every
        # step() (from its third step on): two host syncs per micro-batch, for a figure nothing here reads
        "timers": {"throughput": {"enabled": False}},
        "zero_allow_untested_optimizer": True,
    }
    if ds.precision == "bf16":
        # DeepSpeed's default under bf16 is to accumulate and reduce gradients in bf16 (8 mantissa bits); with
        # fp32 accumulation ZeRO-1 trains through BF16_Optimizer, ZeRO-2/3 keep fp32 gradient partitions.
        out["data_types"] = {"grad_accum_dtype": ds.grad_accum_dtype}
        out["communication_data_type"] = ds.communication_dtype
    return out


class Schedule:
    """The learning rate, from timm's ``CosineLRScheduler`` (warm-up from ``warmup_lr``, cosine to ``min_lr``
    over all epochs including the warm-up, as the paper's code and DeiT build it).

    ``lr_schedule: epoch`` steps it as the paper's ``main.py`` does: once after each epoch
    (``sched.step(epoch)``), so epoch e trains at the schedule's value at e-1 (epoch 0 at its value at 0).
    ``lr_schedule: step`` updates it after every optimizer step (``step_update``), in units of steps.
    The lr is a function of the optimizer step, so a resume just sets it (``restore``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: PhaseConfig, steps_per_epoch: int):
        from timm.scheduler import CosineLRScheduler
        self.per_epoch, self.steps_per_epoch, self.optimizer = cfg.lr_schedule == "epoch", steps_per_epoch, optimizer
        unit = 1 if self.per_epoch else steps_per_epoch
        warmup = cfg.warmup_epochs * unit if self.per_epoch else int(round(cfg.warmup_epochs * unit))
        self.timm = CosineLRScheduler(optimizer, t_initial=cfg.epochs * unit, lr_min=cfg.min_lr, warmup_t=warmup,
                                      warmup_lr_init=cfg.warmup_lr, warmup_prefix=False, cycle_limit=1,
                                      t_in_epochs=self.per_epoch)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def after_step(self, step: int) -> None:
        """``step`` optimizer steps are done."""
        if not self.per_epoch:
            self.timm.step_update(step)

    def after_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` (0-based) is done."""
        if self.per_epoch:
            self.timm.step(epoch)

    def restore(self, step: int) -> None:
        """The lr of a run that has done ``step`` optimizer steps (resume)."""
        if self.per_epoch:  # (the value at 0 is also what the scheduler starts with)
            self.timm.step(max(step // self.steps_per_epoch - 1, 0))
        else:
            self.timm.step_update(step)


def build_engine(model: torch.nn.Module, cfg: PhaseConfig, ds: DeepSpeedConfig, info: DistInfo, p: Plan,
                 optimizer_kwargs: dict | None = None, universal: bool = False):
    """The engine and the lr schedule; ``universal``: it will load a universal checkpoint (another world size)."""
    peak = cfg.lr * cfg.batch_size / 512
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_tokens), lr=peak,
                                  betas=(0.9, 0.999), **(optimizer_kwargs or {}))
    schedule = Schedule(optimizer, cfg, p.steps_per_epoch)
    config = ds_config(cfg, ds, p)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    if grads_on_params(engine) and engine.dp_world_size == 1:
        # One data-parallel rank, plain engine: DeepSpeed's gradient all-reduce flattens every gradient into one
        # buffer, all-reduces it over this rank alone, divides by 1 and copies it back: no value changes
        # (tests/test_engine.py), ~5 % of a CPU step (docs/benchmarks.md, bench-step). ZeRO keeps its own path.
        engine.enable_backward_allreduce = False
    return engine, schedule


def input_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def grads_on_params(engine) -> bool:
    """True for the plain fp32 engine, which leaves the (reduced) gradients on the parameters until its step.
    ZeRO and bf16 engines keep them in their own buffers, check them for inf/NaN themselves and skip such a
    step (``was_step_applied()`` is False after it; the norm they report is inf)."""
    return not (engine.zero_optimization() or engine.bfloat16_enabled())


def grad_norm_before_step(engine) -> torch.Tensor | None:
    """Global gradient norm (before clipping) where the plain fp32 engine leaves grads on the params, as a
    0-dim tensor on the device (reading it is the caller's host sync); None for the other engines, which
    report the norm themselves (``get_global_grad_norm`` after the step)."""
    if not grads_on_params(engine):
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g.float() for g in grads])))  # no host sync


def weights_finite(engine) -> torch.Tensor:
    """A device flag: every trainable weight this rank holds is finite (its ZeRO-3 partition). Read at a save."""
    local = [getattr(p, "ds_tensor", p) for p in engine.module.parameters() if p.requires_grad]
    local = [t for t in local if t.numel()]
    if not local:
        return torch.ones((), dtype=torch.bool, device=engine.device)
    return torch.stack([torch.isfinite(t).all() for t in local]).all()


@contextlib.contextmanager
def step_skipped(engine):
    """The plain engine's ``step()`` in this block changes no weight and no optimizer state (a skipped step);
    DeepSpeed still clips and zeroes the gradients and counts the step, so its accumulation stays in line."""
    with _overriding(engine.optimizer, "step", lambda *args, **kwargs: None):
        yield


@contextlib.contextmanager
def _overriding(obj, name: str, method):
    """``obj.name`` is ``method`` in this block (on this instance only); what it was is restored after."""
    had, inner = name in obj.__dict__, obj.__dict__.get(name)
    setattr(obj, name, method)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, inner)
        else:
            delattr(obj, name)


def master_state(engine) -> dict[str, torch.Tensor]:
    """The model's state dict as fp32 CPU tensors, parameters from the optimizer's fp32 master copies.

    Under bf16 the module holds bf16-rounded weights; the optimizer's fp32 masters are what training
    continues from, so they are what a phase hands on. Collective under ZeRO (every rank must call it).
    """
    from deepspeed.utils import safe_get_full_fp32_param
    masters = {}
    with full_params(engine):
        for name, p in engine.module.named_parameters():
            m = safe_get_full_fp32_param(p) if engine.bfloat16_enabled() and p.requires_grad else None
            if m is None and engine.bfloat16_enabled() and p.requires_grad:
                m = _unzero_master(engine, p)
            masters[name] = (p if m is None else m).detach().to("cpu", torch.float32, copy=True)
        state = {}
        for name, t in engine.module.state_dict().items():
            state[name] = masters[name] if name in masters else t.detach().to("cpu", copy=True)
    return state


def _unzero_master(engine, param) -> torch.Tensor:
    """fp32 master of ``param`` under bf16 without ZeRO (DeepSpeed's FP16_UnfusedOptimizer keeps one per
    parameter in ``fp32_groups``, no fragment mapping for safe_get_full_fp32_param)."""
    opt = engine.optimizer
    for lp_group, hp_group in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        for lp, hp in zip(lp_group, hp_group):
            if lp is param:
                return hp
    raise AssertionError(f"no fp32 master for a trainable parameter in {type(opt).__name__}")


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


@contextlib.contextmanager
def _recorded(engine):
    """The files DeepSpeed's checkpoint engine writes in this block (each rank its own), for the marker's
    digests; each one also counts for MODASM_FAULT_KILL_IN_CKPT (faults.py)."""
    ce, written = engine.checkpoint_engine, []
    inner = ce.save

    def save(state_dict, path):
        inner(state_dict, path)
        written.append(Path(path))
        faults.file_written("ckpt")
    with _overriding(ce, "save", save):
        yield written


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _needed_bytes(engine, ckpt_dir: Path) -> int:
    """About what a checkpoint takes: the newest complete one's size, else fp32 weights + AdamW's two moments."""
    steps = complete_steps(ckpt_dir)
    if steps:
        return _size(ckpt_dir / tag(steps[-1]))
    return 3 * 4 * sum(p.numel() for p in engine.module.parameters())


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, info: DistInfo,
         marker: dict | None = None) -> None:
    """Every rank saves (its own RNG too) and digests what it wrote; then the main rank seals the step (a
    signed ``COMPLETE`` marker with every file's digest and the world size that saved it) and prunes.

    A failure for lack of space is one line naming the path and the bytes needed; the step's partial files
    are removed and the previous checkpoints are untouched."""
    d = ckpt_dir / tag(step)
    needed = _needed_bytes(engine, ckpt_dir)
    if info.is_main and d.exists():  # a step is saved once: what is there is what a killed save left
        shutil.rmtree(d)
    barrier(info)
    faults.ckpt_started(step)
    try:
        with _recorded(engine) as written:
            engine.save_checkpoint(str(ckpt_dir), tag=tag(step), client_state=client_state, save_latest=False)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, _rng_file(ckpt_dir, step, info.rank))
        written.append(_rng_file(ckpt_dir, step, info.rank))
        faults.file_written("ckpt")
        barrier(info)
        integrity.seal(d, {"step": step, "world": info.world, **(marker or {})}, written, info)
    except Exception as e:  # re-raised unless it is a lack of space
        prev = complete_steps(ckpt_dir)
        err = integrity.space_error(e, d, needed, f"the checkpoint of step {step}", (
            "the partial checkpoint was removed and " + (f"the newest complete one (step {prev[-1]}) is intact"
                                                           if prev else "there is no earlier checkpoint") +
            ": free space (or raise the quota) and re-run the same command to resume"
            + (f" from step {prev[-1]}" if prev else "")))
        if err is None:
            raise
        shutil.rmtree(d, ignore_errors=True)
        raise err from e
    if info.is_main:
        _prune(ckpt_dir, keep, step)
    barrier(info)


def _prune(ckpt_dir: Path, keep: int, current: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (and their universal forms); remove the rest, including
    what killed saves and conversions left (never complete, never loaded)."""
    kept = set(complete_steps(ckpt_dir)[-keep:]) | {current}
    for d in ckpt_dir.iterdir():
        name = d.name.lstrip(".")
        if not (d.is_dir() and name.startswith(CKPT_PREFIX)):
            continue
        try:
            step = int(name[len(CKPT_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if step not in kept or d.name.startswith("."):
            shutil.rmtree(d, ignore_errors=True)


def latest(ckpt_dir: Path) -> tuple[int, dict] | None:
    """(step, marker) of the newest complete checkpoint, or None. Not yet verified: see ``verify``."""
    steps = complete_steps(ckpt_dir)
    if not steps:
        return None
    return steps[-1], integrity.read_marker(ckpt_dir / tag(steps[-1]))


def verify(ckpt_dir: Path, step: int, marker: dict, info: DistInfo) -> None:
    """Collective: checkpoint ``step`` is the one this machine saved, file for file, or CheckpointError."""
    integrity.verify(ckpt_dir / tag(step), marker, info)


# A checkpoint of ZeRO-1/2/3 or bf16 (DeepSpeed's bf16 optimizer) holds optimizer state partitioned over the
# ranks that saved it, and DeepSpeed refuses it on another data-parallel size. Resumed on another number of
# ranks, it is first converted to DeepSpeed's universal checkpoint (ds_to_universal), which any size loads.


def _universal_tag(step: int) -> str:
    return f"{tag(step)}-universal"


def needs_universal(ckpt_dir: Path, step: int, marker: dict, world: int) -> bool:
    """True when checkpoint ``step`` holds partitioned optimizer state (``*optim_states.pt`` per rank: ZeRO, or
    DeepSpeed's bf16 optimizer) and was saved by another number of ranks."""
    saved = marker.get("world", world)  # markers written before the world was recorded: assume unchanged
    return saved != world and any((ckpt_dir / tag(step)).glob("*optim_states.pt"))


def to_universal(ckpt_dir: Path, step: int, info: DistInfo) -> None:
    """Convert checkpoint ``step`` (once; on the main rank while the others wait) to the universal format.

    The conversion unpickles every file of the checkpoint: call it after ``verify``. Its output is sealed like
    a checkpoint, and verified before it is loaded."""
    out = ckpt_dir / _universal_tag(step)
    if info.is_main and (out / COMPLETE).is_file() and integrity.problem(out) is not None:
        shutil.rmtree(out)  # derived from the verified checkpoint: made again rather than trusted (or refused)
    if info.is_main and not (out / COMPLETE).is_file():
        from deepspeed.checkpoint import ds_to_universal
        tmp = ckpt_dir / f".{_universal_tag(step)}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        args = ds_to_universal.argparse.Namespace(
            input_folder=str(ckpt_dir / tag(step)), output_folder=str(tmp), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with open(ckpt_dir / "universal.log", "a") as log, contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
        integrity.write_marker(tmp, {"step": step, "from": tag(step)}, {})
        os.replace(tmp, out)
    barrier(info)
    out_marker = integrity.read_marker(out) if info.is_main else {}
    integrity.verify(out, out_marker, info)


def load(engine, ckpt_dir: Path, step: int, info: DistInfo, universal: bool = False) -> dict:
    """Restore engine, optimizer and (on an unchanged world) this rank's RNG; returns the client state."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=_universal_tag(step) if universal else tag(step))
    if path is None:
        raise UserError(f"{ckpt_dir / tag(step)}: DeepSpeed could not load this checkpoint; "
                        "move it aside to restart the phase from the previous one")
    rng = _rng_file(ckpt_dir, step, info.rank)
    if not universal and rng.is_file():  # on another world a rank keeps its fresh seed
        state = torch.load(rng, weights_only=True)
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    return client
