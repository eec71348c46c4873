"""Samplers of the map-style sources: seeded per-epoch training order, padding-free evaluation shards."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler

from .. import seeds


class TrainSampler(Sampler):
    """Seeded per-epoch permutation, dealt round-robin to ranks; every rank gets the same count.

    Yields ``(index, aug_seed)``. ``start`` skips that many of this rank's samples (resume mid-epoch
    at the exact position). With ``repeats`` r > 1 (repeated augmentation, DeiT's RASampler) the
    epoch takes the first ceil(n / r) samples of the permutation r times each, consecutively, so the
    copies land on different ranks; the epoch length stays n.
    """

    def __init__(self, n: int, rank: int, world: int, seed: int, repeats: int = 1):
        self.n, self.rank, self.world, self.seed, self.repeats = n, rank, world, seed, repeats
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.world - self.start

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seeds.epoch(self.seed, self.epoch)))
        r = self.repeats
        idx = perm[:-(-self.n // r)].repeat_interleave(r)[:self.n].tolist()
        per_rank = self.n // self.world
        # position j of the epoch goes to rank j % world; its seed tells the r copies of a sample apart
        return iter([(idx[j], seeds.sample(self.seed, self.epoch, idx[j], r, j % r))
                     for j in range(self.rank, self.world * per_rank, self.world)[self.start:]])


class EvalSampler(Sampler):
    """Rank r evaluates samples r, r+W, ...: no padding, no duplicates across ranks."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
