"""Fashion-MNIST, the embedded real dataset of the demo and the tests, read from its idx files."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from .contract import select_fraction, subset
from .source import MapSource

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MEAN, STD = 0.2860, 0.3530
HOW_TO_GET = ("install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu: idx files under "
              "/usr/share/datasets/fashion-mnist), or put the four *-ubyte.gz files of "
              "github.com/zalandoresearch/fashion-mnist in a directory and set data.root to it")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise UserError(f"{path}: truncated idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {data.size}")
    return data.reshape(dims)


def load(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 28, 28] and int64 labels [N] of the 'train' or 'test' split."""
    root = Path(root)
    img_name, lbl_name = FILES[split]
    for name in (img_name, lbl_name):
        if not (root / name).is_file():
            raise UserError(f"Fashion-MNIST file {root / name} not found: {HOW_TO_GET}")
    images = _read_idx(root / img_name)
    labels = _read_idx(root / lbl_name)
    if len(images) != len(labels):
        raise UserError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class ImageTensorDataset(MapSource):
    """In-memory grayscale images; train transform = 2-pixel-pad random crop + horizontal flip.

    Training indices come as ``(index, aug_seed)`` from TrainSampler: augmentation depends only on
    (run seed, epoch, index), not on worker count, process RNG or where a resumed run restarted.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train: bool, img_size: int,
                 ids: torch.Tensor | None = None, repeats: int = 1, seed: int = 0):
        self.images, self.labels, self.train, self.img_size = images, labels, train, img_size
        self.ids = ids if ids is not None else torch.arange(len(labels))  # index in the original split: the key
        self.repeats, self.seed = repeats, seed

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
        return (x - MEAN) / STD, self.labels[i], str(int(self.ids[i]))


def build(cfg: DataConfig, img_size: int, seed: int, repeats: int):
    tr_x, tr_y = load(cfg.root, "train")
    ids = torch.arange(len(tr_y))
    if cfg.fraction < 1:
        keep = torch.from_numpy(select_fraction([str(i) for i in range(len(tr_y))], tr_y.numpy(), cfg.fraction))
        tr_x, tr_y, ids = tr_x[keep], tr_y[keep], ids[keep]
    if (idx := subset(len(tr_y), cfg.train_limit, seed)) is not None:
        tr_x, tr_y, ids = tr_x[idx], tr_y[idx], ids[idx]
    te_x, te_y = load(cfg.root, "test")
    if cfg.eval_limit:
        te_x, te_y = te_x[:cfg.eval_limit], te_y[:cfg.eval_limit]
    return (ImageTensorDataset(tr_x, tr_y, True, img_size, ids, repeats, seed),
            ImageTensorDataset(te_x, te_y, False, img_size, seed=seed))
