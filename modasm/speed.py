"""Fast paths chosen by the recipe's ``speed:`` section, applied to a phase's model and optimizer.

Each must give the results of the plain path (tests/test_speed.py); ``None`` in the recipe means
automatic: on with a GPU, off on CPU.
"""
from __future__ import annotations

import torch

from .config import SpeedConfig


def wanted(flag: bool | None, device: torch.device) -> bool:
    return flag if flag is not None else device.type == "cuda"


def prepare_model(model: torch.nn.Module, cfg: SpeedConfig, device: torch.device) -> torch.nn.Module:
    """Activation checkpointing and torch.compile, in place (parameter names, and so shards, unchanged)."""
    if cfg.checkpointing:
        # timm checkpoints every block; a block whose input and parameters need no gradient (the frozen
        # modules before k in hybrid(k)) has no backward, so it is never recomputed.
        model.set_grad_checkpointing(True)
    if wanted(cfg.compile, device):
        model.compile()
    return model


def optimizer_kwargs(cfg: SpeedConfig, device: torch.device) -> dict:
    return {"fused": True} if wanted(cfg.fused_optimizer, device) else {}
