"""The plans of a batch (``tensor_aug.Plan``) executed together: kernel launches per batch where
``tensor_aug.execute`` launches tens per image (docs/method.md, "Decode and augment on the device").

* Geometry (crop + resize + flip, or eval's resize + centre crop): each image's source region is gathered from the
  decoded images' memory into a zero-padded float canvas (one ``index_select`` per chunk of similar sizes), and the
  antialiased resize is two batched matrix products, ``out = Wy @ canvas @ Wx^T``, with each sample's weights in its
  rows of Wy and Wx: torch's own antialiased kernel (PIL's filters: triangle for bilinear, cubic a = -0.5 for
  bicubic, support stretched by the scale when downscaling; one-hot rows for nearest), computed on the device for
  the whole batch; the flip is the order of Wx's rows, the centre crop a choice of rows. Then torchvision's cast.
  The per-sample resize as torchvision runs it on a GPU (float32, clamp, round) up to float32 rounding: an output
  differs, by 1, only where its value lies within ~1e-3 of a rounding boundary (tests/test_batch_aug.py). (On a CPU
  torchvision resizes uint8 images in fixed point instead, rounding its intermediate to uint8.)
* RandAugment (and colour jitter): position by position in the samples' op lists, each op once on the samples that
  drew it, their magnitudes as per-sample tensors: the same float32 operations as the per-sample tensor ops
  (``tensor_aug._op``) on each value, so the same pixels (bit for bit on a CPU).
* Erasing: the boxes as masks built on the device in one go; const fill by one masked fill; per-pixel or per-box
  noise still drawn box by box from the sample's own generator (the values of the per-sample path), then put in
  place by one masked scatter.
The numbers of a batch reach the device in a few copies without a host wait (``upload``; constants once,
``tensor_aug.const``).

For accelerators: on a CPU, where a launch costs nothing extra, image by image is faster (an image's intermediates
stay in cache; the dense products have ~40x the FLOPs of torch's banded kernel), so ``to_device`` runs this off a
CPU only (``ImageTransform.batched``; docs/benchmarks.md has both on a CPU).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..errors import UserError
from . import tensor_aug

# the canvas of one resample (float32 elements: 2**24 = 64 MiB); a batch is resampled in chunks of similar sizes
CANVAS_ELEMENTS = 2 ** 24
_TAPS = {"bilinear": 2.0, "nearest": 2.0}  # torch's interp_size of the antialiased kernels (bicubic: 4)
_INDEXABLE = 2 ** 31 - 1  # values a batch's images (and the zero after them) may have: int32 gather indices


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch's host-built numbers on ``device`` without a host wait: through pinned memory, non-blocking, on a GPU
    (a copy from pageable memory may wait for the stream; torch keeps the pinned block until the copy has run)."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


# ---------------------------------------------------------------- geometry

def _window(plan, planner) -> tuple:
    """(top, left, height, width) of the image region resampled, (rh, rw) it is resized to, and (oy, ox): the
    resized pixel at output (0, 0) (the centre crop's anchor; negative where torchvision pads)."""
    if plan.crop is not None:
        return tuple(plan.crop), tuple(planner.out_size), (0, 0)
    from torchvision.transforms.v2.functional._geometry import _compute_resized_output_size
    h, w = plan.size
    rh, rw = _compute_resized_output_size((h, w), planner.resize)
    anchor = []
    for r, c in ((rh, planner.crop_size[0]), (rw, planner.crop_size[1])):  # torchvision's center_crop_image
        pad = (c - r) // 2 if c > r else 0
        padded = r + ((c - r) // 2 + (c - r + 1) // 2 if c > r else 0)
        anchor.append(int(round((padded - c) / 2.0)) - pad)
    return (0, 0, h, w), (rh, rw), tuple(anchor)


def _weights(src, dst, start, out: int, taps: int, cubic, nearest, flip):
    """Resampling weights of one dimension, banded: (columns [n, out, taps] int64, weights [n, out, taps]). Row o
    holds torch's antialiased weights of resized pixel start + o (start + out - 1 - o where flipped) for sources of
    sizes ``src`` resized to ``dst`` (float32, as torch's kernel computes them; zero rows outside the resized image);
    ``taps`` bounds a row's nonzero weights."""
    dev = src.device
    scale = src / dst                                                    # [n] float32 (in / out)
    support = torch.where(cubic, 2.0, 1.0) * scale.clamp(min=1.0)        # interp_size / 2, stretched when downscaling
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    o = torch.arange(out, device=dev, dtype=torch.float32)
    o = torch.where(flip[:, None], out - 1 - o, o) + start[:, None]     # [n, out]: the resized pixel index
    center = scale[:, None] * (o + 0.5)
    xmin = (center - support[:, None] + 0.5).trunc().clamp(min=0)
    xmax = torch.minimum((center + support[:, None] + 0.5).trunc(), src[:, None])
    j = xmin[..., None] + torch.arange(taps, device=dev, dtype=torch.float32)  # [n, out, taps]
    x = ((j - center[..., None] + 0.5) * invscale[:, None, None]).abs()
    cub = torch.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1,
                      torch.where(x < 2.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, torch.zeros_like(x)))
    w = torch.where(cubic[:, None, None], cub, (1.0 - x).clamp(min=0.0)) * (j < xmax[..., None])
    total = w.sum(-1, keepdim=True)
    w = w / total.masked_fill_(total == 0, 1.0)
    near = torch.minimum((o * scale[:, None]).floor(), src[:, None] - 1)  # nearest: floor(o * in / out), one-hot
    w = torch.where(nearest[:, None, None], (j == near[..., None]).float(), w)
    w = w * ((o >= 0) & (o < dst[:, None]))[..., None]                   # rows of the centre crop's padding: zero
    return torch.minimum(j, src[:, None, None] - 1).long(), w             # taps past the source: weight 0, in range


def _dense(cols, w, n: int, width: int):
    """The banded weights as a dense [n, out, width] matrix (each column once per row: the sum is exact)."""
    return torch.zeros(n, cols.shape[1], width, device=w.device).scatter_add_(2, cols, w)


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """Full float32 products (no TF32/bf16 passes, which a run may allow for training): the weights sum to 1 on
    values up to 255, so a 10-bit mantissa would move outputs by grey levels. Through torch's per-backend settings
    where it has them (a run that set those makes the global getter raise), else the global one; put back after."""
    backends = [getattr(torch.backends.cuda, "matmul", None), getattr(getattr(torch.backends, "mkldnn", None),
                                                                      "matmul", None)]
    slots = [b for b in backends if b is not None and hasattr(b, "fp32_precision")]
    if not slots:
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(saved)
        return
    saved = [b.fp32_precision for b in slots]
    try:
        for b in slots:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, v in zip(slots, saved):
            b.fp32_precision = v


def _chunks(areas: list[int], sizes: list[tuple], channels: int, budget: int) -> list[list[int]]:
    """Sample indices in chunks whose padded canvas holds at most ``budget`` elements, similar sizes together."""
    chunks, cur, hmax, wmax = [], [], 0, 0
    for i in sorted(range(len(areas)), key=lambda i: areas[i]):
        h, w = sizes[i]
        nh, nw = max(hmax, h), max(wmax, w)
        if cur and (len(cur) + 1) * channels * nh * nw > budget:
            chunks.append(cur)
            cur, nh, nw = [], h, w
        cur.append(i)
        hmax, wmax = nh, nw
    return chunks + [cur] if cur else chunks


def _taps(src: int, dst: int, mode: str) -> int:
    """Nonzero weights a row can have: 2 * support + 1 and one for rounding (torch's kernel: xmin, xsize)."""
    return int(_TAPS.get(mode, 4.0) * max(src / dst, 1.0)) + 3


def _canvas(flat, s, n: int, C: int, hc: int, wc: int, zero: int):
    """[n, C, hc, wc] float32: each sample's source region at the top left, zero around it and wherever the region
    leaves its image (torchvision's crop pads with 0), gathered from ``flat`` (every image's memory, then a zero) in
    one index_select; ``s`` int32 [n, k] per sample: region h, w, ..., offset in flat, image h, w, region top, left,
    the image's strides (c, y, x)."""
    dev = flat.device
    c = torch.arange(C, device=dev, dtype=torch.int32)[None, :, None, None]
    y = torch.arange(hc, device=dev, dtype=torch.int32)[None, None, :, None]
    x = torch.arange(wc, device=dev, dtype=torch.int32)[None, None, None, :]
    col = s[:, :, None, None, None]  # column k: [n, 1, 1, 1]
    yy, xx = col[:, 13] + y, col[:, 14] + x
    inside = (y < col[:, 0]) & (x < col[:, 1]) & (yy >= 0) & (yy < col[:, 11]) & (xx >= 0) & (xx < col[:, 12])
    idx = col[:, 10] + c * col[:, 15] + yy * col[:, 16] + xx * col[:, 17]
    idx = torch.where(inside, idx, zero)
    return flat.index_select(0, idx.view(-1)).view(n, C, hc, wc).float()


def _memory(img):
    """(the image's elements in memory order, 1-D, its strides): a view for CHW and HWC layouts (torchvision's CPU
    decoder returns HWC memory as CHW), a copy otherwise."""
    if not (img.is_contiguous() or img.permute(1, 2, 0).is_contiguous()):
        img = img.contiguous()
    flat = img.view(-1) if img.is_contiguous() else img.permute(1, 2, 0).view(-1)
    return flat, img.stride()


def resize_batch(imgs: list, plans: list, planner, budget: int = CANVAS_ELEMENTS) -> torch.Tensor:
    """The geometry of every plan as float32 [B, C, H, W], before rounding (``geometry``; tests compare it)."""
    if len(imgs) > 1 and sum(img.numel() for img in imgs) >= _INDEXABLE:  # the gather's int32 index: in halves
        half = len(imgs) // 2
        return torch.cat([resize_batch(imgs[:half], plans[:half], planner, budget),
                          resize_batch(imgs[half:], plans[half:], planner, budget)])
    dev, C = imgs[0].device, imgs[0].shape[0]
    wins = [_window(p, planner) for p in plans]
    OH, OW = planner.out_size if plans[0].crop is not None else planner.crop_size
    chunks = _chunks([b[2] * b[3] for b, _, _ in wins], [b[2:] for b, _, _ in wins], C, budget)
    order = [i for c in chunks for i in c]
    mem = [_memory(img) for img in imgs]
    flat = torch.cat([m for m, _ in mem] + [imgs[0].new_zeros(1)])  # every image, then a zero
    offsets = [0]
    for img in imgs:
        offsets.append(offsets[-1] + img.numel())
    if flat.numel() >= _INDEXABLE:
        raise UserError(f"an image of {flat.numel() - 1} values: more than the batched resize indexes (2**31 - 1)")
    # one host->device copy of every sample's numbers, in chunk order: region h, w; resized h, w; anchor y, x;
    # cubic (any other mode, as tensor_aug._interp), nearest, flip; index in the batch; offset in flat; image h, w;
    # region top, left; strides
    spec = torch.tensor([[*wins[i][0][2:], *wins[i][1], *wins[i][2], plans[i].resample not in ("nearest", "bilinear"),
                          plans[i].resample == "nearest", bool(plans[i].flip), i, offsets[i], *imgs[i].shape[1:],
                          *wins[i][0][:2], *mem[i][1]] for i in order], dtype=torch.int32)
    spec = upload(spec, dev)
    sf = spec[:, :9].float()
    ty = max(_taps(b[2], r[0], p.resample) for (b, r, _), p in zip(wins, plans))
    tx = max(_taps(b[3], r[1], p.resample) for (b, r, _), p in zip(wins, plans))
    cubic, nearest, flip = sf[:, 6] > 0, sf[:, 7] > 0, sf[:, 8] > 0
    ry, wy = _weights(sf[:, 0], sf[:, 2], sf[:, 4], OH, ty, cubic, nearest, torch.zeros_like(flip))
    rx, wx = _weights(sf[:, 1], sf[:, 3], sf[:, 5], OW, tx, cubic, nearest, flip)
    results, start = [], 0
    for chunk in chunks:
        n, hc, wc = len(chunk), max(wins[i][0][2] for i in chunk), max(wins[i][0][3] for i in chunk)
        end = start + n
        canvas = _canvas(flat, spec[start:end], n, C, hc, wc, flat.numel() - 1)
        my, mx = _dense(ry[start:end], wy[start:end], n, hc), _dense(rx[start:end], wx[start:end], n, wc)
        start = end
        with _ieee_fp32_matmul():
            rows = torch.bmm(canvas.view(n, C * hc, wc), mx.transpose(1, 2))   # [n, C * hc, OW]
            results.append(my[:, None] @ rows.view(n, C, hc, OW))             # [n, C, OH, OW]
    done = torch.cat(results) if len(results) > 1 else results[0]
    if order == list(range(len(order))):
        return done
    return torch.empty_like(done).index_copy_(0, spec[:, 9].long(), done)


def geometry(imgs: list, plans: list, planner, budget: int = CANVAS_ELEMENTS) -> torch.Tensor:
    """Decoded uint8 CHW images (any sizes, one device) -> uint8 [B, C, H, W]: ``tensor_aug.geometry`` of each,
    resampled as torchvision does it on a GPU (float32, then its cast: clamp, round; nearest is exact)."""
    return resize_batch(imgs, plans, planner, budget).clamp_(0, 255).round_().to(torch.uint8)


# ---------------------------------------------------------------- RandAugment, colour jitter

def _atoms(plan, h: int, w: int) -> list:
    """A plan's pixel ops in order as (kind, floats, ints): one kernel group per kind in ``_run``; the numbers are
    those ``tensor_aug._op`` gives torchvision as Python scalars (floats go to float32 as torch casts them)."""
    out = []
    for name, args, kw in plan.ops:
        if name == "ColorJitter":
            order, *factors = args
            kinds = ("brightness", "contrast", "saturation", "hue")
            out += [(kinds[i], _blend_args(factors[i]) if i < 3 else (factors[i],), ())
                    for i in order if factors[i] is not None]
        elif name in ("AutoContrast", "Equalize", "Invert"):
            out.append((name.lower(), (), ()))
        elif name == "Rotate":
            out.append(_affine_atom(tensor_aug._rotate_matrix(args[0], w, h), kw))
        elif name.startswith("Posterize"):
            bits = int(args[0])
            out.append(("posterize", (), (255 if bits >= 8 else 0 if bits < 1 else (255 << (8 - bits)) & 255,)))
        elif name.startswith("Solarize") and name != "SolarizeAdd":
            out.append(("solarize", (args[0],), ()))
        elif name == "SolarizeAdd":
            out.append(("solarize_add", (), (int(args[0]), kw.get("thresh", 128))))
        elif name.startswith("Color"):
            out.append(("saturation", _blend_args(args[0]), ()))
        elif name.startswith("Contrast"):
            out.append(("contrast", _blend_args(args[0]), ()))
        elif name.startswith("Brightness"):
            out.append(("brightness", (args[0],), ()))
        elif name.startswith("Sharpness"):
            out.append(("sharpness", _blend_args(args[0]), ()))
        elif name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY"):
            m = {"ShearX": (1, args[0], 0, 0, 1, 0), "ShearY": (1, 0, 0, args[0], 1, 0),
                 "TranslateXRel": (1, 0, args[0] * w, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, args[0] * h),
                 "TranslateX": (1, 0, args[0], 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, args[0])}[name]
            out.append(_affine_atom(m, kw))
        else:
            raise UserError(f"RandAugment op {name!r} has no tensor version here; use data.backend=pil")
    return out


def _blend_args(factor) -> tuple:
    return (factor, 1.0 - factor)  # torchvision's blend: image1 * r + image2 * (1 - r), 1 - r in double


def _affine_atom(matrix, kw) -> tuple:
    fill = kw.get("fillcolor", (128, 128, 128))
    fill = tuple(fill) if isinstance(fill, (tuple, list)) else (fill,) * 3
    return ("affine:" + tensor_aug._pil_mode(kw.get("resample", "bicubic")), tuple(matrix) + fill, ())


def _blend(img1, img2, r, a):
    """torchvision's _blend (image1 * r + image2 * (1 - r), clamp, truncate) with per-sample r, a = 1 - r."""
    return img1.mul(r).addcmul_(img2, a).clamp_(0, 255).to(torch.uint8)


def _gray(x):
    return x[:, 0].mul(0.2989).add_(x[:, 1], alpha=0.587).add_(x[:, 2], alpha=0.114).unsqueeze(1).floor_()


def _sharpness(x, a):
    """torchvision's adjust_sharpness_image with per-sample factors."""
    n, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    e, m = 1.0 / 13.0, 5.0 / 13.0  # torchvision's kernel: 1s at the edges, 5 in the middle, normalised
    k = tensor_aug.const(((e, e, e), (e, m, e), (e, e, e)), torch.float32, x.device).expand(c, 1, 3, 3)
    out = x.to(torch.float32, copy=True)
    blurred = F.conv2d(out, k, groups=c).round_()
    view = out[..., 1:-1, 1:-1]
    view.addcmul_(blurred.sub_(view), a)
    return out.clamp_(0, 255).to(torch.uint8)


def _hue(x, hue):
    from torchvision.transforms.v2.functional import to_dtype_image
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
    hsv = _rgb_to_hsv(to_dtype_image(x, torch.float32, scale=True))
    h, s, v = hsv.unbind(dim=-3)
    h.add_(hue).remainder_(1.0)
    return to_dtype_image(_hsv_to_rgb(torch.stack((h, s, v), dim=-3)), torch.uint8, scale=True)


def _affine(x, p, mode):
    """tensor_aug.affine with per-sample matrices and fills: p [n, 9] = a, b, c, d, e, f, fill."""
    n, c, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device, dtype=torch.float32) + 0.5,
                            torch.arange(W, device=x.device, dtype=torch.float32) + 0.5, indexing="ij")
    a, b, cc, d, e, f = (p[:, k, None, None] for k in range(6))
    grid = torch.stack([(a * xs + b * ys + cc) / W * 2 - 1, (d * xs + e * ys + f) / H * 2 - 1], -1)
    inp = torch.cat([x.float(), torch.ones_like(x[:, :1], dtype=torch.float32)], 1)
    out = F.grid_sample(inp, grid, mode=mode, padding_mode="zeros", align_corners=False)
    mask = out[:, -1:].clamp(0, 1)
    out = out[:, :-1] * mask + p[:, 6:, None, None] * (1 - mask)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _run(kind: str, x, f, i):
    """One op on a sub-batch: f [n, k] float32, i [n, k] int64 per-sample numbers."""
    import torchvision.transforms.v2.functional as TF
    fc, ic = f[:, :, None, None, None], i[:, :, None, None, None]  # column k: [n, 1, 1, 1], broadcast per sample
    if kind == "autocontrast":
        return TF.autocontrast(x)
    if kind == "equalize":
        return TF.equalize(x)
    if kind == "invert":
        return TF.invert(x)
    if kind == "posterize":
        return x & ic[:, 0].to(torch.uint8)
    if kind == "solarize":
        return torch.where(x >= fc[:, 0], x.bitwise_not(), x)
    if kind == "solarize_add":
        return torch.where(x < ic[:, 1], (x.to(torch.int16) + ic[:, 0]).clamp(0, 255).to(torch.uint8), x)
    if kind == "brightness":
        return x.mul(fc[:, 0]).clamp_(0, 255).to(torch.uint8)
    if kind == "saturation":
        return _blend(x, _gray(x), fc[:, 0], fc[:, 1])
    if kind == "contrast":
        return _blend(x, torch.mean(_gray(x), dim=(-3, -2, -1), keepdim=True), fc[:, 0], fc[:, 1])
    if kind == "sharpness":
        return _sharpness(x, fc[:, 1])
    if kind == "hue":
        return _hue(x, f[:, 0, None, None])
    if kind.startswith("affine:"):
        return _affine(x, f, kind.split(":", 1)[1])
    raise AssertionError(kind)


def rand_augment(x: torch.Tensor, plans: list) -> torch.Tensor:
    """uint8 [B, C, H, W] -> each sample's ops (``tensor_aug.rand_augment``) applied, grouped by op: at each
    position of the samples' op lists, one call per op kind on the samples that drew it."""
    _, _, h, w = x.shape
    atoms = [_atoms(p, h, w) for p in plans]
    groups = []  # (kind, sample indices, floats, ints), position by position
    for pos in range(max(map(len, atoms), default=0)):
        by_kind = defaultdict(list)
        for s, ops in enumerate(atoms):
            if pos < len(ops):
                by_kind[ops[pos][0]].append(s)
        groups += [(kind, idx, [atoms[s][pos][1] for s in idx], [atoms[s][pos][2] for s in idx])
                   for kind, idx in by_kind.items()]
    if not groups:
        return x
    # every number of the batch in two host->device copies (float32 as torch casts Python scalars; int64: the
    # groups' sample indices, then their integer arguments)
    nf, ni = max(len(g[2][0]) for g in groups) or 1, max(len(g[3][0]) for g in groups) or 1
    floats = torch.tensor([r + (0.0,) * (nf - len(r)) for g in groups for r in g[2]], dtype=torch.float64)
    total = len(floats)
    ints = torch.tensor([s for g in groups for s in g[1]] + [v for g in groups for r in g[3]
                                                             for v in r + (0,) * (ni - len(r))])
    floats, ints = upload(floats.to(torch.float32), x.device), upload(ints, x.device)
    args = ints[total:].view(total, ni)
    start, owned = 0, False
    for kind, idx, _, _ in groups:
        end = start + len(idx)
        f, i = floats[start:end], args[start:end]
        if len(idx) == len(x):  # every sample, in order
            x, owned = _run(kind, x, f, i), True
        else:
            sel = ints[start:end]
            y = _run(kind, x.index_select(0, sel), f, i)
            x = x.index_copy_(0, sel, y) if owned else x.index_copy(0, sel, y)  # the caller's tensor stays
            owned = True
        start = end
    return x


def execute(imgs: list, plans: list, planner) -> torch.Tensor:
    """Decoded uint8 CHW images -> the augmented uint8 batch (before normalise and erasing): ``tensor_aug.execute``
    of each image, per batch."""
    return rand_augment(geometry(imgs, plans, planner), plans)


# ---------------------------------------------------------------- normalise + erase

def finish(x: torch.Tensor, plans, mean, std, erase_mode: str) -> torch.Tensor:
    """``tensor_aug.finish`` with the erasing per batch: uint8 [B, C, H, W] -> normalised float (the same ops),
    erased."""
    x = x.to(torch.float32).div_(255)
    x.sub_(tensor_aug.const(tuple(mean), x.dtype, x.device).view(-1, 1, 1))
    x.div_(tensor_aug.const(tuple(std), x.dtype, x.device).view(-1, 1, 1))
    return erase(x, plans or (), erase_mode)


def erase(x: torch.Tensor, plans, mode: str) -> torch.Tensor:
    """Random erasing at each plan's boxes, in place: the k-th boxes of all samples at once (a later box of a
    sample overwrites an earlier one, as box by box). The noise: the per-sample path's values (each sample's
    generator, seeded by its seed, draws its boxes' noise in order), put in place by one masked scatter."""
    B, C, H, W = x.shape
    if not any(p.erase for p in plans):
        return x
    gens = {}
    for k in range(max(len(p.erase) for p in plans)):
        rows = [(i, p.erase[k]) for i, p in enumerate(plans) if len(p.erase) > k]
        box = [(0, 0, 0, 0)] * B  # top, bottom, left, right (empty where a sample has no k-th box)
        for i, (t, l, h, w) in rows:
            box[i] = (t, t + h, l, l + w)
        box = upload(torch.tensor(box), x.device)
        ys = torch.arange(H, device=x.device)[None, :, None]
        xs = torch.arange(W, device=x.device)[None, None, :]
        mask = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None]) & (xs >= box[:, 2, None, None])
                & (xs < box[:, 3, None, None]))[:, None]  # [B, 1, H, W]
        if mode == "const":
            x.masked_fill_(mask, 0.0)
            continue
        sizes = [C * (h * w if mode == "pixel" else 1) for _, (_, _, h, w) in rows]
        noise = torch.empty(sum(sizes), device=x.device)
        start = 0
        for (i, _), n in zip(rows, sizes):
            if i not in gens:
                gens[i] = torch.Generator(device=x.device).manual_seed((plans[i].seed ^ tensor_aug._ERASE_SALT) % 2**63)
            noise[start:start + n].normal_(generator=gens[i])
            start += n
        if mode == "pixel":
            x.masked_scatter_(mask.expand_as(x), noise)
        else:  # one value per channel and box
            vals = torch.zeros(B, C, device=x.device)
            vals.index_copy_(0, upload(torch.tensor([i for i, _ in rows]), x.device), noise.view(-1, C))
            x = torch.where(mask, vals[:, :, None, None], x)
    return x
