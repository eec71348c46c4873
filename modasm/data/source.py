"""The interface every source's datasets share, so the training loop never asks what kind it has.

``configure(rank, world, micro, workers)`` places the dataset in a launch (its rank's share, the
micro-batch, loader workers); ``set_epoch(epoch, start)`` positions training at ``start`` samples of
this rank into ``epoch`` (resume at the exact batch); ``loader()`` returns the DataLoader of Batches.
Map-style datasets (Fashion-MNIST, ImageFolder) get that from ``MapSource`` through the samplers;
webdataset streams (``wds.ShardStream``) deal samples themselves.
"""
from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset

from .contract import collate
from .samplers import EvalSampler, TrainSampler


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the training process: Slurm signals every process of a job
    step on preemption, and a worker killed by it would end the epoch before the checkpoint is saved."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def worker_options(workers: int, start_method: str | None) -> dict:
    """DataLoader options of ``workers`` worker processes started by ``start_method`` (None: Python's default;
    everything a worker receives pickles, so spawn and forkserver work).

    Every loader has its own generator: each iterator draws its workers' base seed from it; drawn from the
    global RNG it would shift the drop-path stream of a run resumed mid-epoch (whose iterator is made after
    the RNG restore)."""
    options = {"num_workers": workers, "generator": torch.Generator()}
    if workers:
        options.update(worker_init_fn=ignore_stop_signals, multiprocessing_context=start_method)
    return options


class MapSource(Dataset):
    """Base of the map-style datasets: items are indices (eval) or ``(index, aug_seed)`` (train)."""

    train: bool
    seed: int
    repeats: int
    start_method: str | None = None  # of the loader workers (data.worker_start)
    position_is_global = True  # set_epoch(start) names the same samples on any number of ranks

    def configure(self, rank: int, world: int, micro: int, workers: int) -> None:
        self.micro, self.workers = micro, workers
        self.sampler = (TrainSampler(len(self), rank, world, self.seed, self.repeats) if self.train
                        else EvalSampler(len(self), rank, world))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start)

    def loader(self) -> DataLoader:
        # drop_last in training: every optimizer step sees a full micro-batch on every rank
        return DataLoader(self, batch_size=self.micro, sampler=self.sampler, drop_last=self.train,
                          collate_fn=collate, persistent_workers=self.train and self.workers > 0,
                          **worker_options(self.workers, self.start_method))
