"""Process groups in one place: init from torchrun (or a lone process), rank helpers, device.

One process or ``torchrun --nproc-per-node=N``: both go through ``init()``. On CPU the backend is
gloo, on GPU NCCL. (Rank groups for farming incubation across a (module, dp) mesh plug in here.)
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    group: object = None  # the data-parallel group of this rank (None: the default world group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> DistInfo:
    """Initialise torch.distributed once (idempotent). A lone process becomes a world of one."""
    lone = "RANK" not in os.environ  # not under torchrun: a world of one on a free local port
    if lone:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        # A lone process leaves the environment alone, so the processes it starts do not inherit a rank.
        extra = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1) if lone else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **extra)
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device)


def barrier(info: DistInfo | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=info.group if info else None)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=info.group)
    return t


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
