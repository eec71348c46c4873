"""Data sources and loaders. Every source yields (image tensor, label); one sampler contract.

Sources: ``fashion-mnist`` (the embedded dataset, read from its idx files). Training data is
sharded across ranks by a seeded per-epoch permutation (every sample once per epoch, ranks get
equal step counts); evaluation is sharded without padding, so accuracy counts each sample once.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig

FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
HOW_TO_GET_FMNIST = ("install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu: idx files under "
                     "/usr/share/datasets/fashion-mnist), or put the four *-ubyte.gz files of "
                     "github.com/zalandoresearch/fashion-mnist in a directory and set data.root to it")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {data.size}")
    return data.reshape(dims)


def load_fashion_mnist(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N] of the 'train' or 'test' split."""
    root = Path(root)
    img_name, lbl_name = FMNIST_FILES[split]
    for name in (img_name, lbl_name):
        if not (root / name).is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {root / name} not found: {HOW_TO_GET_FMNIST}")
    images = _read_idx(root / img_name)
    labels = _read_idx(root / lbl_name)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class ImageTensorDataset(Dataset):
    """In-memory grayscale images; train transform = 2-pixel-pad random crop + horizontal flip.

    Training indices come as ``(index, aug_seed)`` from TrainSampler: augmentation depends only on
    (run seed, epoch, index), not on worker count, process RNG or where a resumed run restarted.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train: bool, img_size: int):
        self.images, self.labels, self.train, self.img_size = images, labels, train, img_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        i, aug_seed = item if isinstance(item, tuple) else (item, None)
        x = self.images[i].float().div_(255.0).unsqueeze(0)  # [1, H, W]
        if self.train and aug_seed is not None:
            g = torch.Generator().manual_seed(aug_seed)
            x = torch.nn.functional.pad(x, (2, 2, 2, 2))
            dy, dx, flip = torch.randint(0, 5, (3,), generator=g).tolist()
            x = x[:, dy:dy + x.shape[1] - 4, dx:dx + x.shape[2] - 4]
            if flip % 2:
                x = x.flip(-1)
        if x.shape[-1] != self.img_size:
            x = torch.nn.functional.interpolate(x[None], size=self.img_size, mode="bilinear",
                                                align_corners=False)[0]
        return (x - FMNIST_MEAN) / FMNIST_STD, self.labels[i]


class TrainSampler(Sampler):
    """Seeded per-epoch permutation, dealt round-robin to ranks; every rank gets the same count.

    Yields ``(index, aug_seed)``. ``start`` skips that many of this rank's samples (resume mid-epoch
    at the exact position).
    """

    def __init__(self, n: int, rank: int, world: int, seed: int):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.world - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world
        mine = perm[self.rank::self.world][:per_rank][self.start:].tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return iter([(i, base + i) for i in mine])


class EvalSampler(Sampler):
    """Rank r evaluates samples r, r+W, ...: no padding, no duplicates across ranks."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


def _subset(images, labels, limit: int, seed: int):
    if not limit or limit >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:limit]
    return images[idx], labels[idx]


def build_datasets(cfg: DataConfig, img_size: int, seed: int) -> tuple[Dataset, Dataset]:
    if cfg.source == "fashion-mnist":
        tr_x, tr_y = _subset(*load_fashion_mnist(cfg.root, "train"), cfg.train_limit, seed)
        te_x, te_y = load_fashion_mnist(cfg.root, "test")
        if cfg.eval_limit:
            te_x, te_y = te_x[:cfg.eval_limit], te_y[:cfg.eval_limit]
        return ImageTensorDataset(tr_x, tr_y, True, img_size), ImageTensorDataset(te_x, te_y, False, img_size)
    raise ValueError(f"data.source={cfg.source!r} (root {cfg.root}) is not implemented yet: ImageNet-scale "
                     "sources (ImageFolder trees, webdataset shards) arrive with the data issue; today only "
                     "'fashion-mnist' trains. Models of this recipe build (see tests/test_recipes.py).")


def train_loader(ds: Dataset, micro_batch: int, rank: int, world: int, seed: int, workers: int):
    sampler = TrainSampler(len(ds), rank, world, seed)
    # drop_last: every optimizer step sees a full micro-batch on every rank.
    return DataLoader(ds, batch_size=micro_batch, sampler=sampler, drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0)


def eval_loader(ds: Dataset, batch: int, rank: int, world: int, workers: int):
    return DataLoader(ds, batch_size=max(1, batch // world), sampler=EvalSampler(len(ds), rank, world),
                      num_workers=workers)
