"""Data: sources, the sample/batch contract, transforms, samplers, loaders.

Sources (``data.source``): ``fashion-mnist`` (the embedded dataset, its own fixed transform; ``fmnist``),
``imagefolder`` (``<root>/train/<class>/<image>``, map-style; ``imagefolder``) and ``webdataset`` (tar
shards streamed from files or ``pipe:`` URLs; ``wds``). The image sources use timm's training transform
(DeiT: RandAugment, random erasing) and batch-level mixup/cutmix (``transforms``).

Every dataset has one interface (``source.py``): ``configure`` for a launch, ``set_epoch`` to position
training, ``loader()``. Training data is sharded across ranks per epoch (every sample once per epoch,
equal step counts); evaluation is sharded without padding, so accuracy counts each sample once.
Augmentation is a function of (run seed, epoch, sample) only (``modasm.seeds``), never of worker count
or process RNG, so a resumed run is bit-identical. Unreadable samples become ``Bad`` records that the
collate drops from the batch; the training loop counts them and stops past ``data.max_bad_fraction``.
Modules here import each other one way: contract, tensor_aug <- batch_aug <- nvjpeg <- dali <- transforms,
samplers <- source <- the sources <- this (tests/test_imports.py).
"""
from __future__ import annotations

from ..config import AugConfig, DataConfig
from .contract import IMAGE_EXTS, Bad, Batch, collate, decode_image, key_hash, sample_key, select_fraction
from .samplers import EvalSampler, TrainSampler
from .transforms import SeededMixup, SeededTransform, image_transforms

__all__ = ["IMAGE_EXTS", "Bad", "Batch", "collate", "decode_image", "key_hash", "sample_key", "select_fraction",
           "EvalSampler", "TrainSampler", "SeededMixup", "SeededTransform", "image_transforms",
           "build_datasets", "train_loader", "eval_loader", "to_device"]


def build_datasets(cfg: DataConfig, img_size: int, seed: int, aug: AugConfig | None = None):
    """(train, val) datasets of ``cfg.source``; ``aug`` configures the image sources' training transform."""
    aug = aug or AugConfig()
    if cfg.source == "fashion-mnist":
        from . import fmnist
        pair = fmnist.build(cfg, img_size, seed, aug.repeated_aug)
    elif cfg.source == "imagefolder":
        from . import imagefolder
        pair = imagefolder.build(cfg, aug, img_size, seed)
    else:
        from . import wds
        pair = wds.build(cfg, aug, img_size, seed)
    for ds in pair:
        ds.start_method = cfg.worker_start or None
    return pair


def _loader(ds, micro: int, rank: int, world: int, workers: int, pin_memory: bool, uint8: bool):
    ds.configure(rank, world, micro, workers)
    ds.pin_memory = pin_memory
    if hasattr(getattr(ds, "transform", None), "uint8"):  # the image sources (speed.uint8_batches)
        ds.transform.uint8 = uint8
    return ds.loader()


def train_loader(ds, micro_batch: int, rank: int, world: int, workers: int, pin_memory: bool = False,
                 uint8: bool = False):
    """The loader of this rank's training micro-batches; position it with ``ds.set_epoch(epoch, start)``.

    ``pin_memory``: pinned batches (non_blocking copies); ``uint8``: the image sources hand on uint8 images,
    normalised and erased by ``to_device`` (speed.uint8_batches).
    """
    return _loader(ds, micro_batch, rank, world, workers, pin_memory, uint8)


def eval_loader(ds, batch: int, rank: int, world: int, workers: int, pin_memory: bool = False,
                uint8: bool = False):
    """This rank's share of the validation set (``batch`` is global), without padding."""
    return _loader(ds, max(1, batch // world), rank, world, workers, pin_memory, uint8)


def to_device(ds, batch: Batch, device, non_blocking: bool = False) -> Batch:
    """A loader's batch as the model takes it, on ``device``: copied, and (image sources, uint8 or GPU
    backends) decoded, augmented, normalised and erased there. Samples that fail to decode become Bad."""
    tf = getattr(ds, "transform", None)
    if hasattr(tf, "to_device"):
        return tf.to_device(batch, device, non_blocking)
    if batch.x is None:
        return batch
    return batch._replace(x=batch.x.to(device, non_blocking=non_blocking), y=batch.y.to(device, non_blocking=non_blocking))
