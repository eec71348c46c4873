"""Does the nvjpeg backend's decode overwrite live tensors? (modasm/data/nvjpeg.py; pytorch/vision#9606)

    python benchmarks/nvjpeg_check.py [--iters 100] [--busy-ms 60]       (a GPU; on a CPU it only runs the steps)

Each iteration, as the harness of pytorch/vision#9606 does, on the current stream of the device:
  1. fills tensors of the decoded images' byte size with known values, and waits until they are resident;
  2. queues a long chain of matmuls (a training step's kernels), then per tensor an in-place add and a sum;
  3. frees the tensors while those kernels are still queued: the caching allocator may hand their blocks to the
     decoder's outputs at once (later use of a block is supposed to be ordered on the stream that freed it);
  4. decodes a batch of JPEGs: ``ordered`` is modasm's path (``nvjpeg.decode_jpegs``: waits for the queued work
     first), ``unordered`` torchvision's ``decode_jpeg`` called as it is;
  5. waits, then checks every sum (exact: integers) and every decoded image (bit for bit against the same decode
     on an idle device).
A wrong sum: the decoder wrote into a tensor that queued kernels still used; a wrong image: a queued kernel wrote
into the decoder's output. The ordered path must have neither (exit 1 otherwise); the unordered counts say whether
the hazard shows on this GPU at all (if they are 0 too, the ordered path's 0 proves less). The idle decode must also
be within a mean 2 grey levels of the CPU's decode of each image (torchvision's own test of its CUDA decoder,
test/test_image.py::test_decode_jpegs_cuda, holds it to that). Prints one table (decode ms: the call's wall time;
the ordered path's includes its wait for the queued work, the most it can cost); figures are measured, never
written by hand.
"""
import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from modasm.data import nvjpeg  # noqa: E402


def make_jpegs(n: int, seed: int, h: int, w: int) -> list[torch.Tensor]:
    """Baseline JPEGs of smooth gradients plus noise (no data set on the GPU machine), 4:2:0, quality 90."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        base = np.stack([(xx * (i + 1) + yy) % 256, (yy * 2 + i * 17) % 256, (xx + yy * (i % 3 + 1)) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy(a: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        a = torch.tanh(a @ w)  # tanh keeps the values bounded
    return a


def iteration(decode, datas, ref, device, a, w, n_busy, numel):
    live = [torch.full((numel,), k + 1, dtype=torch.int32, device=device) for k in range(len(datas) + 2)]
    sync(device)
    keep = busy(a, w, n_busy)
    for t in live:
        t.add_(1)
    sums = [t.sum() for t in live]
    del live  # freed while the adds and sums above are still queued
    t0 = time.perf_counter()
    imgs = decode(datas, device)
    dt = time.perf_counter() - t0
    sync(device)
    del keep
    bad_sums = sum(int(s.item()) != (k + 2) * numel for k, s in enumerate(sums))
    bad_imgs = sum(not torch.equal(x, r) for x, r in zip(imgs, ref))
    return bad_sums, bad_imgs, dt


def unordered(datas, device):
    from torchvision.io import ImageReadMode, decode_jpeg
    return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"))
    p.add_argument("--busy-ms", type=float, default=60.0, help="queued work before each decode (GPU)")
    args = p.parse_args()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    h, w = args.size
    datas = make_jpegs(args.images, 0, h, w)
    from torchvision.io import ImageReadMode, decode_jpeg
    cpu = decode_jpeg(datas, mode=ImageReadMode.RGB)
    sync(device)
    ref = [x.clone() for x in nvjpeg.decode_jpegs(datas, device)]  # on an idle device
    sync(device)
    diffs = [(r.cpu().float() - c.float()).abs().mean().item() for r, c in zip(ref, cpu)]
    numel = 3 * h * w // 4  # int32 tensors of an image's byte size: their blocks fit the decoder's outputs

    n = 4096 if device.type == "cuda" else 64  # a few ms a matmul on a GPU: the queued work outlasts the launches
    a = torch.randn(n, n, device=device)
    wgt = torch.randn(n, n, device=device) / n ** 0.5
    busy(a, wgt, 2)  # warm-up (cuBLAS handles, kernels)
    sync(device)
    t0 = time.perf_counter()
    busy(a, wgt, 8)
    sync(device)
    per = (time.perf_counter() - t0) / 8
    n_busy = max(1, int(args.busy_ms / 1e3 / per)) if device.type == "cuda" else 1

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU: dry run'}), "
          f"torch {torch.__version__}; {args.images} JPEGs {h}x{w} per decode, {args.iters} iterations, "
          f"{n_busy} matmuls ({n_busy * per * 1e3:.0f} ms) queued before each")
    print(f"idle decode vs CPU decode: mean |diff| per image max {max(diffs):.3f} grey levels (bound 2)")
    print(f"{'decode':<10} {'iterations':>10} {'bad sums':>9} {'bad images':>11} {'decode ms (median)':>19}")
    failed = max(diffs) >= 2.0
    for name, decode in (("ordered", nvjpeg.decode_jpegs), ("unordered", unordered)):
        rows = [iteration(decode, datas, ref, device, a, wgt, n_busy, numel) for _ in range(args.iters)]
        bad_s = sum(r[0] > 0 for r in rows)
        bad_i = sum(r[1] > 0 for r in rows)
        ms = 1e3 * statistics.median(r[2] for r in rows)
        print(f"{name:<10} {args.iters:>10} {bad_s:>9} {bad_i:>11} {ms:>19.2f}")
        if name == "ordered":
            failed |= bool(bad_s or bad_i)
        elif not (bad_s or bad_i):
            print("the unordered decode corrupted nothing either: the hazard did not show here, so the ordered "
                  "path's clean run proves less")
    print("FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
