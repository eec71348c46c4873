"""Process groups in one place: init from torchrun (or a lone process), rank helpers, device.

One process or ``torchrun --nproc-per-node=N``: both go through ``init()``. On CPU the backend is
gloo, on GPU NCCL.

Farming incubation (``split_world``): the W ranks of the launch form G module groups of W/G consecutive
ranks (a (module, dp) layout; consecutive, so a group of 8 GPUs is one node). Each rank then *replaces*
its default process group with its group's, on the launch's own store: every collective from then on,
ours and DeepSpeed's (its checkpoint barriers and rank-0 writes use the world group and the global
rank), is confined to the group by construction, so groups never wait on each other.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    group: object = None  # the data-parallel group of this rank (None: the default world group)
    module_group: int = 0   # index g of this rank's module group (farmed incubation), else 0
    module_groups: int = 1  # G
    global_rank: int = -1   # rank in the launch (before a split); -1: same as rank
    nodes: int = 1          # torchrun agents (nodes) of the launch: world / ranks per node

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
        device = bind_device(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        # A lone process leaves the environment alone, so the processes it starts do not inherit a rank.
        extra = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1) if lone else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **extra)
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return DistInfo(rank=dist.get_rank(), world=world, local_rank=local_rank, device=device,
                    nodes=max(1, world // max(per_node, 1)))


def bind_device(local_rank: int, gpus: int, environ=os.environ) -> torch.device:
    """The GPU of the rank with this local rank on a node of ``gpus``: more ranks than GPUs (a farm on one GPU,
    benchmarks/gpu_check.sh) share them round robin. DeepSpeed takes the GPU from LOCAL_RANK itself, not from the
    current device (0.19.8: engine._set_distributed_vars calls set_device(LOCAL_RANK); zero.Init and zero.utils use
    device_name(os.environ["LOCAL_RANK"])), so LOCAL_RANK is set to the GPU's index when the two differ: rank 1 of
    two on one GPU would otherwise ask for cuda:1, an invalid device ordinal. ``DistInfo.local_rank`` keeps the
    launcher's."""
    index = local_rank % gpus
    if index != local_rank:
        environ["LOCAL_RANK"] = str(index)
    return torch.device("cuda", index)


def default_groups(K: int, world: int, multiple_of: int = 1) -> int:
    """As many groups as fit: the largest G <= K that divides the world (one module per group when W >= K),
    and is a multiple of ``multiple_of`` (the farm's launches, one per node) where one is."""
    fits = [g for g in range(1, min(K, world) + 1) if world % g == 0]
    return max([g for g in fits if g % multiple_of == 0] or fits)


def split_world(info: DistInfo, groups: int) -> DistInfo:
    """Turn this rank's world into its module group's (see the module docstring); returns the group's view.

    Collective over the launch once (all ranks must call it with the same ``groups``); never after.
    """
    if groups < 1 or info.world % groups:
        raise UserError(f"incubate.groups={groups} must divide the number of ranks ({info.world}); "
                         f"valid: {', '.join(str(g) for g in range(1, info.world + 1) if info.world % g == 0)}")
    if groups == 1:
        return DistInfo(**{**info.__dict__, "global_rank": info.rank})
    size = info.world // groups
    g, rank = divmod(info.rank, size)
    store = dist.distributed_c10d._get_default_store()
    # every rank has the store before the world group goes away: a barrier on the store itself, not an NCCL
    # collective (ranks sharing a GPU, e.g. a farm on one GPU, cannot form an NCCL communicator together)
    if store.add("modasm/split-world", 1) == info.world:  # the last to arrive lets everyone go
        store.set("modasm/split-world-go", "1")
    store.wait(["modasm/split-world-go"])
    backend = dist.get_backend()
    dist.destroy_process_group()
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"modasm/module-group-{g}", store),
                            rank=rank, world_size=size, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world=size, local_rank=info.local_rank, device=info.device,
                    module_group=g, module_groups=groups, global_rank=info.rank, nodes=info.nodes)


def barrier(info: DistInfo | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=info.group if info else None)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=info.group)
    return t


def shutdown() -> None:
    if dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and getattr(ds_comm.comm, "cdb", None) is not None:
            # DeepSpeed caches process groups (its world clone, data-parallel group): its own destroy drops them,
            # so that a process group made after this one (a later phase or test in the process) is not
            # handed a destroyed group by the next engine
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
