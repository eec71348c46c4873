"""The DeiT transform split in two: parameters drawn per sample on the CPU, pixels done on the device.

``Planner`` runs timm's own transform objects (RandomResizedCropAndInterpolation's ``get_params``, the
flip's ``torch.rand``, RandAugment's op choice and magnitudes, RandomErasing's boxes) on a stand-in
image that carries only a size, with the RNGs seeded by the sample's seed exactly as ``SeededTransform``
seeds them for the PIL path. Every random draw of the PIL path is made, in the same order, from the same
state, so a sample's ``Plan`` holds the parameters the PIL path uses for it (tests/test_data_backends.py
replays plans through PIL and gets the PIL path's images bit for bit).

``execute`` applies a plan to a decoded uint8 CHW tensor on any device (torchvision's tensor ops; the
RandAugment ops as tensor functions of the same arguments), and ``finish`` stacks, normalises and erases
a batch. What differs from the PIL path is the pixels, not the parameters: torch's bicubic kernel
(a = -0.75) is not PIL's (a = -0.5), grid_sample's border handling is not PIL's, and the erased boxes
are filled with noise drawn on the device from a generator seeded by the sample's seed (the PIL path
draws it from the CPU generator after the other transforms).
"""
from __future__ import annotations

import copy
import functools
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError

_ERASE_SALT = 0x5EED_E4A5E
_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


@dataclass
class Plan:
    """One sample's augmentation parameters (the PIL path's draws for it)."""
    seed: int                        # the sample's augmentation seed (also seeds the erase noise)
    size: tuple[int, int]            # (height, width) of the decoded image
    crop: tuple | None = None        # train: (top, left, height, width) of the random-resized crop
    resample: str = "bicubic"        # of the crop resize
    flip: bool = False
    ops: list = field(default_factory=list)  # RandAugment: (name, args, kwargs) applied in order
    erase: list = field(default_factory=list)  # (top, left, height, width) boxes of random erasing
    where: str = ""                  # the file or shard it came from (for a Bad record at decode time)


def _standin(w: int, h: int) -> torch.Tensor:
    """A tensor of shape (3, h, w) without memory: what timm's get_params needs of an image (its size)."""
    return torch.empty(1, dtype=torch.uint8).expand(3, h, w)


class _Boxes:
    """Records the boxes timm's RandomErasing writes into an image (``img[:, t:t+h, l:l+w] = ...``)."""

    def __init__(self):
        self.boxes = []

    def __setitem__(self, idx, value):
        _, ys, xs = idx
        self.boxes.append((ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start))


class _Recorder:
    """Stands in for a RandAugment op's PIL function: records its arguments (and makes the draws the PIL
    function makes itself: a random interpolation), leaves the image alone."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __call__(self, img, *args, **kwargs):
        from timm.data.auto_augment import _interpolation
        kw = dict(kwargs)
        if self.name.startswith(_GEOMETRIC):  # only these call timm's _check_args_tf (a random interpolation
            kw["resample"] = _interpolation(kw)  # is drawn there); the others ignore their kwargs
        else:
            kw = {}
        self.log.append((self.name, args, kw))
        return img


def _interp_name(mode) -> str:
    name = str(getattr(mode, "name", mode)).lower()
    return name.rsplit(".", 1)[-1]


class Planner:
    """Draws plans from a timm ``create_transform`` pipeline (train or eval). Picklable."""

    def __init__(self, compose, train: bool):
        from timm.data.auto_augment import RandAugment
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
        from torchvision import transforms as T
        self.train, self.rrc, self.flip_p, self.ra, self.eraser, self.jitter = train, None, 0.0, None, None, None
        self.erase_mode, self.resize, self.crop_size, self.mean, self.std = "const", None, None, None, None
        for t in compose.transforms:
            if isinstance(t, RandomResizedCropAndInterpolation):
                self.rrc = t
            elif isinstance(t, T.RandomHorizontalFlip):
                self.flip_p = t.p
            elif isinstance(t, RandAugment):
                self.ra = copy.deepcopy(t)
                self.ra_log = []
                for op in self.ra.ops:
                    op.aug_fn = _Recorder(op.name, self.ra_log)
            elif isinstance(t, T.ColorJitter):  # (timm adds it, a no-op, even at strength 0: its draws count)
                self.jitter = t
            elif isinstance(t, RandomErasing):
                self.erase_mode = "pixel" if t.per_pixel else "rand" if t.rand_color else "const"
                self.eraser = copy.copy(t)
                self.eraser.per_pixel = self.eraser.rand_color = False  # draw no noise here (the boxes only)
                self.eraser.device = "cpu"
            elif isinstance(t, T.Resize):
                self.resize, self.resample = t.size, _interp_name(t.interpolation)
            elif isinstance(t, T.CenterCrop):
                self.crop_size = tuple(t.size)
            elif isinstance(t, T.Normalize):
                self.mean, self.std = tuple(t.mean), tuple(t.std)
            elif isinstance(t, (MaybeToTensor, T.ToTensor)):
                pass
            else:
                raise UserError(f"data.backend nvjpeg/dali: the transform {type(t).__name__} has no tensor version "
                                "here (supported: random-resized crop, flip, colour jitter, RandAugment, random "
                                "erasing); use data.backend=pil")
        if self.rrc is not None:
            self.out_size = tuple(self.rrc.size)
            self.resample = _interp_name(self.rrc.interpolation) if not isinstance(
                self.rrc.interpolation, (list, tuple)) else None
        else:
            self.out_size = self.crop_size

    def __call__(self, img) -> Plan:
        """The plan of one image (a stand-in of its size); call it with the RNGs seeded (SeededTransform)."""
        h, w = img.shape[-2:]
        plan = Plan(seed=0, size=(h, w))
        if self.rrc is not None:
            plan.crop = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
            plan.resample = (self.resample if self.resample is not None
                             else _interp_name(random.choice(self.rrc.interpolation)))
        else:
            plan.resample = self.resample
        if self.flip_p:
            plan.flip = bool(torch.rand(1) < self.flip_p)
        if self.jitter is not None:
            j = self.jitter
            order, *factors = j.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            plan.ops.append(("ColorJitter", (order.tolist(), *factors), {}))
        if self.ra is not None:
            self.ra_log.clear()
            self.ra(img)
            plan.ops += list(self.ra_log)
        if self.eraser is not None:
            boxes = _Boxes()
            self.eraser._erase(boxes, 3, *self.out_size, torch.float32)
            plan.erase = boxes.boxes
        return plan


# ---------------------------------------------------------------- tensor ops (uint8 CHW, any device)

_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "bicubic",
          "box": "bilinear", "hamming": "bilinear"}


def _pil_mode(resample) -> str:
    return _MODES.get(_interp_name(resample), "bilinear")


def affine(img: torch.Tensor, matrix, resample="bicubic", fill=(128, 128, 128)) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, matrix)``: output pixel centre (x, y) samples the input at
    (a x + b y + c, d x + e y + f); outside the image: ``fill``."""
    a, b, c, d, e, f = matrix
    _, H, W = img.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=img.device, dtype=torch.float32) + 0.5,
                            torch.arange(W, device=img.device, dtype=torch.float32) + 0.5, indexing="ij")
    grid = torch.stack([(a * xs + b * ys + c) / W * 2 - 1, (d * xs + e * ys + f) / H * 2 - 1], -1)[None]
    x = torch.cat([img.float(), torch.ones_like(img[:1], dtype=torch.float32)])[None]
    out = F.grid_sample(x, grid, mode=_pil_mode(resample), padding_mode="zeros", align_corners=False)[0]
    mask = out[-1:].clamp(0, 1)
    fill_t = const(tuple(fill), torch.float32, img.device).view(-1, 1, 1)
    out = out[:-1] * mask + fill_t * (1 - mask)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=64)
def const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant on ``device``, copied there once: a tensor built from host numbers per batch or per op is a
    blocking host-to-device copy (a host sync). Shared: never modify it in place."""
    return torch.tensor(values, dtype=dtype, device=device)


def sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's ``adjust_sharpness`` of a uint8 CHW image, the same ops and kernel, its kernel a ``const``
    (torchvision builds it from host numbers at every call)."""
    c, h, w = img.shape
    if h <= 2 or w <= 2:
        return img
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = const(((a, a, a), (a, b, a), (a, a, a)), torch.float32, img.device).expand(c, 1, 3, 3)
    out = img.to(torch.float32, copy=True)
    blurred = F.conv2d(out, kernel, groups=c).round_()
    view = out[..., 1:-1, 1:-1]
    view.add_(blurred.sub_(view), alpha=1.0 - factor)
    return out.clamp_(0, 255).to(torch.uint8)


def _rotate_matrix(degrees: float, w: int, h: int):
    """PIL's Image.rotate (no expand) as an affine matrix."""
    angle = -math.radians(degrees % 360.0)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    cx, cy = w / 2.0, h / 2.0
    m[2] = m[0] * -cx + m[1] * -cy + cx
    m[5] = m[3] * -cx + m[4] * -cy + cy
    return m


def _geo(img, matrix, kw):
    return affine(img, matrix, kw.get("resample", "bicubic"), kw.get("fillcolor", (128, 128, 128)))


def _op(img: torch.Tensor, name: str, args, kw) -> torch.Tensor:
    import torchvision.transforms.v2.functional as TF
    _, h, w = img.shape
    if name == "ColorJitter":  # torchvision's ColorJitter.forward with its drawn parameters
        order, *factors = args
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in order:
            if factors[i] is not None:
                img = adjust[i](img, factors[i])
        return img
    if name == "AutoContrast":
        return TF.autocontrast(img)
    if name == "Equalize":
        return TF.equalize(img)
    if name == "Invert":
        return TF.invert(img)
    if name == "Rotate":
        return _geo(img, _rotate_matrix(args[0], w, h), kw)
    if name.startswith("Posterize"):
        bits = int(args[0])
        return img if bits >= 8 else torch.zeros_like(img) if bits < 1 else TF.posterize(img, bits)
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return TF.solarize(img, args[0])
    if name == "SolarizeAdd":
        add, thresh = args[0], kw.get("thresh", 128)
        return torch.where(img < thresh, (img.to(torch.int16) + int(add)).clamp(0, 255).to(torch.uint8), img)
    if name.startswith("Color"):
        return TF.adjust_saturation(img, args[0])
    if name.startswith("Contrast"):
        return TF.adjust_contrast(img, args[0])
    if name.startswith("Brightness"):
        return TF.adjust_brightness(img, args[0])
    if name.startswith("Sharpness"):
        return sharpness(img, args[0])
    if name == "ShearX":
        return _geo(img, (1, args[0], 0, 0, 1, 0), kw)
    if name == "ShearY":
        return _geo(img, (1, 0, 0, args[0], 1, 0), kw)
    if name == "TranslateXRel":
        return _geo(img, (1, 0, args[0] * w, 0, 1, 0), kw)
    if name == "TranslateYRel":
        return _geo(img, (1, 0, 0, 0, 1, args[0] * h), kw)
    if name == "TranslateX":
        return _geo(img, (1, 0, args[0], 0, 1, 0), kw)
    if name == "TranslateY":
        return _geo(img, (1, 0, 0, 0, 1, args[0]), kw)
    raise UserError(f"RandAugment op {name!r} has no tensor version here; use data.backend=pil")


def _interp(name: str):
    from torchvision.transforms import InterpolationMode
    return {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR}.get(
        name, InterpolationMode.BICUBIC)


def geometry(img: torch.Tensor, plan: Plan, planner: Planner) -> torch.Tensor:
    """Crop + resize (train) or resize + centre crop (eval), then the flip: a decoded uint8 CHW image."""
    import torchvision.transforms.v2.functional as TF
    if plan.crop is not None:
        top, left, h, w = plan.crop
        img = TF.resized_crop(img, top, left, h, w, list(planner.out_size), interpolation=_interp(plan.resample),
                              antialias=True)
    else:
        img = TF.center_crop(TF.resize(img, planner.resize, interpolation=_interp(plan.resample), antialias=True),
                             list(planner.crop_size))
    return img.flip(-1) if plan.flip else img


def eval_box(size: tuple[int, int], resize: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(height, width, top, left): torchvision's Resize(resize) (short side) then CenterCrop(crop) of an image
    of ``size``, as integers (what the DALI pipeline is told, so that it crops the same pixels)."""
    h, w = size
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(resize * long / short)
    rh, rw = (resize, new_long) if h <= w else (new_long, resize)
    return rh, rw, int(round((rh - crop[0]) / 2.0)), int(round((rw - crop[1]) / 2.0))


def rand_augment(img: torch.Tensor, plan: Plan) -> torch.Tensor:
    for name, args, kw in plan.ops:
        img = _op(img, name, args, kw)
    return img


def execute(img: torch.Tensor, plan: Plan, planner: Planner) -> torch.Tensor:
    """A decoded uint8 CHW image -> the augmented uint8 image (before normalise and erasing)."""
    return rand_augment(geometry(img, plan, planner), plan)


def finish(x: torch.Tensor, plans, mean, std, erase_mode: str) -> torch.Tensor:
    """uint8 [B, C, H, W] on the device -> normalised float, erased at each plan's boxes.

    The same float ops as timm's ToTensor + Normalize (x / 255, then (x - mean) / std): bit-identical to
    the PIL path's output outside the erased boxes.
    """
    x = x.to(torch.float32).div_(255)
    x.sub_(const(tuple(mean), x.dtype, x.device).view(-1, 1, 1))
    x.div_(const(tuple(std), x.dtype, x.device).view(-1, 1, 1))
    for i, plan in enumerate(plans or ()):
        if not plan.erase:
            continue
        g = torch.Generator(device=x.device).manual_seed((plan.seed ^ _ERASE_SALT) % 2**63)
        for top, left, h, w in plan.erase:
            shape = (x.shape[1], h, w) if erase_mode == "pixel" else (x.shape[1], 1, 1)
            fill = (torch.zeros(shape, device=x.device) if erase_mode == "const"
                    else torch.empty(shape, device=x.device).normal_(generator=g))
            x[i, :, top:top + h, left:left + w] = fill
    return x
