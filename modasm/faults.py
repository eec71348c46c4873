"""Fault injection for the reliability tests (tests/test_faults.py, docs/reliability.md). Inert by default.

Nothing here does anything unless a ``MODASM_FAULT_*`` variable is set in the environment; each hook is one
dictionary lookup per call when none is. The faults are real: the process SIGKILLs itself (no cleanup, no
``finally``, exactly what the OOM killer or a vanished node leaves behind), or the loss / gradients really
become non-finite inside the real loop.

    MODASM_FAULT_KILL_AT_STEP=N      SIGKILL right after optimizer step N (before its checkpoint, if any)
    MODASM_FAULT_HANG_AT_STEP=N      hang right after optimizer step N, for good (a rank stuck in I/O or a collective:
                                     its signal handlers still run, the loop never comes back to act on them)
    MODASM_FAULT_KILL_IN_CKPT=N[:F]  SIGKILL while the resume checkpoint of step N is written, after F (default 1)
                                     of this process's files of it are complete (DeepSpeed's and the RNG file)
    MODASM_FAULT_KILL_IN_EXPORT=F    SIGKILL while the shard set is exported, after F module files are complete
                                     (the manifest, written last, is not)
    MODASM_FAULT_NONFINITE=W@N[,..]  make optimizer step N non-finite: W = loss (the loss is NaN, so are its
                                     gradients), grad (the loss stays finite, its gradients are inf/NaN) or
                                     weights (the step leaves an inf weight behind, as an overflowing update would)
  filters (all must match; unset = any):
    MODASM_FAULT_PHASE=P             the phase label (``e2e``, ``incubate[2]``) or its section (``incubate``)
    MODASM_FAULT_RANK=R              the process's rank in its launch (torchrun's RANK; a lone process is 0)
    MODASM_FAULT_RESTART=R           the run of a Slurm job (SLURM_RESTART_COUNT; 0 before any requeue, or outside Slurm)
"""
from __future__ import annotations

import os
import signal
import time

import torch

PREFIX = "MODASM_FAULT_"
_current = {"label": ""}  # the phase this process is training (set by the loop), for MODASM_FAULT_PHASE
_files = {"ckpt": 0, "export": 0}


def set_phase(label: str) -> None:
    _current["label"] = label
    _files.update(ckpt=0, export=0)


def _selected() -> bool:
    phase = os.environ.get(PREFIX + "PHASE")
    if phase and phase not in (_current["label"], _current["label"].split("[")[0]):
        return False
    rank = os.environ.get(PREFIX + "RANK")
    if rank and rank != os.environ.get("RANK", "0"):
        return False
    restart = os.environ.get(PREFIX + "RESTART")
    return not restart or restart == os.environ.get("SLURM_RESTART_COUNT", "0")


def _die(why: str) -> None:
    print(f"[fault] {_current['label']}: SIGKILL {why} (MODASM_FAULT_*)", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int) -> None:
    """Optimizer step ``step`` is done."""
    at = os.environ.get(PREFIX + "KILL_AT_STEP")
    if at and int(at) == step and _selected():
        _die(f"after step {step}")
    at = os.environ.get(PREFIX + "HANG_AT_STEP")
    if at and int(at) == step and _selected():
        print(f"[fault] {_current['label']}: hanging after step {step} (MODASM_FAULT_*)", flush=True)
        while True:
            time.sleep(3600)


def ckpt_started(step: int) -> None:
    _files["ckpt"] = 0
    _files["ckpt_step"] = step


def file_written(kind: str) -> None:
    """One more file of a checkpoint (``ckpt``) or a shard set (``export``) is complete on disk."""
    spec = os.environ.get(PREFIX + ("KILL_IN_CKPT" if kind == "ckpt" else "KILL_IN_EXPORT"))
    if not spec or not _selected():
        return
    _files[kind] += 1
    if kind == "ckpt":
        step, _, after = spec.partition(":")
        if int(step) != _files.get("ckpt_step"):
            return
        want = int(after or 1)
    else:
        want = int(spec)
    if _files[kind] == want:
        _die(f"after {want} file(s) of the {'checkpoint' if kind == 'ckpt' else 'shard set'} were written")


class _InfGrad(torch.autograd.Function):
    """Identity forward; the backward makes every gradient non-finite (the loss itself stays finite)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _wanted(what: str, step: int) -> bool:
    spec = os.environ.get(PREFIX + "NONFINITE")
    if not spec or not _selected():
        return False
    for item in spec.split(","):
        kind, _, at = item.strip().partition("@")
        if kind not in ("loss", "grad", "weights"):
            raise ValueError(f"{PREFIX}NONFINITE: {kind!r} is not 'loss', 'grad' or 'weights'")
        if kind == what and int(at) == step:
            return True
    return False


def poison_weights(module: torch.nn.Module, step: int) -> None:
    """After optimizer step ``step``: one trainable weight made inf when MODASM_FAULT_NONFINITE says so."""
    if _wanted("weights", step):
        with torch.no_grad():
            next(p for p in module.parameters() if p.requires_grad and p.numel()).view(-1)[0] = float("inf")


def poison(loss: torch.Tensor, step: int) -> torch.Tensor:
    """The loss of a micro-batch of optimizer step ``step``, made non-finite when MODASM_FAULT_NONFINITE says so."""
    if _wanted("loss", step):
        return loss * float("nan")
    if _wanted("grad", step):
        return _InfGrad.apply(loss)
    return loss
