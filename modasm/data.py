"""Data sources and loaders. Every source yields samples (image tensor, label, key); one batch contract.

Sources (``data.source``): ``fashion-mnist`` (the embedded dataset, read from its idx files, with its own
fixed transform), ``imagefolder`` (``<root>/train/<class>/<image>``, ``<root>/val/...``: map-style) and
``webdataset`` (tar shards streamed from files or ``pipe:`` URLs; see ``webds.py``). The image sources
use timm's training transform (DeiT: RandAugment, random erasing) and batch-level mixup/cutmix.

Training data is sharded across ranks by a seeded per-epoch permutation (every sample once per epoch,
ranks get equal step counts); evaluation is sharded without padding, so accuracy counts each sample
once. Augmentation is a function of (run seed, epoch, sample) only, never of worker count or process
RNG, so a resumed run is bit-identical. Unreadable samples become ``Bad`` records: the collate drops
them from the batch, the loop counts them (``DataHealth``) and stops past ``data.max_bad_fraction``.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from .config import AugConfig, DataConfig

FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
HOW_TO_GET_FMNIST = ("install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu: idx files under "
                     "/usr/share/datasets/fashion-mnist), or put the four *-ubyte.gz files of "
                     "github.com/zalandoresearch/fashion-mnist in a directory and set data.root to it")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")


# ---------------------------------------------------------------- the sample and batch contract


@dataclass(frozen=True)
class Bad:
    """A sample that could not be read (truncated image, missing label, unreadable shard)."""
    key: str
    where: str   # the file or shard it came from
    reason: str


class Batch(NamedTuple):
    x: torch.Tensor | None   # [B, C, H, W]; None when every sample of the batch was bad
    y: torch.Tensor | None   # [B] int64
    keys: list
    bad: list                # Bad records of the samples dropped from this batch


def collate(samples: list) -> Batch:
    """Stack the good (image, label, key) samples; bad ones are dropped and handed on for counting."""
    good = [s for s in samples if not isinstance(s, Bad)]
    bad = [s for s in samples if isinstance(s, Bad)]
    if not good:
        return Batch(None, None, [], bad)
    x, y = default_collate([(s[0], s[1]) for s in good])
    return Batch(x, y, [s[2] for s in good], bad)


def sample_key(relpath: str) -> str:
    """The key of an image file: its path below the split directory, without extension.

    Dots become '_' (webdataset splits a tar member's name at the first dot of its basename), so
    ImageFolder and shards made from it name every sample the same.
    """
    p = PurePosixPath(relpath.replace(os.sep, "/"))
    return str(p.parent / p.stem.replace(".", "_"))


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def select_fraction(keys, labels, fraction: float) -> np.ndarray:
    """Sorted indices of a class-balanced subset: per class, the round(fraction x n_c) samples (at least
    one) with the smallest key hashes. Deterministic, independent of the seed and of the source, nested
    (the 25 % subset lies inside the 50 % one)."""
    labels = np.asarray(labels)
    if fraction >= 1:
        return np.arange(len(labels))
    hashes = np.array([key_hash(k) for k in keys], dtype=np.uint64)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, math.floor(fraction * len(idx) + 0.5))
        keep.append(idx[np.argsort(hashes[idx], kind="stable")[:n]])
    return np.sort(np.concatenate(keep))


def decode_image(data: bytes, where: str, key: str):
    """RGB PIL image, or a Bad record for bytes PIL cannot fully decode (truncated, not an image)."""
    try:
        img = Image.open(io.BytesIO(data))
        return img.convert("RGB")  # forces the full decode: a truncated file fails here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return Bad(key, where, f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- transforms (timm)


class SeededTransform:
    """Applies a timm transform with python/numpy/torch RNGs seeded by the sample's ``aug_seed``.

    timm draws from the global RNGs; seeding them per sample makes the augmentation a function of
    (run seed, epoch, sample) only. Python's and torch's RNG states are restored afterwards (with
    num_workers=0 this runs in the training process, whose torch RNG drives drop path); numpy's global
    RNG is only re-seeded (saving it costs 0.2 ms a sample, and nothing in training draws from it unseeded).
    """

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img, seed: int | None):
        if seed is None:
            return self.transform(img)
        saved_py, saved_torch = random.getstate(), torch.default_generator.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds CUDA: 0.4 ms a sample
        try:
            return self.transform(img)
        finally:
            random.setstate(saved_py)
            torch.default_generator.set_state(saved_torch)


def posterize_zero_bits_is_black(transform) -> None:
    """timm's RandAugment asks for posterize with 0 bits at magnitude 10 (m9 + mstd 0.5 reaches it for ~2 %
    of its posterize draws). Pillow >= 13 refuses bits=0; older Pillow returned a black image, which is
    what DeiT trained with. Keep that behaviour instead of crashing the loader."""
    from timm.data.auto_augment import RandAugment
    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    fn = op.aug_fn
                    op.aug_fn = lambda img, bits, *a, _fn=fn, **kw: (Image.new(img.mode, img.size) if bits < 1
                                                                     else _fn(img, bits, *a, **kw))


def image_transforms(aug: AugConfig, img_size: int):
    """(train, eval) transforms of the image sources, built by timm's create_transform."""
    from timm.data import create_transform
    train = create_transform(img_size, is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                             hflip=aug.hflip, color_jitter=aug.color_jitter, auto_augment=aug.rand_augment or None,
                             interpolation=aug.interpolation, re_prob=aug.re_prob, re_mode=aug.re_mode,
                             re_count=aug.re_count)
    posterize_zero_bits_is_black(train)
    evaluation = create_transform(img_size, is_training=False, crop_pct=aug.crop_pct,
                                  interpolation="bicubic" if aug.interpolation == "random" else aug.interpolation)
    return SeededTransform(train), SeededTransform(evaluation)


class SeededMixup:
    """timm's Mixup/CutMix with label smoothing, its numpy draws seeded per micro-batch (exact resume)."""

    def __init__(self, aug: AugConfig, label_smoothing: float, num_classes: int):
        from timm.data import Mixup
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mix = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                         switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode, label_smoothing=label_smoothing,
                         num_classes=num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        from timm.data.mixup import mixup_target
        saved = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            if len(x) % 2 == 0:
                return self.mix(x, y)
            # timm pairs a batch with its flip: an odd batch (after skipped samples) mixes all but the last
            xm, ym = self.mix(x[:-1], y[:-1]) if len(x) > 1 else (x[:0], y[:0].float())
            last = mixup_target(y[-1:], self.num_classes, 1.0, self.smoothing)
            return torch.cat([xm, x[-1:]]), torch.cat([ym.reshape(-1, self.num_classes), last])
        finally:
            np.random.set_state(saved)


# ---------------------------------------------------------------- Fashion-MNIST (the embedded dataset)


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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train: bool, img_size: int,
                 ids: torch.Tensor | None = None, repeats: int = 1):
        self.images, self.labels, self.train, self.img_size = images, labels, train, img_size
        self.ids = ids if ids is not None else torch.arange(len(labels))  # index in the original split: the key
        self.repeats = repeats

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
        return (x - FMNIST_MEAN) / FMNIST_STD, self.labels[i], str(int(self.ids[i]))


# ---------------------------------------------------------------- ImageFolder trees


def scan_imagefolder(root: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, image paths relative to root, labels) of ``root/<class>/**/<image>``, sorted.

    Labels follow the sorted class directory names (torchvision's ImageFolder order).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"ImageFolder directory {root} does not exist: data.root must hold train/ and val/, each "
                         "with one sub-directory per class (the ImageNet layout)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    files, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, names in os.walk(root / cls):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root)
            for name in sorted(names):
                if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    files.append(str(rel / name))
                    labels.append(label)
    if not files:
        raise ValueError(f"{root}: no images found (expected {root}/<class>/<image>.jpg with extensions "
                         f"{', '.join(IMAGE_EXTS)})")
    keys = [sample_key(f) for f in files]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"{root}: two images share the key {dup!r} (same name up to extension or dots); rename one")
    return classes, files, np.array(labels, dtype=np.int64)


class ImageFolderDataset(Dataset):
    """Map-style: one JPEG (or PNG, ...) file per sample, decoded and augmented on access."""

    def __init__(self, root: str | Path, files: list[str], labels: np.ndarray, transform: SeededTransform,
                 repeats: int = 1):
        self.root, self.files, self.labels, self.transform, self.repeats = Path(root), files, labels, transform, repeats

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        i, aug_seed = item if isinstance(item, tuple) else (item, None)
        path, key = self.root / self.files[i], sample_key(self.files[i])
        try:
            data = path.read_bytes()
        except OSError as e:
            return Bad(key, str(path), f"{type(e).__name__}: {e}")
        img = decode_image(data, str(path), key)
        if isinstance(img, Bad):
            return img
        return self.transform(img, aug_seed), int(self.labels[i]), key


# ---------------------------------------------------------------- samplers (map-style sources)


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
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        r = self.repeats
        order = perm[:-(-self.n // r)].repeat_interleave(r)[:self.n]
        per_rank = self.n // self.world
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        idx = order.tolist()
        # position j of the epoch goes to rank j % world; its seed tells the r copies of a sample apart
        return iter([(idx[j], base + idx[j] * r + j % r)
                     for j in range(self.rank, self.world * per_rank, self.world)[self.start:]])


class EvalSampler(Sampler):
    """Rank r evaluates samples r, r+W, ...: no padding, no duplicates across ranks."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


# ---------------------------------------------------------------- building the datasets


def _subset(n: int, limit: int, seed: int) -> torch.Tensor | None:
    """The first ``limit`` indices of a seeded permutation of range(n) (None: keep all)."""
    if not limit or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]


def _fashion_mnist(cfg: DataConfig, img_size: int, seed: int, repeats: int):
    tr_x, tr_y = load_fashion_mnist(cfg.root, "train")
    ids = torch.arange(len(tr_y))
    if cfg.fraction < 1:
        keep = torch.from_numpy(select_fraction([str(i) for i in range(len(tr_y))], tr_y.numpy(), cfg.fraction))
        tr_x, tr_y, ids = tr_x[keep], tr_y[keep], ids[keep]
    if (idx := _subset(len(tr_y), cfg.train_limit, seed)) is not None:
        tr_x, tr_y, ids = tr_x[idx], tr_y[idx], ids[idx]
    te_x, te_y = load_fashion_mnist(cfg.root, "test")
    if cfg.eval_limit:
        te_x, te_y = te_x[:cfg.eval_limit], te_y[:cfg.eval_limit]
    return (ImageTensorDataset(tr_x, tr_y, True, img_size, ids, repeats),
            ImageTensorDataset(te_x, te_y, False, img_size))


def _imagefolder(cfg: DataConfig, aug: AugConfig, img_size: int, seed: int):
    root = Path(cfg.root)
    train_tf, eval_tf = image_transforms(aug, img_size)
    tr_classes, tr_files, tr_labels = scan_imagefolder(root / "train")
    va_classes, va_files, va_labels = scan_imagefolder(root / "val")
    if tr_classes != va_classes:
        only = sorted(set(tr_classes) ^ set(va_classes))[:5]
        raise ValueError(f"{root}: train/ and val/ have different class directories (e.g. {only}); both need the "
                         "same classes")
    keep = select_fraction([sample_key(f) for f in tr_files], tr_labels, cfg.fraction)
    if (idx := _subset(len(keep), cfg.train_limit, seed)) is not None:
        keep = keep[idx.numpy()]
    va = slice(0, cfg.eval_limit or None)
    return (ImageFolderDataset(root / "train", [tr_files[i] for i in keep], tr_labels[keep], train_tf,
                               aug.repeated_aug),
            ImageFolderDataset(root / "val", va_files[va], va_labels[va], eval_tf))


def build_datasets(cfg: DataConfig, img_size: int, seed: int, aug: AugConfig | None = None):
    """(train, val) datasets of ``cfg.source``; ``aug`` configures the image sources' training transform."""
    aug = aug or AugConfig()
    if cfg.source == "fashion-mnist":
        return _fashion_mnist(cfg, img_size, seed, aug.repeated_aug)
    if cfg.source == "imagefolder":
        return _imagefolder(cfg, aug, img_size, seed)
    from . import webds
    return webds.build(cfg, aug, img_size, seed)


# ---------------------------------------------------------------- loaders


def train_loader(ds, micro_batch: int, rank: int, world: int, seed: int, workers: int):
    # Every loader has its own generator: each iterator draws a worker base seed from it, which from the global
    # RNG would shift the drop-path stream of a run resumed mid-epoch (its iterator is made after the restore).
    if isinstance(ds, IterableDataset):  # a stream batches itself (webds.ShardStream)
        ds.configure(rank, world, micro_batch, workers)
        # fresh workers each epoch: they copy the stream's epoch and start position when they start
        return DataLoader(ds, batch_size=None, num_workers=workers, generator=torch.Generator())
    sampler = TrainSampler(len(ds), rank, world, seed, getattr(ds, "repeats", 1))
    # drop_last: every optimizer step sees a full micro-batch on every rank.
    return DataLoader(ds, batch_size=micro_batch, sampler=sampler, drop_last=True, collate_fn=collate,
                      num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator())


def eval_loader(ds, batch: int, rank: int, world: int, workers: int):
    per_rank = max(1, batch // world)
    if isinstance(ds, IterableDataset):
        ds.configure(rank, world, per_rank, workers)
        return DataLoader(ds, batch_size=None, num_workers=workers, generator=torch.Generator())
    return DataLoader(ds, batch_size=per_rank, sampler=EvalSampler(len(ds), rank, world), collate_fn=collate,
                      num_workers=workers, generator=torch.Generator())


def set_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Position a training loader at ``start`` samples (of this rank) into ``epoch``."""
    target = loader.dataset if isinstance(loader.dataset, IterableDataset) else loader.sampler
    target.set_epoch(epoch, start)


# ---------------------------------------------------------------- unreadable samples


class DataHealth:
    """Unreadable samples of a phase: counted per rank, summed over the group at log/eval time.

    ``read``/``bad`` are group totals as of the last ``sync`` (kept in resume state). A phase stops with
    a ValueError once more than ``max_fraction`` of the samples read were bad, counting at least one
    epoch's worth (``epoch``): a few bad samples early in the first epoch do not stop a phase that
    stays under the limit.
    """

    def __init__(self, max_fraction: float, read: int = 0, bad: int = 0, epoch: int = 0):
        self.max_fraction, self.read, self.bad, self.epoch = max_fraction, read, bad, epoch
        self._read = self._bad = 0
        self.examples: list[Bad] = []

    def add(self, batch: Batch) -> None:
        self._read += len(batch.keys) + len(batch.bad)
        self._bad += len(batch.bad)
        self.examples += batch.bad[:max(0, 5 - len(self.examples))]

    def sync(self, info) -> None:
        from .dist import all_reduce_sum
        t = all_reduce_sum(torch.tensor([self._read, self._bad], dtype=torch.float64, device=info.device), info)
        self.read += int(t[0].item())
        self.bad += int(t[1].item())
        self._read = self._bad = 0
        check_bad(self.bad, self.read, self.max_fraction, "training", self.examples, self.epoch)


def check_bad(bad: int, read: int, max_fraction: float, what: str, examples: list[Bad], at_least: int = 0) -> None:
    if bad and bad > max_fraction * max(read, at_least):
        e = (f"; e.g. {examples[0].where} (key {examples[0].key}: {examples[0].reason})" if examples
             else " (examples on the other ranks)")
        raise ValueError(f"{bad} of {read} {what} samples read so far ({bad / read:.2%}) were unreadable, more than "
                         f"data.max_bad_fraction={max_fraction}{e}. Repair or remove those files (or re-make the "
                         "shards with launch/make_shards.py), or raise data.max_bad_fraction")
