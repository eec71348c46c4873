"""data.backend=nvjpeg (and the fallback of dali): JPEG decode on the device, torchvision's ``decode_jpeg``.

On a GPU that is nvJPEG, and nvJPEG must not start while work is still queued on the caller's stream:
torchvision's CUDA decoder allocates its outputs from PyTorch's caching allocator on
the caller's stream, which hands out a block as soon as a tensor that kernels queued on that stream still read is
freed (all later use of the block is supposed to be ordered on the same stream), and then decodes on a private
stream that does not wait for the caller's; nvJPEG's hardware engine does not honour stream order either. The
decoder then overwrites live tensors (or its output is overwritten): wrong numbers, NaNs or device-side asserts in
code that never touched it (pytorch/vision#9606, reported with torchvision 0.28 and 0.29; its harness corrupted 134
of 200 iterations on an H100, and none once the caller's stream was drained before the decode;
meta-pytorch/torchcodec#1634). So ``decode_jpegs`` drains the device's current stream (a host wait) before every
decode: ``wait_for_queued_work``. A device-side wait (an event, or a side stream that waits on this one) would not
do: the hardware engine does not honour it. The wait is short in the training loop: each optimizer step ends in a
host sync (``train.step_flags``), so what is still queued when the next batch is decoded is the optimizer's update
(with gradient accumulation, the previous micro-batch's backward). ``benchmarks/gpu_check.sh`` checks it on a GPU
(``benchmarks/nvjpeg_check.py``).
"""
from __future__ import annotations

import numpy as np
import torch

from . import batch_aug, tensor_aug
from .contract import Bad, decode_image


def wait_for_queued_work(device: torch.device | str) -> None:
    """Block until the work queued on ``device``'s current CUDA stream has run (nothing to wait for elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def decode_jpegs(datas: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """JPEG bytes (uint8, 1-D each) -> RGB uint8 CHW images on ``device``, in one ``decode_jpeg`` call (nvJPEG's
    batched decode on a GPU), after the device's queued work (module docstring)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    wait_for_queued_work(device)
    return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def _decode_one(data: torch.Tensor, device: torch.device):
    """One sample: decode_jpeg on the device; failing that, PIL on the CPU (what the pil backend reads)."""
    if data.ndim == 3:  # decoded in the loader (not a plain JPEG)
        return data.to(device)
    try:
        return decode_jpegs([data], device)[0]
    except RuntimeError:
        img = decode_image(data.numpy().tobytes(), "", "")
        if isinstance(img, Bad):
            raise ValueError(img.reason) from None
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).to(device)


def decode_images(datas: list, plans: list, keys: list, device: torch.device):
    """(decoded uint8 CHW images on ``device``, indices of the samples kept, Bad records of the others).

    The JPEGs of a batch are decoded in one call (``decode_jpegs``); if that fails, sample by sample, so that
    only an undecodable sample is dropped."""
    imgs = [None] * len(datas)
    jpeg = [i for i, d in enumerate(datas) if d.ndim == 1]
    if jpeg:
        try:
            for i, img in zip(jpeg, decode_jpegs([datas[i] for i in jpeg], device)):
                imgs[i] = img
        except RuntimeError:
            pass
    bad, ok, out = [], [], []
    for i, d in enumerate(datas):
        try:
            img = imgs[i] if imgs[i] is not None else _decode_one(d, device)
        except (RuntimeError, ValueError) as e:
            bad.append(Bad(keys[i], plans[i].where, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            continue
        if tuple(img.shape[1:]) != tuple(plans[i].size):
            bad.append(Bad(keys[i], plans[i].where, f"decoded {tuple(img.shape[1:])}, header said {plans[i].size}"))
            continue
        ok.append(i)
        out.append(img)
    return out, ok, bad


def decode_on_device(datas: list, plans: list, keys: list, planner, device: torch.device, batched: bool = True):
    """(uint8 [B', C, H, W] on ``device``, indices of the samples kept, Bad records of the others): the batch
    decoded (``decode_images``), then each sample's plan (crop, flip, RandAugment) run on the device, for the
    whole batch at once (``batch_aug.execute``) or image by image (``tensor_aug.execute``: ``batched=False``)."""
    imgs, ok, bad = decode_images(datas, plans, keys, device)
    if not ok:
        return None, ok, bad
    kept = [plans[i] for i in ok]
    if batched:
        return batch_aug.execute(imgs, kept, planner), ok, bad
    return torch.stack([tensor_aug.execute(img, p, planner) for img, p in zip(imgs, kept)]), ok, bad
