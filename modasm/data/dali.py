"""data.backend=dali: NVIDIA DALI decodes, crops, resizes and flips a batch of JPEGs (nvJPEG on a GPU).

The loader hands over each sample's bytes and plan (``tensor_aug.Plan``: the crop window, the flip, the
RandAugment ops, the erasing boxes, drawn from the sample's seed as the PIL path draws them). DALI takes the
bytes and the per-sample crop windows and flips through ``external_source`` and does the pixel work of
``decoders.image_slice`` (decode only the window) + ``resize`` (cubic, antialiased) + ``flip``; RandAugment,
normalising and erasing then run as torch tensor ops on the device for the whole batch (``batch_aug``), as for
nvjpeg. DALI's own readers and random operators are not used: they would bypass the samplers (exactly once per
epoch, exact resume) and draw from DALI's RNG instead of the sample's seed.

Without a GPU (``device_id=None``) the same pipeline runs on the CPU: what the tests use. A sample DALI
cannot decode fails its whole batch; that batch is then decoded by the nvjpeg path (``nvjpeg``), which
drops just the bad samples, and the pipeline is rebuilt.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from . import batch_aug, tensor_aug
from .nvjpeg import decode_images, decode_on_device


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise UserError("data.backend=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (CUDA 13) or "
                        "nvidia-dali-cuda120 (CUDA 12); or use data.backend=nvjpeg") from None
    return fn, pipeline_def, types


_INTERP = {"nearest": "INTERP_NN", "bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC"}


class DaliDecoder:
    """Decode + crop/resize + flip of a batch of Encoded samples with a DALI pipeline (one per process)."""

    MAX_BATCH = 1024

    def __init__(self, planner: tensor_aug.Planner, device: torch.device):
        self.planner, self.device = planner, device
        self.pipe = None

    def _build(self):
        fn, pipeline_def, types = _import_dali()
        gpu = self.device.type == "cuda"
        planner = self.planner
        interp = getattr(types, _INTERP.get(planner.resample or "bicubic", "INTERP_CUBIC"))

        @pipeline_def(batch_size=self.MAX_BATCH, num_threads=4, device_id=(self.device.index or 0) if gpu else None,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def pipeline():
            jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            decoder = "mixed" if gpu else "cpu"
            if planner.crop_size is None:  # train: the plan's crop window, resized to the output size
                anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
                shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
                img = fn.decoders.image_slice(jpg, anchor, shape, axes=[0, 1], device=decoder, output_type=types.RGB)
                img = fn.resize(img, size=list(planner.out_size), interp_type=interp, antialias=True)
            else:  # eval: resize the short side, centre crop (sizes and anchors rounded as torchvision does)
                size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
                anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
                img = fn.decoders.image(jpg, device=decoder, output_type=types.RGB)
                img = fn.resize(img, size=size, interp_type=interp, antialias=True)
                img = fn.slice(img, anchor, list(planner.crop_size), axes=[0, 1])
            img = fn.flip(img, horizontal=flip)
            return fn.transpose(img, perm=[2, 0, 1])

        self.pipe = pipeline()
        self.pipe.build()

    def _run(self, datas, plans) -> torch.Tensor:
        if self.pipe is None:
            self._build()
        self.pipe.feed_input("jpg", [d.numpy() for d in datas])
        self.pipe.feed_input("flip", [np.array(int(p.flip), np.int32) for p in plans])
        if self.planner.crop_size is None:
            self.pipe.feed_input("anchor", [np.array(p.crop[:2], np.int32) for p in plans])
            self.pipe.feed_input("shape", [np.array(p.crop[2:], np.int32) for p in plans])
        else:
            boxes = [tensor_aug.eval_box(p.size, self.planner.resize, self.planner.crop_size) for p in plans]
            self.pipe.feed_input("size", [np.array(b[:2], np.float32) for b in boxes])
            self.pipe.feed_input("anchor", [np.array(b[2:], np.int32) for b in boxes])
        (out,) = self.pipe.run()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray
            dense = out.as_tensor()
            x = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(dense, x, cuda_stream=torch.cuda.current_stream(self.device))
            return x
        return torch.from_numpy(np.array(out.as_tensor()))

    def __call__(self, datas: list, plans: list, keys: list, batched: bool = True):
        """(uint8 [B', C, H, W] on the device, indices kept, Bad records), like ``decode_on_device``; RandAugment
        for the whole batch at once (``batch_aug.rand_augment``) or image by image (``batched=False``)."""
        jpeg = [i for i, d in enumerate(datas) if d.ndim == 1]  # others were decoded by PIL in the loader
        if len(datas) > self.MAX_BATCH:
            raise UserError(f"data.backend=dali takes at most {self.MAX_BATCH} images per batch per rank")
        try:
            x = self._run([datas[i] for i in jpeg], [plans[i] for i in jpeg]) if jpeg else None
        except Exception:  # an undecodable sample fails the batch and leaves the pipeline unusable
            self.pipe = None
            return decode_on_device(datas, plans, keys, self.planner, self.device, batched)
        out = [None] * len(datas)  # geometry done: DALI's output, or the others decoded and cropped here
        for j, i in enumerate(jpeg):
            out[i] = x[j]
        rest = [i for i in range(len(datas)) if out[i] is None]
        bad = []
        if rest:
            imgs, ok, bad = decode_images([datas[i] for i in rest], [plans[i] for i in rest], [keys[i] for i in rest],
                                          self.device)
            if ok:
                done = [rest[k] for k in ok]
                pix = (batch_aug.geometry(imgs, [plans[i] for i in done], self.planner) if batched
                       else [tensor_aug.geometry(img, plans[i], self.planner) for img, i in zip(imgs, done)])
                for j, i in enumerate(done):
                    out[i] = pix[j]
        kept = [i for i in range(len(datas)) if out[i] is not None]
        if not kept:
            return None, kept, bad
        x = (x if len(kept) == len(jpeg) else torch.stack([out[i] for i in kept])).to(self.device)
        sel = [plans[i] for i in kept]
        if batched:
            return batch_aug.rand_augment(x, sel), kept, bad
        return torch.stack([tensor_aug.rand_augment(img, p) for img, p in zip(x, sel)]), kept, bad
