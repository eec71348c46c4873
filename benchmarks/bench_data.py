"""Decode + augment throughput per CPU core at 224x224, ImageFolder and webdataset paths, DeiT recipe.

    python benchmarks/bench_data.py [--images 768] [--recipe recipes/vit-b16.yaml]

Real JPEG photographs of ImageNet-like size: crops (256-640 x 256-427 px, JPEG quality 75-95) of the two
photos scikit-learn ships, written as an ImageFolder tree (10 classes) and sharded by modasm's own
make_shards (webdataset TarWriter). Each figure is one process, one thread, no loader workers (img/s per
core), through the real loaders and the recipe's transforms (timm: RandomResizedCrop 224 bicubic, flip,
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, normalise). Mixup/CutMix is batch-level on the device
and not part of this figure. Also: decode alone (PIL, full size) and the eval transform (resize 256, crop 224).
"""
import argparse
import dataclasses
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modasm import shardwriter  # noqa: E402
from modasm.config import load_recipe  # noqa: E402
from modasm.data import build_datasets, eval_loader, set_epoch, train_loader  # noqa: E402
from photos import imagefolder  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--images", type=int, default=768, help="training images (the eval split gets a third)")
p.add_argument("--recipe", default=str(ROOT / "recipes" / "vit-b16.yaml"), help="recipe whose aug section is used")
p.add_argument("--batch", type=int, default=64)
args = p.parse_args()
torch.set_num_threads(1)


def rate(loader) -> float:
    """img/s over one pass (the first batch, which pays start-up and file-cache misses, excluded)."""
    n, t0 = 0, None
    for batch in loader:
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += len(batch.keys)
    return n / (time.perf_counter() - t0)


with tempfile.TemporaryDirectory() as tmp:
    tree, shards = Path(tmp) / "tree", Path(tmp) / "wds"
    per = args.images // 10
    imagefolder(tree, {"train": [per] * 10, "val": [max(1, per // 3)] * 10}, seed=1,
                min_side=256, max_side=640)
    files = sorted((tree / "train").rglob("*.JPEG"))
    sizes = [Image.open(f).size for f in files]
    kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    shardwriter.make_shards(tree, shards, shard_size=128, threads=1, stream=io.StringIO())

    t0 = time.perf_counter()
    for f in files:
        Image.open(f).convert("RGB")
    decode = len(files) / (time.perf_counter() - t0)

    recipe = load_recipe(args.recipe)
    aug = recipe.aug
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, Pillow "
          f"{Image.__version__}; 1 process, 1 thread, no loader workers")
    print(f"images: {len(files)} train JPEGs, mean {sum(w for w, _ in sizes) / len(sizes):.0f} x "
          f"{sum(h for _, h in sizes) / len(sizes):.0f} px, {kb:.0f} KB; aug from {Path(args.recipe).name}: "
          f"{aug.rand_augment or 'no RandAugment'}, re_prob {aug.re_prob}, {aug.interpolation}")
    print(f"{'path':<12} {'what':<34} {'img/s/core':>10}")
    print(f"{'(files)':<12} {'PIL decode only, full size':<34} {decode:>10.0f}")
    for source, root in (("imagefolder", tree), ("webdataset", shards)):
        data = dataclasses.replace(recipe.data, source=source, root=str(root), num_workers=0, train_shards="",
                                   val_shards="", fraction=1.0, train_limit=0, eval_limit=0)
        one = dataclasses.replace(aug, repeated_aug=1)  # one pass = each image decoded once
        train, val = build_datasets(data, 224, 0, one)
        loader = train_loader(train, args.batch, 0, 1, 0, 0)
        set_epoch(loader, 0)
        tr = rate(loader)
        ev = rate(eval_loader(val, args.batch, 0, 1, 0))
        print(f"{source:<12} {'train: decode + DeiT augmentation':<34} {tr:>10.0f}")
        print(f"{source:<12} {'eval: decode + resize + crop':<34} {ev:>10.0f}")
    print("goal: >= 250 img/s per core for training")
