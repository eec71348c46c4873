"""ImageFolder tree -> webdataset shards, with a class-index file and per-split sample indices.

``make_shards(src, out)`` turns ``src/train/<class>/<image>`` (and ``src/val/...``) into
``out/train-000000.tar, ...`` written by webdataset's own TarWriter: each sample is the original
image bytes (``.jpg``/``.png``/...) plus its label (``.cls``), keyed by its path without extension.
The samples are shuffled with a seed first, so every shard mixes the classes (what streaming needs).

Resumable: the plan (which sample goes in which shard) is a function of the source listing, the seed
and the shard size, recorded in ``<split>-plan.json``. Re-running the same command keeps every
finished shard whose members match the plan (headers checked, not decoded), redoes the others;
a shard is written to ``<name>.tmp``, fsynced, then renamed. The index (``<split>-index.json``,
which the training stream needs) is written last: a directory without it is not finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from ..errors import UserError
from ..metrics import Progress, fmt_eta
from .contract import sample_key
from .imagefolder import scan
from .wds import CLASSES_FILE, index_path, write_index

SPLITS = ("train", "val")


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _members_match(path: Path, keys: list[str]) -> bool:
    """True when the tar's members are exactly the planned samples (an image and a .cls each), in order."""
    try:
        with tarfile.open(path, "r:") as tar:
            names = tar.getnames()
    except (tarfile.TarError, OSError, EOFError):
        return False
    got = []
    for name in names:
        key, ext = base_plus_ext(name)
        if not got or got[-1][0] != key:
            got.append((key, set()))
        got[-1][1].add(ext)
    return [k for k, _ in got] == keys and all("cls" in e and len(e) == 2 for _, e in got)


def _ext(path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower()
    return "jpg" if ext == "jpeg" else ext


def _write_shard(path: Path, root: Path, files: list[str], labels: list[int], pool: ThreadPoolExecutor) -> None:
    tmp = path.with_name(path.name + ".tmp")
    writer = wds.TarWriter(str(tmp), mtime=0.0)  # fixed mtime: the same plan gives the same bytes
    try:
        for f, label, data in zip(files, labels, pool.map(lambda f: (root / f).read_bytes(), files)):
            writer.write({"__key__": sample_key(f), _ext(f): data, "cls": int(label)})
    finally:
        writer.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _plan(src: Path, out: Path, split: str, files: list[str], shard_size: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(files))
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    plan = {"source": str(src.resolve()), "files": len(files), "files_sha256": digest, "seed": seed,
            "shard_size": shard_size}
    path = out / f"{split}-plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in ("files", "files_sha256", "seed", "shard_size") if old.get(k) != plan[k]]
        if changed:
            raise UserError(f"{out} holds {split} shards of another plan ({', '.join(f'{k}: {old.get(k)} -> {plan[k]}' for k in changed)}): "
                             "re-run with the original source, --seed and --shard-size, or write to a new directory")
    _atomic_json(path, plan)
    return order


def make_split(src: Path, out: Path, split: str, classes: list[str], shard_size: int, seed: int,
               threads: int, stream=sys.stdout) -> Path:
    split_classes, files, labels = scan(src / split)
    if split_classes != classes:
        raise UserError(f"{src / split}: its class directories differ from {src / 'train'}'s; both need the same classes")
    order = _plan(src, out, split, files, shard_size, seed)
    shards = [order[i:i + shard_size] for i in range(0, len(order), shard_size)]
    progress = Progress("make_shards", len(files), mode="auto", stream=stream)
    progress.meter.set_description(f"[make_shards] {split}")
    last = 0.0
    entries = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for i, idx in enumerate(shards):
            path = out / f"{split}-{i:06d}.tar"
            keys = [sample_key(files[j]) for j in idx]
            done = path.is_file() and _members_match(path, keys)
            if not done:
                _write_shard(path, src / split, [files[j] for j in idx], [int(labels[j]) for j in idx], pool)
            entries.append({"name": path.name, "bytes": path.stat().st_size, "keys": keys,
                            "labels": [int(labels[j]) for j in idx]})
            progress.advance(len(idx))
            if progress.meter.format_dict["elapsed"] - last >= 5 or i == len(shards) - 1:  # a line every 5 s
                last = progress.meter.format_dict["elapsed"]
                n = progress.meter.n
                progress.show(f"{split}: {n}/{len(files)} images ({100 * n / len(files):.1f} %), shard {i + 1}/"
                              f"{len(shards)}, {progress.rate:.0f} img/s, ETA {fmt_eta(progress.eta)}")
    progress.close()
    write_index(index_path(out, split), split, entries, classes)
    return index_path(out, split)


def make_shards(src: str | Path, out: str | Path, shard_size: int = 1000, seed: int = 0, threads: int = 8,
                splits=SPLITS, stream=sys.stdout) -> list[Path]:
    """Shard ``src/<split>`` for each split present; returns the index files written."""
    src, out = Path(src), Path(out)
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    present = [s for s in splits if (src / s).is_dir()]
    if "train" not in present:
        raise UserError(f"{src}/train not found: the source must be an ImageFolder tree with train/ (and val/), "
                         "each holding one directory per class")
    classes = scan(src / "train")[0]
    out.mkdir(parents=True, exist_ok=True)
    cls_path = out / CLASSES_FILE
    if cls_path.is_file() and json.loads(cls_path.read_text()).get("classes") != classes:
        raise UserError(f"{cls_path} lists other classes than {src / 'train'}: write to a new directory")
    _atomic_json(cls_path, {"classes": classes, "class_to_idx": {c: i for i, c in enumerate(classes)}})
    return [make_split(src, out, s, classes, shard_size, seed, threads, stream) for s in present]
