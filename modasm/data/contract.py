"""The sample and batch contract every source follows, and the helpers every source shares.

A source yields samples ``(image tensor, label, key)`` or ``Bad`` records (a sample that could not be
read); ``collate`` turns a list of them into a ``Batch``: the good samples stacked, the bad ones handed
on for counting. A sample's *key* names it the same in every source (its path below the split
directory, without extension), so subsets and augmentation seeds do not depend on the source.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from .. import seeds

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")


@dataclass(frozen=True)
class Bad:
    """A sample that could not be read (truncated image, missing label, unreadable shard)."""
    key: str
    where: str   # the file or shard it came from
    reason: str


class Batch(NamedTuple):
    x: torch.Tensor | list | None  # [B, C, H, W] float (ready) or uint8 (normalise/erase on the device), or a
    #                                list of encoded samples (decode on the device); None when all were bad
    y: torch.Tensor | None   # [B] int64
    keys: list
    bad: list                # Bad records of the samples dropped from this batch
    plans: list | None = None  # per sample, what the device still has to do (tensor_aug.Plan); None: nothing


def collate(samples: list) -> Batch:
    """Stack the good (image, label, key) samples; bad ones are dropped and handed on for counting.

    An image is a float tensor (ready), a ``Prefetched`` (uint8 pixels + plan: stacked) or an ``Encoded``
    (bytes + plan: listed, decoded on the device).
    """
    good = [s for s in samples if not isinstance(s, Bad)]
    bad = [s for s in samples if isinstance(s, Bad)]
    if not good:
        return Batch(None, None, [], bad)
    keys, y = [s[2] for s in good], default_collate([s[1] for s in good])
    first = good[0][0]
    if isinstance(first, torch.Tensor):
        return Batch(default_collate([s[0] for s in good]), y, keys, bad)
    plans = [s[0].plan for s in good]
    if hasattr(first, "pixels"):
        return Batch(torch.stack([s[0].pixels for s in good]), y, keys, bad, plans)
    return Batch([s[0].data for s in good], y, keys, bad, plans)


def prepare(transform, data: bytes, where: str, key: str, seed: int | None):
    """A sample's image as its source's transform wants it: decoded by PIL and transformed here, or (GPU
    backends) its bytes and augmentation plan; or a Bad record."""
    if getattr(transform, "takes_bytes", False):
        return transform.from_bytes(data, where, key, seed)
    img = decode_image(data, where, key)
    return img if isinstance(img, Bad) else transform(img, seed)


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


def subset(n: int, limit: int, seed: int) -> torch.Tensor | None:
    """The first ``limit`` indices of a seeded permutation of range(n) (None: keep all)."""
    if not limit or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seeds.subset(seed)))[:limit]
