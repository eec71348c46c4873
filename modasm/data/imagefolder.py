"""ImageFolder trees (``<root>/train/<class>/<image>``, ``<root>/val/...``): one image file per sample."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import AugConfig, DataConfig
from ..errors import UserError
from .contract import IMAGE_EXTS, Bad, prepare, sample_key, select_fraction, subset
from .source import MapSource
from .transforms import SeededTransform, image_transforms


def scan(root: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(classes, image paths relative to root, labels) of ``root/<class>/**/<image>``, sorted.

    Labels follow the sorted class directory names (torchvision's ImageFolder order).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"ImageFolder directory {root} does not exist: data.root must hold train/ and val/, each "
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
        raise UserError(f"{root}: no images found (expected {root}/<class>/<image>.jpg with extensions "
                        f"{', '.join(IMAGE_EXTS)})")
    keys = [sample_key(f) for f in files]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise UserError(f"{root}: two images share the key {dup!r} (same name up to extension or dots); rename one")
    return classes, files, np.array(labels, dtype=np.int64)


class ImageFolderDataset(MapSource):
    """Map-style: one JPEG (or PNG, ...) file per sample, decoded and augmented on access."""

    def __init__(self, root: str | Path, files: list[str], labels: np.ndarray, transform: SeededTransform,
                 train: bool, repeats: int = 1, seed: int = 0):
        self.root, self.files, self.labels, self.transform = Path(root), files, labels, transform
        self.train, self.repeats, self.seed = train, repeats, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item):
        i, aug_seed = item if isinstance(item, tuple) else (item, None)
        path, key = self.root / self.files[i], sample_key(self.files[i])
        try:
            data = path.read_bytes()
        except OSError as e:
            return Bad(key, str(path), f"{type(e).__name__}: {e}")
        img = prepare(self.transform, data, str(path), key, aug_seed)
        if isinstance(img, Bad):
            return img
        return img, int(self.labels[i]), key


def build(cfg: DataConfig, aug: AugConfig, img_size: int, seed: int):
    root = Path(cfg.root)
    train_tf, eval_tf = image_transforms(aug, img_size, cfg.backend)
    tr_classes, tr_files, tr_labels = scan(root / "train")
    va_classes, va_files, va_labels = scan(root / "val")
    if tr_classes != va_classes:
        only = sorted(set(tr_classes) ^ set(va_classes))[:5]
        raise UserError(f"{root}: train/ and val/ have different class directories (e.g. {only}); both need the "
                        "same classes")
    keep = select_fraction([sample_key(f) for f in tr_files], tr_labels, cfg.fraction)
    if (idx := subset(len(keep), cfg.train_limit, seed)) is not None:
        keep = keep[idx.numpy()]
    va = slice(0, cfg.eval_limit or None)
    return (ImageFolderDataset(root / "train", [tr_files[i] for i in keep], tr_labels[keep], train_tf, True,
                               aug.repeated_aug, seed),
            ImageFolderDataset(root / "val", va_files[va], va_labels[va], eval_tf, False, seed=seed))
