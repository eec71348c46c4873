"""Transforms of the image sources (timm's, seeded per sample) and batch-level mixup/cutmix (timm's).

Everything here pickles (no lambdas, no local functions), so loader workers start under every
multiprocessing start method (fork, spawn, forkserver).
"""
from __future__ import annotations

import copy
import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import AugConfig
from . import batch_aug, tensor_aug
from .contract import Bad, Batch, decode_image
from .dali import DaliDecoder
from .nvjpeg import decode_on_device
from .tensor_aug import Plan


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


def image_transforms(aug: AugConfig, img_size: int, backend: str = "pil"):
    """(train, eval) transforms of the image sources, built by timm's create_transform; ``backend`` says who
    decodes and augments (``ImageTransform``)."""
    from timm.data import create_transform
    train = create_transform(img_size, is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                             hflip=aug.hflip, color_jitter=aug.color_jitter, auto_augment=aug.rand_augment or None,
                             interpolation=aug.interpolation, re_prob=aug.re_prob, re_mode=aug.re_mode,
                             re_count=aug.re_count)
    posterize_zero_bits_is_black(train)
    evaluation = create_transform(img_size, is_training=False, crop_pct=aug.crop_pct,
                                  interpolation="bicubic" if aug.interpolation == "random" else aug.interpolation)
    return ImageTransform(train, True, backend), ImageTransform(evaluation, False, backend)


@dataclass
class Prefetched:
    """uint8 path: the augmented image as uint8 CHW; normalising and erasing (at ``plan.erase``) on the device."""
    pixels: torch.Tensor
    plan: Plan


@dataclass
class Encoded:
    """nvjpeg/dali: a JPEG file's bytes (uint8, 1-D), or for other formats the pixels PIL decoded (uint8 CHW);
    ``plan`` holds every augmentation parameter of the sample."""
    data: torch.Tensor
    plan: Plan


class _Uint8Part:
    """The PIL part of a timm pipeline to a uint8 tensor, plus the boxes its RandomErasing would draw."""

    def __init__(self, pil_part, eraser):
        self.pil_part, self.eraser = pil_part, eraser

    def __call__(self, img):
        for t in self.pil_part:
            img = t(img)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        boxes = []
        if self.eraser is not None:  # the draws timm's RandomErasing makes after ToTensor + Normalize (no RNG)
            rec = tensor_aug._Boxes()
            self.eraser._erase(rec, *pixels.shape, torch.float32)
            boxes = rec.boxes
        return pixels, boxes


def _jpeg_payload(data: bytes, where: str, key: str):
    """(payload, (h, w)) of an encoded sample, or Bad: JPEG bytes as they are (RGB or grayscale, which
    decode_jpeg and DALI take), anything else decoded here by PIL (PNG, CMYK JPEG, ...), and so is a JPEG
    that does not end in its end-of-image marker: a truncated file, which PIL refuses (a Bad record, as
    in the pil backend) and the GPU decoders would fill with grey (DALI decodes a crop window that lies in
    the part that is there), or one with bytes after the marker, which PIL reads."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
    except Exception as e:
        return Bad(key, where, f"{type(e).__name__}: {e}")
    if fmt == "JPEG" and mode in ("RGB", "L") and data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), (h, w)
    img = decode_image(data, where, key)
    if isinstance(img, Bad):
        return img
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous(), (h, w)


class ImageTransform(SeededTransform):
    """A timm pipeline and the backends that run it (``data.backend``); calling it is the PIL path.

    * ``pil``: the loader decodes and augments (``__call__``); with ``uint8`` set (speed.uint8_batches) it
      stops before ToTensor and hands on uint8 pixels and the erasing boxes (``Prefetched``); ``to_device``
      normalises and erases on the device.
    * ``nvjpeg`` / ``dali``: the loader only reads the bytes and draws the plan (``from_bytes``);
      ``to_device`` decodes, augments, normalises and erases on the device.
    Each sample's parameters come from its seed the same way in every backend (``tensor_aug``).
    """

    def __init__(self, transform, train: bool, backend: str = "pil"):
        super().__init__(transform)
        self.train, self.backend, self.uint8 = train, backend, False
        self.batched = None  # device work per batch (batch_aug), image by image (tensor_aug); None: per batch off CPUs
        names = [type(t).__name__ for t in transform.transforms]
        cut = next(i for i, n in enumerate(names) if n in ("MaybeToTensor", "ToTensor"))
        tail = transform.transforms[cut:]
        norm = next(t for t in tail if type(t).__name__ == "Normalize")
        self.mean, self.std = tuple(map(float, norm.mean)), tuple(map(float, norm.std))  # timm gives 0-dim tensors
        erasers = [t for t in tail if type(t).__name__ == "RandomErasing"]
        self.erase_mode = ("pixel" if erasers[0].per_pixel else "rand" if erasers[0].rand_color else "const") \
            if erasers else "const"
        eraser = None
        if erasers:
            eraser = copy.copy(erasers[0])
            eraser.per_pixel = eraser.rand_color = False  # the boxes only: their noise is drawn on the device
        self.uint8_part = SeededTransform(_Uint8Part(transform.transforms[:cut], eraser))
        self.planner = SeededTransform(tensor_aug.Planner(transform, train)) if backend != "pil" else None
        self._dali = None

    @property
    def takes_bytes(self) -> bool:
        return self.backend != "pil"

    def __call__(self, img, seed: int | None):
        if not self.uint8:
            return super().__call__(img, seed)
        pixels, boxes = self.uint8_part(img, seed)
        return Prefetched(pixels, Plan(seed=seed or 0, size=tuple(pixels.shape[1:]), erase=boxes))

    def from_bytes(self, data: bytes, where: str, key: str, seed: int | None):
        """Loader side of nvjpeg/dali: Encoded (bytes + plan) or Bad."""
        got = _jpeg_payload(data, where, key)
        if isinstance(got, Bad):
            return got
        payload, (h, w) = got
        plan = self.planner(tensor_aug._standin(w, h), seed)
        plan.seed, plan.where = seed or 0, where
        return Encoded(payload, plan)

    def to_device(self, batch: Batch, device: torch.device, non_blocking: bool = False) -> Batch:
        """The batch as the model takes it: float, normalised and erased, on ``device``."""
        if batch.x is None:
            return batch
        y = batch.y.to(device, non_blocking=non_blocking)
        if isinstance(batch.x, torch.Tensor) and batch.x.dtype != torch.uint8:
            return batch._replace(x=batch.x.to(device, non_blocking=non_blocking), y=y)
        if isinstance(batch.x, torch.Tensor):  # uint8 pixels (Prefetched)
            x = batch.x.to(device, non_blocking=non_blocking)
            return batch._replace(x=self._finish(x, batch.plans, device), y=y)
        batched = self._batched(device)
        if self.backend == "dali":
            if self._dali is None:
                self._dali = DaliDecoder(self.planner.transform, device)
            pixels, ok, bad = self._dali(batch.x, batch.plans, batch.keys, batched)
        else:
            pixels, ok, bad = decode_on_device(batch.x, batch.plans, batch.keys, self.planner.transform, device,
                                               batched)
        if not ok:
            return Batch(None, None, [], batch.bad + bad)
        plans = [batch.plans[i] for i in ok]
        x = self._finish(pixels, plans, device)
        if len(ok) < len(batch.keys):  # the labels of the samples kept, chosen on the host (no index to copy over)
            y = batch.y[torch.tensor(ok)].to(device, non_blocking=non_blocking)
        return Batch(x, y, [batch.keys[i] for i in ok], batch.bad + bad, plans)

    def _batched(self, device) -> bool:
        """Per batch on an accelerator (its launches cost host time), image by image on a CPU (faster there)."""
        return torch.device(device).type != "cpu" if self.batched is None else self.batched

    def _finish(self, x: torch.Tensor, plans, device) -> torch.Tensor:
        finish = batch_aug.finish if self._batched(device) else tensor_aug.finish
        return finish(x, plans, self.mean, self.std, self.erase_mode)

    def __getstate__(self):  # the DALI pipeline stays in the training process
        return {**self.__dict__, "_dali": None}


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
