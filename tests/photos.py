"""Real JPEG photographs for data tests: crops of the two photos scikit-learn ships (640 x 427).

Crops of varying size are re-encoded with Pillow, so tests and the benchmark decode real photo
content at ImageNet-like sizes (not upscaled digits). Deterministic for a seed.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def _photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images
    return [Image.fromarray(a) for a in load_sample_images().images]


def jpegs(n: int, seed: int = 0, min_side: int = 120, max_side: int = 427, quality=(75, 95)) -> list[bytes]:
    """``n`` JPEG files (bytes): random crops of the photos, sides in [min_side, max_side]."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        w = int(rng.integers(min_side, min(max_side, img.width) + 1))
        h = int(rng.integers(min_side, min(max_side, img.height) + 1))
        x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        buf = io.BytesIO()
        img.crop((x, y, x + w, y + h)).save(buf, "JPEG", quality=int(rng.integers(*quality)))
        out.append(buf.getvalue())
    return out


def imagefolder(root: Path, per_class: dict[str, list[int]], seed: int = 0, **kw) -> dict[str, list[str]]:
    """Write ``root/<split>/<class>/<class>_<i>.JPEG``; per_class = {split: [count of class 0, 1, ...]}.

    Returns the keys per split (``<class>/<class>_<i>``)."""
    keys = {}
    for s, (split, counts) in enumerate(per_class.items()):
        data = iter(jpegs(sum(counts), seed=seed * 100 + s, **kw))
        keys[split] = []
        for c, count in enumerate(counts):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (d / f"class{c}_{i:04d}.JPEG").write_bytes(next(data))
                keys[split].append(f"class{c}/class{c}_{i:04d}")
    return keys
