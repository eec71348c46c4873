"""Fast paths chosen by the recipe's ``speed:`` section, applied to a phase's model, optimizer and loader.

Each gives the plain path's results, to the degree tests/test_speed.py states for it; ``None`` in the
recipe means automatic: on with a GPU, off on CPU.
"""
from __future__ import annotations

import torch

from .config import SpeedConfig


def wanted(flag: bool | None, device: torch.device) -> bool:
    return flag if flag is not None else device.type == "cuda"


def attention_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """timm's attention modules (each has ``fused_attn``: F.scaled_dot_product_attention or the explicit path)."""
    return [m for m in model.modules() if hasattr(m, "fused_attn")]


def prepare_model(model: torch.nn.Module, cfg: SpeedConfig, device: torch.device) -> torch.nn.Module:
    """Fused attention, activation checkpointing and torch.compile, in place (parameter names, and so
    shards, unchanged)."""
    for attn in attention_blocks(model):
        # timm decides at construction from TIMM_FUSED_ATTN / torch's SDPA; the recipe decides here
        attn.fused_attn = cfg.fused_attention
    if cfg.checkpointing:
        from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
        if use_reentrant_ckpt():  # TIMM_REENTRANT_CKPT=1: reentrant checkpointing drops the parameter gradients
            set_reentrant_ckpt(False)  # of a block whose input needs none (module k's first block in hybrid(k>0))
        # timm wraps every block in a non-reentrant checkpoint; a block whose input and parameters need no
        # gradient (the frozen modules before k in hybrid(k)) saves nothing, so it is never recomputed
        # (tests/test_speed.py counts the forward calls per block).
        model.set_grad_checkpointing(True)
    if wanted(cfg.compile, device):
        model.compile()
    return model


def optimizer_kwargs(cfg: SpeedConfig, device: torch.device) -> dict:
    return {"fused": True} if wanted(cfg.fused_optimizer, device) else {}


def pin_memory(cfg: SpeedConfig, device: torch.device) -> bool:
    """Pinned loader batches (and non_blocking copies): only where there is a device to copy to."""
    return device.type == "cuda" and wanted(cfg.pin_memory, device)
