"""webdataset shards as streams: exactly-once epochs across ranks and workers, exact resume.

A split's shards come with an index (``<split>-index.json``, written by launch/make_shards.py): for
every shard its name, byte size, and the key and label of each sample in tar order. Knowing every
shard's sample count lets each rank read only its own part of an epoch, sequentially, as a stream:

* **Train.** Per epoch a seeded permutation of the shards lays the (selected) samples out in one
  sequence. Rank r takes its own contiguous range of it, cut into ``data.stream_splits`` (S)
  contiguous streams of whole micro-batches; stream v holds the rank's micro-batches v, v+S, ...
  Each stream shuffles its raw samples in a seeded buffer (``data.shuffle_buffer``) before decoding.
  Ranks get equal batch counts; every sample is read at most once per epoch, and all but the
  ``N mod (world x micro-batch)`` samples left over at the end are read exactly once. Loader workers
  deal the streams among themselves (num_workers must divide S), so the batch sequence does not
  depend on the number of workers. Only the shards at the ends of a stream's range are read twice
  (partly, by two streams): about world x S / 2 shards of extra I/O per epoch.
* **Resume** mid-epoch re-deals the same epoch with the same seed and skips the consumed
  micro-batches before decoding them (they are read again, not decoded): bit-exact, at the cost of
  re-reading the consumed part of this rank's epoch once.
* **Eval.** Rank r reads samples [r N / W, (r + 1) N / W) of the unshuffled sequence, split
  contiguously among its workers; no padding, every sample counted once.
* Augmentation seeds come from (run seed, epoch, sample key, copy): the same on every rank/worker
  layout. Repeated augmentation (r copies) repeats a raw sample r times inside its stream, before
  the shuffle buffer; a rank then reads ceil(1/r) of its share.

Shards are opened with webdataset's ``gopen`` (local paths, ``file:``, ``pipe:cmd``) and read with
its tar iterators. A shard that ends early or fails mid-way turns its remaining samples into Bad
records naming the shard; samples without an image or a ``.cls`` label are Bad too.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .. import seeds
from ..config import AugConfig, DataConfig
from ..errors import UserError
from .contract import IMAGE_EXTS, Bad, collate, key_hash, prepare, select_fraction
from .source import worker_options
from .transforms import SeededTransform, image_transforms

INDEX_FORMAT = "modasm-webdataset-index/1"
CLASSES_FILE = "classes.json"


def index_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}-index.json"


@dataclass
class ShardIndex:
    """What the index says about one split's shards."""
    names: list[str]
    sizes: list[int]            # bytes of each shard file (0: unknown)
    keys: list[list[str]]       # per shard, in tar order
    labels: list[np.ndarray]    # per shard; -1 where the sample has no label
    classes: list[str] | None


def write_index(path: Path, split: str, shards: list[dict], classes: list[str] | None) -> None:
    """Atomically write an index: ``shards`` = [{"name", "bytes", "keys", "labels"}, ...]."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"format": INDEX_FORMAT, "split": split, "classes": classes, "shards": shards}))
    os.replace(tmp, path)


def read_index(path: str | Path) -> ShardIndex:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"webdataset index {path} not found: make the shards with `launch/make_shards.py IMAGEFOLDER "
                         f"OUT` (it writes the index), or index existing shards with `launch/make_shards.py --index "
                         f"'SHARD-PATTERN' --split {path.name.split('-index')[0]} OUT`, and set data.root to OUT")
    try:
        doc = json.loads(path.read_text())
        assert doc["format"] == INDEX_FORMAT, f"format {doc.get('format')!r}"
        shards = doc["shards"]
        return ShardIndex([s["name"] for s in shards], [int(s.get("bytes", 0)) for s in shards],
                          [s["keys"] for s in shards], [np.array(s["labels"], dtype=np.int64) for s in shards],
                          doc.get("classes"))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise UserError(f"{path} is not a modasm webdataset index ({type(e).__name__}: {e}); re-make it with "
                         "launch/make_shards.py --index") from None


def shard_urls(index: ShardIndex, root: Path, pattern: str, key: str) -> list[str]:
    """Where to read each indexed shard: ``root/<name>``, or the URL of ``pattern`` that names it."""
    if not pattern:
        urls = [str(root / n) for n in index.names]
        for url, name, size in zip(urls, index.names, index.sizes):
            if size and os.path.isfile(url) and os.path.getsize(url) != size:
                raise UserError(f"shard {url} has {os.path.getsize(url)} bytes but its index says {size}: the index "
                                 "is stale; re-make the index (launch/make_shards.py --index) or the shards")
        return urls
    urls = list(braceexpand.braceexpand(pattern))
    by_name = {}
    for url in urls:
        hits = [n for n in index.names if n in url]
        if len(hits) == 1:
            by_name[hits[0]] = url
    missing = [n for n in index.names if n not in by_name]
    if missing:
        raise UserError(f"{key}={pattern!r} expands to {len(urls)} URLs but names no shard {missing[0]!r} of the "
                         f"index ({len(missing)} of {len(index.names)} shards missing); the pattern must name "
                         "every shard the index lists")
    return [by_name[n] for n in index.names]


def _open_samples(url: str):
    """(stream, iterator of raw sample dicts) of one shard, via webdataset's gopen and tar iterators."""
    stream = wds.gopen(url)
    return stream, group_by_keys(tar_file_expander([dict(url=url, stream=stream)]))


def index_shards(urls: list[str], split: str, out: Path, classes: list[str] | None = None, progress=None) -> Path:
    """Index existing shards (read once, in full): keys and ``.cls`` labels in tar order."""
    shards = []
    for i, url in enumerate(urls):
        stream, samples = _open_samples(url)
        keys, labels = [], []
        try:
            for s in samples:
                keys.append(s["__key__"])
                try:
                    labels.append(int(s["cls"]))
                except (KeyError, ValueError):
                    labels.append(-1)
        finally:
            stream.close()
        size = os.path.getsize(url) if os.path.isfile(url) else 0
        shards.append({"name": os.path.basename(url.split()[-1] if url.startswith("pipe:") else url),
                       "bytes": size, "keys": keys, "labels": labels})
        if progress:
            progress(i + 1, len(urls), sum(len(s["keys"]) for s in shards))
    out.mkdir(parents=True, exist_ok=True)
    write_index(index_path(out, split), split, shards, classes)
    return index_path(out, split)


# ---------------------------------------------------------------- the stream


class ShardStream(IterableDataset):
    """One split's shards as a stream of collated Batches (see the module docstring for the dealing)."""

    position_is_global = False  # each rank reads its own range: a position means nothing on another rank count

    def __init__(self, urls: list[str], names: list[str], selected: list[np.ndarray], transform: SeededTransform,
                 train: bool, seed: int, repeats: int = 1, streams: int = 8, shuffle_buffer: int = 2000):
        self.urls, self.names, self.selected, self.transform = urls, names, selected, transform
        self.train, self.seed, self.repeats, self.streams, self.shuffle_buffer = train, seed, repeats, streams, shuffle_buffer
        self.n = int(sum(len(s) for s in selected))
        self.rank, self.world, self.micro, self.epoch, self.start = 0, 1, 1, 0, 0
        self.start_method: str | None = None  # of the loader workers (data.worker_start)

    def __len__(self) -> int:
        return self.n

    def configure(self, rank: int, world: int, micro: int, workers: int) -> None:
        if self.train and workers and self.streams % workers:
            raise UserError(f"data.num_workers={workers} must divide data.stream_splits={self.streams} (each worker "
                            "reads whole streams); change one of them")
        self.rank, self.world, self.micro, self.workers = rank, world, micro, workers

    def loader(self) -> DataLoader:
        # the stream batches itself; fresh workers each epoch copy the stream's epoch and start position
        return DataLoader(self, batch_size=None, pin_memory=getattr(self, "pin_memory", False),
                          **worker_options(self.workers, self.start_method))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """``start``: samples of this rank already consumed this epoch (a multiple of the micro-batch)."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self._train(worker, workers) if self.train else self._eval(worker, workers)

    # -- reading ranges of the epoch's sequence

    def _sequence(self, order: np.ndarray) -> np.ndarray:
        return np.cumsum([len(self.selected[s]) for s in order])

    def _read(self, order, ends, start: int, count: int):
        """Raw samples (dicts) or Bad records at positions [start, start + count) of the sequence (wrapping)."""
        pos, end = start, start + count
        while pos < end:
            p = pos % self.n
            i = int(np.searchsorted(ends, p, side="right"))
            first = int(ends[i]) - len(self.selected[order[i]])
            take = min(end - pos, int(ends[i]) - p)
            yield from self._read_shard(order[i], self.selected[order[i]][p - first:p - first + take])
            pos += take

    def _read_shard(self, s: int, wanted: np.ndarray):
        url, name, wanted = self.urls[s], self.names[s], wanted.tolist()
        got, error, stream = 0, None, None
        try:
            stream, samples = _open_samples(url)
            for p, sample in enumerate(samples):
                if got == len(wanted):
                    break
                if p == wanted[got]:
                    got += 1
                    yield sample
        except Exception as e:  # unreadable or cut-short shard: its remaining samples are counted as bad
            error = f"{type(e).__name__}: {e.args[0] if e.args else e}"
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # a pipe: closed before its end exits with SIGPIPE
                    pass
        for p in wanted[got:]:
            yield Bad(f"{name}#{p}", url, error or f"shard ended before sample {p} (cut short or re-written since "
                                                  "it was indexed)")

    # -- decoding

    def _decode(self, raw, copy: int):
        if isinstance(raw, Bad):
            return raw
        key, url = raw["__key__"], raw["__url__"]
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            return Bad(key, url, f"no image ({', '.join('.' + e for e in IMAGE_EXTS[:3])}, ...) in the sample")
        try:
            label = int(raw["cls"])
        except KeyError:
            return Bad(key, url, "no label (.cls)")
        except ValueError:
            return Bad(key, url, f"label {raw['cls'][:20]!r} is not an integer")
        seed = seeds.sample(self.seed, self.epoch, key_hash(key), self.repeats, copy) if self.train else None
        img = prepare(self.transform, raw[ext], url, key, seed)
        if isinstance(img, Bad):
            return img
        return img, label, key

    # -- train: streams of whole micro-batches

    def _layout(self):
        """Per stream v: (first position, raw samples, micro-batches) of this rank's share of the epoch."""
        per_rank = self.n // self.world
        batches = per_rank // self.micro
        nb = [batches // self.streams + (v < batches % self.streams) for v in range(self.streams)]
        raw = [-(-b * self.micro // self.repeats) for b in nb]
        first = self.rank * sum(raw) + np.concatenate([[0], np.cumsum(raw)[:-1]])
        return [(int(f), r, b) for f, r, b in zip(first, raw, nb)]

    def _stream(self, order, ends, v: int, first: int, raw: int, batches: int, skip: int):
        samples = self._read(order, ends, first, raw)
        copies = ((s, c) for s in samples for c in range(self.repeats))
        rng = random.Random(seeds.stream(self.seed, self.epoch, self.rank, v))
        shuffled = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(copies)
        for b in range(batches):
            batch = [next(shuffled) for _ in range(self.micro)]
            if b >= skip:  # consumed before a resume: read again, not decoded
                yield collate([self._decode(raw_sample, c) for raw_sample, c in batch])

    def _train(self, worker: int, workers: int):
        g = np.random.default_rng(seeds.shard_order(self.seed, self.epoch))
        order = g.permutation(len(self.selected))
        ends = self._sequence(order)
        done = self.start // self.micro  # micro-batches of this rank consumed this epoch
        S = self.streams
        # after a resume, worker w must produce the rank's batches done + w, done + w + W, ...
        mine = [v for v in range(S) if (v - done) % workers == worker]
        live = []
        for v in mine:
            first, raw, batches = self._layout()[v]
            skip = max(0, -(-(done - v) // S))  # batches j < done with j % S == v
            if skip < batches:
                live.append([skip * S + v, self._stream(order, ends, v, first, raw, batches, skip)])
        while live:  # in the order of the rank's batch sequence: batch j comes from stream j % S
            live.sort(key=lambda t: t[0])
            item = live[0]
            try:
                yield next(item[1])
                item[0] += S
            except StopIteration:
                live.pop(0)

    # -- eval: contiguous ranges, no padding

    def _eval(self, worker: int, workers: int):
        order = np.arange(len(self.selected))
        ends = self._sequence(order)
        lo, hi = self.rank * self.n // self.world, (self.rank + 1) * self.n // self.world
        lo, hi = lo + worker * (hi - lo) // workers, lo + (worker + 1) * (hi - lo) // workers
        batch = []
        for raw in self._read(order, ends, lo, hi - lo):
            batch.append(self._decode(raw, 0))
            if len(batch) == self.micro:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)


def _split(cfg: DataConfig, split: str, pattern: str, key: str, fraction: float = 1.0, limit: int = 0,
           limit_seed: int | None = None):
    root = Path(cfg.root)
    index = read_index(index_path(root, split))
    urls = shard_urls(index, root, pattern, key)
    counts = [len(k) for k in index.keys]
    flat = select_fraction([k for ks in index.keys for k in ks], np.concatenate(index.labels), fraction)
    if limit and limit < len(flat):
        if limit_seed is None:  # eval: the first samples
            flat = flat[:limit]
        else:  # train: the first of a seeded permutation
            flat = np.sort(flat[np.random.default_rng(seeds.subset(limit_seed)).permutation(len(flat))[:limit]])
    bounds = np.concatenate([[0], np.cumsum(counts)])
    selected = [flat[(flat >= a) & (flat < b)] - a for a, b in zip(bounds[:-1], bounds[1:])]
    return urls, index.names, selected


def build(cfg: DataConfig, aug: AugConfig, img_size: int, seed: int):
    """(train, val) ShardStreams of ``cfg.root``'s indices."""
    train_tf, eval_tf = image_transforms(aug, img_size, cfg.backend)
    tr = _split(cfg, "train", cfg.train_shards, "data.train_shards", cfg.fraction, cfg.train_limit, seed)
    va = _split(cfg, "val", cfg.val_shards, "data.val_shards", limit=cfg.eval_limit)
    return (ShardStream(*tr, train_tf, True, seed, aug.repeated_aug, cfg.stream_splits, cfg.shuffle_buffer),
            ShardStream(*va, eval_tf, False, seed))
