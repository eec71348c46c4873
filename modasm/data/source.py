"""The interface every source's datasets share, so the training loop never asks what kind it has.

``configure(rank, world, micro, workers)`` places the dataset in a launch (its rank's share, the
micro-batch, loader workers); ``set_epoch(epoch, start)`` positions training at ``start`` samples of
this rank into ``epoch`` (resume at the exact batch); ``loader()`` returns the DataLoader of Batches.
Map-style datasets (Fashion-MNIST, ImageFolder) get that from ``MapSource`` through the samplers;
webdataset streams (``wds.ShardStream``) deal samples themselves.
"""
from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from .contract import collate
from .samplers import EvalSampler, TrainSampler


class MapSource(Dataset):
    """Base of the map-style datasets: items are indices (eval) or ``(index, aug_seed)`` (train)."""

    train: bool
    seed: int
    repeats: int

    def configure(self, rank: int, world: int, micro: int, workers: int) -> None:
        self.micro, self.workers = micro, workers
        self.sampler = (TrainSampler(len(self), rank, world, self.seed, self.repeats) if self.train
                        else EvalSampler(len(self), rank, world))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def loader(self) -> DataLoader:
        # drop_last in training: every optimizer step sees a full micro-batch on every rank
        return DataLoader(self, batch_size=self.micro, sampler=self.sampler, drop_last=self.train,
                          collate_fn=collate, num_workers=self.workers,
                          persistent_workers=self.train and self.workers > 0)
