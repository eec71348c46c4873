"""Every seed the pipeline derives from ``run.seed``, in one place.

Results depend on these values (data order, augmentation, mixup draws, initial weights), so each
formula is fixed: changing one changes every result made with it. Each is a function of the run seed,
a purpose, and that purpose's coordinates (epoch, sample, rank, ...), never of worker count, process
RNG state or where a resumed run restarted.
"""
from __future__ import annotations

_MOD = 2**63  # torch and Python seeds are 64-bit


def epoch(run_seed: int, ep: int) -> int:
    """The data order of an epoch (map-style permutation; the base of the per-sample seeds)."""
    return run_seed * 1_000_003 + ep


def sample(run_seed: int, ep: int, key: int, repeats: int = 1, copy: int = 0) -> int:
    """Augmentation of one sample in an epoch: ``key`` is its index (map-style) or key hash (streams);
    ``copy`` tells the repeated-augmentation copies of a sample apart."""
    return (epoch(run_seed, ep) * 10_000_019 + key * repeats + copy) % _MOD


def stream(run_seed: int, ep: int, rank: int, stream_no: int) -> int:
    """The shuffle buffer of one of a rank's webdataset streams in an epoch."""
    return (epoch(run_seed, ep) * 65_537 + rank) * 1031 + stream_no


def shard_order(run_seed: int, ep: int) -> list[int]:
    """numpy ``default_rng`` seed of the shard order of a webdataset epoch."""
    return [run_seed, ep]


def mixup(run_seed: int, ep: int, micro_no: int, rank: int) -> int:
    """Mixup/CutMix draws of one micro-batch (``micro_no`` counts micro-batches within the epoch)."""
    return (epoch(run_seed, ep) * 1_000_033 + micro_no) * 4099 + rank


def init(run_seed: int, salt: int) -> int:
    """Initial weights of a phase's model (the same on every rank and across re-runs)."""
    return run_seed * 7919 + salt


def rank(run_seed: int, rank_no: int) -> int:
    """A rank's process RNG at the start of training (drop path, dropout)."""
    return run_seed + 1000 * rank_no


def subset(run_seed: int) -> int:
    """Which samples ``data.train_limit`` keeps."""
    return run_seed
