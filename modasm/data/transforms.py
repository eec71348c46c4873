"""Transforms of the image sources (timm's, seeded per sample) and batch-level mixup/cutmix (timm's).

Everything here pickles (no lambdas, no local functions), so loader workers start under every
multiprocessing start method (fork, spawn, forkserver).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from ..config import AugConfig


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


class _PosterizeZeroBitsIsBlack:
    """Posterize that returns a black image for 0 bits (see ``posterize_zero_bits_is_black``)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, img, bits, *args, **kwargs):
        return Image.new(img.mode, img.size) if bits < 1 else self.fn(img, bits, *args, **kwargs)


def posterize_zero_bits_is_black(transform) -> None:
    """timm's RandAugment asks for posterize with 0 bits at magnitude 10 (m9 + mstd 0.5 reaches it for ~2 %
    of its posterize draws). Pillow >= 13 refuses bits=0; older Pillow returned a black image, which is
    what DeiT trained with. Keep that behaviour instead of crashing the loader."""
    from timm.data.auto_augment import RandAugment
    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize") and not isinstance(op.aug_fn, _PosterizeZeroBitsIsBlack):
                    op.aug_fn = _PosterizeZeroBitsIsBlack(op.aug_fn)


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
