"""Device augmentation image by image vs per batch (issue 21): ops launched and host ms per image (make bench-data).

The nvjpeg/dali device work after the decode, as ``to_device`` runs it: the DeiT plans of recipes/vit-b16.yaml
(random-resized crop 224 bicubic, flip, RandAugment m9-mstd0.5-inc1, random erasing 0.25 per-pixel) applied to
a batch of decoded real JPEG photos (tests/photos.py), then normalise + erase. Rows:

* per-sample: ``tensor_aug.execute`` image by image + ``tensor_aug.finish`` (the path before issue 21; still what
  ``to_device`` runs on a CPU);
* batched: ``batch_aug.execute`` + ``batch_aug.finish`` (what ``to_device`` runs on a GPU);
* RandAugment only, per sample vs per batch (the device work of data.backend=dali after DALI's resize).

Columns: aten ops per image (torch.profiler: every aten op recorded, and the "compute" ones: leaves that are no
view, reshape or allocation: on a CPU the proxy for kernel launches), on CUDA the kernels launched per image
and the host waits (synchronize calls and blocking copies) per batch; host ms per image (wall time until the
call returns, before any sync: on a CPU that is all of the work, on a GPU what the training process spends
queueing it); img/s (wall time including the device's work). Rows interleaved over --rounds, each row's best
round kept (the machine may be shared). ``--check``: how far the batched outputs are from the per-sample ones
on this device (uint8 before normalise: max |diff| and the fraction of values that differ).
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import photos  # noqa: E402  (imports scikit-learn only when called)
from modasm.config import load_recipe  # noqa: E402
from modasm.data import batch_aug, image_transforms, tensor_aug  # noqa: E402
from modasm.data.nvjpeg import decode_jpegs  # noqa: E402

# aten ops that launch no kernel: views, shape changes, allocations, metadata
NO_KERNEL = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "reshape", "_reshape_alias",
             "as_strided", "slice", "select", "expand", "expand_as", "unsqueeze", "squeeze", "permute", "transpose",
             "t", "unbind", "split", "narrow", "detach", "alias", "lift_fresh", "resolve_conj", "resolve_neg",
             "view_as", "unflatten", "flatten", "movedim", "moveaxis", "result_type", "is_nonzero",
             "_local_scalar_dense",
             "size", "stride", "dim", "numel", "contiguous", "to", "_to_copy", "set_", "resize_", "broadcast_to",
             "meshgrid", "chunk", "split_with_sizes", "diagonal", "_has_compatible_shallow_copy_type", "item",
             "scalar_tensor", "zeros_like_", "type_as", "lift", "_reshape_copy"}


def count_ops(fn, device) -> dict:
    """Ops recorded by torch.profiler while ``fn`` runs once, after a warm-up call: what a first call builds once
    (tensor_aug's cached constants) depends on what ran before in the process, not on ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    aten = [e for e in prof.events() if e.name.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU]
    # compute: the innermost ops that are no view or allocation, nor the 0-dim copy a CPU makes of a Python scalar
    # operand. Innermost among those: an op whose only aten children are views counts (whether aten::cat calls
    # narrow inside depends on its size and the thread count), an op with a computing descendant does not.
    scalar_copy = lambda e: e.name == "aten::copy_" and not any(e.input_shapes)  # noqa: E731
    works = {}

    def has_work(e) -> bool:  # e or a descendant computes
        if id(e) not in works:
            below = [has_work(c) for c in e.cpu_children if c.name.startswith("aten::")]
            works[id(e)] = any(below) or (e.name[6:] not in NO_KERNEL and not scalar_copy(e))
        return works[id(e)]
    computes = [e for e in aten if has_work(e) and not any(has_work(c) for c in e.cpu_children
                                                           if c.name.startswith("aten::"))]
    out = {"aten": len(aten), "compute": len(computes)}
    if device.type == "cuda":
        dev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        out["kernels"] = sum(not e.name.startswith(("Memcpy", "Memset")) for e in dev)
        out["waits"] = sum(e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                                      "cudaMemcpy") for e in prof.events())
    return out


def timed(fn, device) -> tuple[float, float]:
    """(host seconds until ``fn`` returns, seconds until the device has finished it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return host, time.perf_counter() - t0


def jpegs(n: int, sides, seed: int = 0) -> tuple[list[bytes], str]:
    """``n`` JPEG files: crops of real photographs (tests/photos.py, scikit-learn's sample images), or where
    scikit-learn is missing (the GPU machine) smooth gradients with noise of the same sizes."""
    try:
        return photos.jpegs(n, seed=seed, min_side=sides[0], max_side=sides[1], quality=(85, 96)), "JPEG photos"
    except ImportError:
        import io

        import numpy as np
        from PIL import Image
        rng, out = np.random.default_rng(seed), []
        for _ in range(n):
            h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (h + w))], -1)
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=int(rng.integers(85, 96)))
            out.append(buf.getvalue())
        return out, "synthetic JPEGs (no scikit-learn)"


def setup(n: int, size: int, device: torch.device, sides=(256, 500), seed: int = 0):
    """(decoded images on ``device``, their plans, the training transform, what they are) for ``n`` JPEGs."""
    aug = load_recipe(ROOT / "recipes" / "vit-b16.yaml").aug
    tf, _ = image_transforms(aug, size, "nvjpeg")
    blobs, kind = jpegs(n, sides, seed)
    encs = [tf.from_bytes(b, "bench", f"k{i}", 10_000 + i) for i, b in enumerate(blobs)]
    imgs = decode_jpegs([e.data for e in encs], device)
    return imgs, [e.plan for e in encs], tf, kind


def rows(imgs, plans, tf):
    """(name, fn) of each path."""
    planner, mean, std, mode = tf.planner.transform, tf.mean, tf.std, tf.erase_mode
    geo = torch.stack([tensor_aug.geometry(img, p, planner) for img, p in zip(imgs, plans)])  # as DALI's output

    def per_sample():
        x = torch.stack([tensor_aug.execute(img, p, planner) for img, p in zip(imgs, plans)])
        return tensor_aug.finish(x, plans, mean, std, mode)

    def batched():
        return batch_aug.finish(batch_aug.execute(imgs, plans, planner), plans, mean, std, mode)
    return [
        ("crop+resize+flip+RandAugment+normalise+erase: per-sample (before)", per_sample),
        ("  batched", batched),
        ("RandAugment only (dali): per-sample (before)",
         lambda: torch.stack([tensor_aug.rand_augment(g, p) for g, p in zip(geo, plans)])),
        ("  batched", lambda: batch_aug.rand_augment(geo, plans)),
    ]


def check(imgs, plans, tf) -> list[str]:
    """Batched vs per-sample uint8 outputs on this device."""
    planner = tf.planner.transform
    ref = torch.stack([tensor_aug.execute(img, p, planner) for img, p in zip(imgs, plans)])
    geo = torch.stack([tensor_aug.geometry(img, p, planner) for img, p in zip(imgs, plans)])
    # the per-sample resize as torchvision runs it on a GPU (float32, clamp, round); on a CPU it runs uint8 images
    # through a fixed-point kernel that rounds its intermediate to uint8
    floats = torch.stack([tensor_aug.geometry(img.float(), p, planner) for img, p in zip(imgs, plans)])
    lines = []
    for name, got, want in (
            ("geometry (crop, resize, flip)", batch_aug.geometry(imgs, plans, planner), geo),
            ("  vs the per-sample float32 resize", batch_aug.geometry(imgs, plans, planner),
             floats.clamp_(0, 255).round_().to(torch.uint8)),
            ("geometry + RandAugment", batch_aug.execute(imgs, plans, planner), ref),
            ("RandAugment on the same input", batch_aug.rand_augment(geo, plans),
             torch.stack([tensor_aug.rand_augment(g, p) for g, p in zip(geo, plans)]))):
        d = (got.int() - want.int()).abs()
        frac = float((d > 0).float().mean())
        lines.append(f"{name:44s} max |diff| {int(d.max()):3d}   values that differ {frac:.2e}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128, help="images per batch (one batch, timed --rounds times)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--sides", default="256,500", help="shortest,longest side of the decoded photos (ImageNet-like)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--check", action="store_true", help="also print batched vs per-sample differences")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    imgs, plans, tf, kind = setup(args.batch, args.size, device, tuple(int(v) for v in args.sides.split(",")))
    n = len(imgs)
    print(f"# {n} decoded {kind} (mean {sum(i.shape[2] for i in imgs) / n:.0f} x "
          f"{sum(i.shape[1] for i in imgs) / n:.0f} px) on {device}, one batch, {args.size}^2, DeiT aug of "
          f"recipes/vit-b16.yaml; torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}")
    jobs = rows(imgs, plans, tf)
    ops = [count_ops(fn, device) for _, fn in jobs]  # each job's first calls: also the timing's warm-up (allocator,
    # lazy imports, cuBLAS handles)
    best = [(float("inf"), float("inf"))] * len(jobs)
    for _ in range(args.rounds):
        for i, (_, fn) in enumerate(jobs):
            h, t = timed(fn, device)
            best[i] = (min(best[i][0], h), min(best[i][1], t))
    print(f"# load avg after: {os.getloadavg()[0]:.1f}")
    cuda = device.type == "cuda"
    head = f"{'path':68s} {'aten ops/img':>12s} {'compute/img':>11s}"
    head += f" {'kernels/img':>11s} {'waits/batch':>11s}" if cuda else ""
    print(head + f" {'host ms/img':>11s} {'img/s':>8s}")
    for (name, _), o, (h, t) in zip(jobs, ops, best):
        line = f"{name:68s} {o['aten'] / n:12.1f} {o['compute'] / n:11.1f}"
        line += f" {o['kernels'] / n:11.1f} {o['waits']:11d}" if cuda else ""
        print(line + f" {h / n * 1e3:11.3f} {n / t:8.0f}")
    if args.check:
        print(f"# batched vs per-sample on {device} (uint8, before normalise)")
        print("\n".join(check(imgs, plans, tf)))


if __name__ == "__main__":
    main()
