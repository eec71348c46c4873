"""Decode + augment throughput of the image sources (make bench-data), in img/s per core.

Builds an ImageFolder tree of real JPEG photos at ImageNet-like sizes (crops of scikit-learn's sample
photographs, 256-500 x 256-427 px, quality 85-95; tests/photos.py) and its webdataset shards, then
times one process with one torch thread (= one core) through the real loaders (rows interleaved over
--rounds passes, each row's best pass kept: the machine may be shared) with the recipe's DeiT
augmentation (recipes/vit-b16.yaml: RandAugment m9-mstd0.5-inc1, random erasing 0.25, 224^2), and the
same with N loader workers. The GPU paths run here on the CPU: the uint8 loader (normalise + erasing after it),
data.backend=nvjpeg (torchvision's CPU decode_jpeg + the tensor augmentation) and data.backend=dali (DALI's
CPU mode), each through ``to_device`` as the training loop calls it, with the device work image by image
(``tensor_aug``; what to_device runs on a CPU) and per batch (``batch_aug``; what it runs on a GPU). Figures go to
docs/benchmarks.md ("Data loading (CPU)"); benchmarks/bench_aug.py counts the ops of the two device paths.
"""
import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import photos  # noqa: E402
from modasm.config import DataConfig, load_recipe  # noqa: E402
from modasm.data import build_datasets, image_transforms, to_device, train_loader  # noqa: E402
from modasm.data.transforms import posterize_zero_bits_is_black  # noqa: E402
from modasm.data.writer import make_shards  # noqa: E402


def rate(n, fn, repeats=2):
    """Images per second of ``fn`` (best of ``repeats``: the machine may be shared)."""
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def epoch(ds, workers, micro=64, uint8=False, device="cpu"):
    """One epoch through the loader and ``to_device`` (what the training loop does with a batch before the
    model; for nvjpeg/dali that is the decode and augmentation, for uint8 normalise + erase)."""
    loader = train_loader(ds, micro, 0, 1, workers, uint8=uint8, pin_memory=device != "cpu")
    ds.set_epoch(0)
    n = sum(len(to_device(ds, b, torch.device(device), non_blocking=True).keys) for b in loader)
    if device != "cpu":
        torch.cuda.synchronize()
    return n


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=1024, help="training images (4 classes)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3, help="passes over all rows; each row's best pass is kept")
    p.add_argument("--pil-only", action="store_true", help="only the pil rows (the figures before issue 13)")
    p.add_argument("--device", default="cpu", help="where to_device runs for the uint8/nvjpeg/dali rows: 'cuda' "
                   "measures img/s per GPU of those rows (loader workers: --workers), the others stay per core")
    args = p.parse_args()
    torch.set_num_threads(1)
    aug = load_recipe(ROOT / "recipes" / "vit-b16.yaml").aug
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    per = args.images // 4
    photos.imagefolder(tmp / "tree", {"train": [per] * 4, "val": [8] * 4}, min_side=256, max_side=500,
                       quality=(85, 96))
    make_shards(tmp / "tree", tmp / "wds", shard_size=256, stream=io.StringIO())
    files = sorted((tmp / "tree" / "train").rglob("*.JPEG"))
    n = len(files)
    size_kb = sum(f.stat().st_size for f in files) / n / 1024
    dims = [Image.open(f).size for f in files]
    print(f"# {n} JPEG photos, mean {sum(d[0] for d in dims) / n:.0f} x {sum(d[1] for d in dims) / n:.0f} px, "
          f"{size_kb:.0f} KiB; {args.size}^2, DeiT aug of recipes/vit-b16.yaml; {platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads 1, load avg {os.getloadavg()[0]:.1f}")
    tf, ev = image_transforms(aug, args.size)
    blobs = [f.read_bytes() for f in files]
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    from timm.data import create_transform
    uint8 = create_transform(args.size, is_training=True, auto_augment=aug.rand_augment, interpolation="bicubic",
                             use_prefetcher=True)  # no float conversion / normalise / erase: done on the GPU
    posterize_zero_bits_is_black(uint8)
    from functools import partial

    from torchvision.io import decode_jpeg
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    jobs = [  # (name, fn, cores): timed in rounds, rows interleaved, best round kept (the machine is shared)
        ("JPEG decode only (PIL, libjpeg-turbo)", lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs], 1),
        ("JPEG decode only (torchvision decode_jpeg, CPU; bit-identical)", lambda: [decode_jpeg(t) for t in tensors], 1),
        ("DeiT train transform only (decoded)", lambda: [tf(im, i) for i, im in enumerate(imgs)], 1),
        ("  same, uint8 out (normalise+erase on GPU)", lambda: [uint8(im) for im in imgs], 1),
        ("eval transform only (resize 256, crop 224)", lambda: [ev(im, None) for im in imgs], 1),
    ]
    variants = [("pil", False, "", None)]
    if not args.pil_only:
        variants += [("pil", True, " [uint8 out; normalise+erase after]", None)]
        # the device work image by image (before issue 21; what to_device runs on a CPU) and per batch (on a GPU)
        devices = [("nvjpeg", " [nvjpeg on CPU")]
        from importlib.util import find_spec
        if find_spec("nvidia") and find_spec("nvidia.dali"):
            devices.append(("dali", " [dali CPU mode"))
        else:
            print("# DALI not installed: no dali rows (pip install nvidia-dali-cuda130)")
        for backend, label in devices:
            variants += [(backend, False, label + ", aug image by image]", False),
                         (backend, False, label + ", aug per batch]", True)]
    for backend, uint8_out, label, batched in variants:
        for source, root in (("imagefolder", tmp / "tree"), ("webdataset", tmp / "wds")):
            cfg = DataConfig(source=source, root=str(root), stream_splits=args.workers * 2, shuffle_buffer=500,
                             backend=backend)
            ds, _ = build_datasets(cfg, args.size, 0, aug)
            ds.transform.batched = batched
            if args.device != "cpu" and label:
                jobs.append((f"{source}{label} on {args.device}, {args.workers} loader workers (per GPU)",
                             partial(epoch, ds, args.workers, uint8=uint8_out, device=args.device), 1))
                continue
            jobs.append((f"{source}{label}: read+decode+aug+collate(+to_device), 1 process",
                         partial(epoch, ds, 0, uint8=uint8_out), 1))
            if backend == "pil" and not uint8_out:
                jobs.append((f"{source}: same, {args.workers} workers (per core)", partial(epoch, ds, args.workers),
                             args.workers))
    best = [0.0] * len(jobs)
    for _ in range(args.rounds):
        for i, (_, fn, cores) in enumerate(jobs):
            best[i] = max(best[i], rate(n, fn, repeats=1) / cores)
    print(f"# load avg after: {os.getloadavg()[0]:.1f}")
    print(f"{'path':96s} {'img/s per core':>14s}")
    for (name, _, _), r in zip(jobs, best):
        print(f"{name:96s} {r:14.0f}")


if __name__ == "__main__":
    main()
