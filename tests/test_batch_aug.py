"""Device augmentation per batch (modasm/data/batch_aug.py) against image by image (tensor_aug): the same plans give
the same pixels; the resample within the float32 rounding of the per-sample resize, the rest bit for bit."""
import copy
import sys

import pytest
import torch
from PIL import Image

import photos
from conftest import ROOT
from modasm.config import AugConfig, DataConfig, load_recipe
from modasm.data import batch_aug, build_datasets, collate, image_transforms, tensor_aug, to_device, train_loader
from modasm.data.nvjpeg import decode_jpegs

DEIT = load_recipe(ROOT / "recipes" / "vit-b16.yaml").aug  # RandAugment m9-mstd0.5-inc1, erasing 0.25 (pixel)
CPU = torch.device("cpu")
U = 2.0 ** -24  # float32 unit roundoff
HAS_DALI = __import__("platform").machine() == "x86_64"
DALI = pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="DALI is installed on x86_64 only"))


@pytest.fixture(scope="module")
def jpegs():
    return photos.jpegs(24, seed=11, min_side=50, max_side=427)


def _decoded(tf, blobs, seed=100):
    """(images, plans): decoded on the CPU (torchvision's decoder returns HWC memory; every third image made CHW
    contiguous, the layout of the GPU decoder) and each sample's plan."""
    encs = [tf.from_bytes(b, "f", f"k{i}", seed + i) for i, b in enumerate(blobs)]
    imgs = decode_jpegs([e.data for e in encs], CPU)
    return [im.contiguous() if i % 3 == 0 else im for i, im in enumerate(imgs)], [e.plan for e in encs]


def _float32_bound(imgs, plans, planner) -> float:
    """How far two float32 evaluations of the same resize can be apart: each output is two passes of sums of at most
    K products of weights (row sums of |w| <= S) with values <= 255 (the second pass's: <= S * 255). One evaluation
    of a pass is within K u S * (its values' bound) of the exact sum, and its weights (normalised by their sum)
    within K u of theirs, relatively: two evaluations of a pass, 4 K u S * bound apart; pass 1's difference reaches
    the output times S. In all: 8 K u S^2 255, with K and S those of this batch's weights."""
    k, s = 0, 1.0
    for img, p in zip(imgs, plans):
        (_, _, h, w), (rh, rw), (oy, ox) = batch_aug._window(p, planner)
        out = planner.out_size if p.crop is not None else planner.crop_size
        for src, dst, start, o in ((h, rh, oy, out[0]), (w, rw, ox, out[1])):
            t = lambda v: torch.tensor([float(v)])  # noqa: E731
            taps = batch_aug._taps(src, dst, p.resample)
            cubic = torch.tensor([p.resample not in ("nearest", "bilinear")])
            _, wt = batch_aug._weights(t(src), t(dst), t(start), o, taps, cubic,
                                       torch.tensor([p.resample == "nearest"]), torch.tensor([False]))
            k, s = max(k, int((wt != 0).sum(-1).max())), max(s, float(wt.abs().sum(-1).max()))
    return 8 * k * U * s * s * 255


def _per_sample_float(imgs, plans, planner):
    """tensor_aug.geometry as torchvision runs it on a GPU: the float32 resize, before its cast to uint8."""
    return torch.stack([tensor_aug.geometry(img.float(), p, planner) for img, p in zip(imgs, plans)])


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "random", "nearest"])
@pytest.mark.parametrize("split", ["train", "eval", "eval-padded"])
def test_batched_resize_is_the_per_sample_resize(jpegs, interpolation, split):
    """Crop + resize + flip (train) and resize + centre crop (eval; 'eval-padded': the crop is larger than the
    resized short side: torchvision pads), images of 50-427 px in both memory layouts, in one chunk and in several
    (a small canvas budget: samples reordered by size and back). Against the per-sample resize as it runs on a GPU
    (torchvision's float32 kernel, then clamp and round): before rounding within the float32 bound of two summation
    orders (``_float32_bound``); after it, equal except where that value lies within the bound of a rounding
    boundary (k + 1/2), and there by 1. Nearest is exact."""
    tf, ev = image_transforms(AugConfig(**{**DEIT.__dict__, "interpolation": interpolation}), 96, "nvjpeg")
    t = tf if split == "train" else ev
    imgs, plans = _decoded(t, jpegs)
    planner = copy.copy(t.planner.transform)
    if split == "eval-padded":  # a Resize below the crop (crop_pct > 1, which recipes refuse): the tensor path pads
        planner.resize = 80
    if split == "train":  # crop windows leaving the image (torchvision's crop pads with 0): not drawn by RRC
        plans[1].crop, plans[2].crop = (-7, -5, 60, 90), (imgs[2].shape[1] - 30, imgs[2].shape[2] - 20, 64, 48)
    assert any(p.flip for p in plans) and not all(p.flip for p in plans) or split != "train"
    ref = _per_sample_float(imgs, plans, planner)
    want = ref.clamp(0, 255).round().to(torch.uint8)
    bound = _float32_bound(imgs, plans, planner)
    assert bound < 0.01, bound
    for budget in (batch_aug.CANVAS_ELEMENTS, 3 * 150 * 150):  # one chunk; many
        got = batch_aug.resize_batch(imgs, plans, planner, budget)
        assert got.shape == ref.shape == (len(imgs), 3, 96, 96)
        assert (got - ref).abs().max() <= bound, ((got - ref).abs().max(), bound)
        out = batch_aug.geometry(imgs, plans, planner, budget)
        diff = (out.int() - want.int()).abs()
        if interpolation == "nearest":
            assert torch.equal(out, want)
            continue
        assert diff.max() <= 1
        near_half = ((ref - ref.floor()) - 0.5).abs() <= bound
        assert not (diff.bool() & ~near_half).any()
        assert diff.float().mean() < 1e-3  # what ~bound-wide windows around k + 1/2 can hold


def _random_plans(n, names, rng, h=96, w=96):
    """Plans with 0-2 ops each (``names`` in turn) with timm's magnitudes (random per sample, as mstd draws)."""
    from timm.data.auto_augment import _HPARAMS_DEFAULT, LEVEL_TO_ARG
    hp = dict(_HPARAMS_DEFAULT, img_mean=(124, 116, 104))
    plans = []
    for i in range(n):
        plan = tensor_aug.Plan(seed=i, size=(h, w))
        for j in range(i % 3):
            name = names[(i + 7 * j) % len(names)]
            if name == "ColorJitter":
                plan.ops.append((name, (rng.permutation(4).tolist(), *rng.uniform(0.6, 1.4, 3), rng.uniform(-.1, .1)),
                                 {}))
                continue
            fn = LEVEL_TO_ARG[name]
            args = fn(float(rng.uniform(0, 10)), hp) if fn else ()
            kw = ({"resample": [Image.BILINEAR, Image.BICUBIC][int(rng.integers(2))], "fillcolor": hp["img_mean"]}
                  if name.startswith(("Rotate", "Shear", "Translate")) else {})
            plan.ops.append((name, args, kw))
        plans.append(plan)
    return plans


def test_batched_rand_augment_is_the_per_sample_rand_augment(jpegs):
    """Every RandAugment op (timm's increasing set and the plain ones) and colour jitter (hue included), 0-2 ops per
    sample with per-sample magnitudes, run op by op on the sub-batch that drew it: bit for bit the per-sample ops
    (the same float32 operations on each pixel)."""
    import numpy as np
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS
    names = list(_RAND_INCREASING_TRANSFORMS) + ["Posterize", "Solarize", "Color", "Contrast", "Brightness",
                                                 "Sharpness", "TranslateX", "TranslateY", "ColorJitter"]
    imgs = decode_jpegs([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs], CPU)
    x = torch.stack([im[:, :50, :50] for im in imgs] * 4)  # 96 samples: every op drawn several times
    plans = _random_plans(len(x), names, np.random.default_rng(0), 50, 50)
    drawn = {n for p in plans for n, _, _ in p.ops}
    assert drawn == set(names) and sum(not p.ops for p in plans) > 5
    before = x.clone()
    got = batch_aug.rand_augment(x, plans)
    assert torch.equal(x, before)  # the input is left alone
    want = torch.stack([tensor_aug.rand_augment(im, p) for im, p in zip(x, plans)])
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert not torch.equal(got, x)


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_batched_erasing_is_the_per_sample_erasing(mode):
    """Masks for every sample's k-th box at once, the noise drawn from each sample's generator in the per-sample
    order: the same tensor bit for bit, with 0-3 overlapping boxes per sample (later boxes overwrite earlier ones)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 40, 48), dtype=torch.uint8, generator=g)
    plans = []
    for i in range(len(x)):
        plan = tensor_aug.Plan(seed=1000 + 7919 * i, size=(40, 48))
        for _ in range(i % 4):
            h, w = (int(v) for v in torch.randint(1, 30, (2,), generator=g))
            plan.erase.append((int(torch.randint(0, 40 - h + 1, (1,), generator=g)),
                               int(torch.randint(0, 48 - w + 1, (1,), generator=g)), h, w))
        plans.append(plan)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = batch_aug.finish(x, plans, mean, std, mode)
    assert torch.equal(got, tensor_aug.finish(x, plans, mean, std, mode))
    assert torch.equal(batch_aug.finish(x, None, mean, std, mode), tensor_aug.finish(x, [], mean, std, mode))


@pytest.mark.parametrize("backend", ["nvjpeg", DALI])
def test_to_device_batched_equals_per_sample(tmp_path, backend):
    """Through the real loader and to_device (DeiT aug, per-pixel erasing; nearest resize, which is exact in both
    paths, so that the pixels can compare bit for bit; bicubic is the resize test's): batched and image by image give
    the same batches; a PNG in the shards takes the loader's PIL decode (DALI: the nvjpeg path's geometry). On a CPU
    to_device runs image by image unless told (batched=None: per batch on an accelerator only)."""
    from modasm.data.writer import make_shards
    keys = photos.imagefolder(tmp_path / "tree", {"train": [5, 6, 5], "val": [1, 1, 1]}, min_side=80, max_side=300)
    png = next((tmp_path / "tree" / "train" / "class1").iterdir())
    Image.open(png).save(png.with_suffix(".png"))
    png.unlink()
    make_shards(tmp_path / "tree", tmp_path / "wds", shard_size=8, stream=__import__("io").StringIO())
    aug = AugConfig(**{**DEIT.__dict__, "interpolation": "nearest", "re_prob": 0.5, "repeated_aug": 1})
    ds, _ = build_datasets(DataConfig(source="webdataset", root=str(tmp_path / "wds"), stream_splits=2,
                                      shuffle_buffer=8, backend=backend), 64, 0, aug)
    assert ds.transform.batched is None and not ds.transform._batched(CPU) and ds.transform._batched("cuda:0")
    runs = {}
    for batched in (False, True):
        ds.transform.batched = batched
        loader = train_loader(ds, 8, 0, 1, 0)
        ds.set_epoch(1)
        runs[batched] = [to_device(ds, b, CPU) for b in loader]
    seen = [k for b in runs[True] for k in b.keys]
    assert sorted(seen) == sorted(keys["train"]) and len(runs[True]) == 2
    for a, b in zip(runs[False], runs[True]):
        assert a.keys == b.keys and torch.equal(a.y, b.y) and a.x.shape == (len(a.keys), 3, 64, 64)
        assert torch.equal(a.x, b.x)
    assert sum(bool(p.erase) for b in runs[True] for p in b.plans) >= 2
    assert sum(bool(p.ops) for b in runs[True] for p in b.plans) >= 5


def test_batched_ops_do_not_grow_with_the_batch(jpegs):
    """The kernels the batched path launches (torch.profiler's aten ops that compute: no views, no allocations) do
    not depend on how many images share the plans' op kinds: the same batch twice over launches as many, plus one
    noise draw per erased box; image by image, every image adds its own. (count_ops counts after a warm-up call.) (The
    per-image figures: bench_aug.py.)"""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_aug import count_ops
    tf, _ = image_transforms(AugConfig(**{**DEIT.__dict__, "re_prob": 0.5}), 64, "nvjpeg")
    imgs, plans = _decoded(tf, jpegs[:12])
    planner = tf.planner.transform

    def run(imgs, plans, fn):
        return count_ops(lambda: fn(imgs, plans), CPU)["compute"]

    def batched(imgs, plans):
        return batch_aug.finish(batch_aug.execute(imgs, plans, planner), plans, tf.mean, tf.std, tf.erase_mode)

    def per_sample(imgs, plans):
        x = torch.stack([tensor_aug.execute(img, p, planner) for img, p in zip(imgs, plans)])
        return tensor_aug.finish(x, plans, tf.mean, tf.std, tf.erase_mode)
    boxes = sum(len(p.erase) for p in plans)
    assert boxes >= 2 and tf.erase_mode == "pixel"
    one, two = run(imgs, plans, batched), run(imgs * 2, plans * 2, batched)
    assert two == one + boxes, (one, two, boxes)
    assert run(imgs * 2, plans * 2, per_sample) - run(imgs, plans, per_sample) > 5 * len(imgs)


@pytest.mark.parametrize("api", ["global", "per-backend"])
def test_matmul_precision_is_full_float32_and_restored(jpegs, api):
    """The resize's products run at full float32 precision whatever the run allows for training (a reduced precision
    would move outputs by grey levels), set by torch's global setting or its per-backend one (after which the global
    getter raises: the resize must not use it), and the settings are put back."""
    tf, _ = image_transforms(DEIT, 64, "nvjpeg")
    imgs, plans = _decoded(tf, jpegs[:6])
    planner = tf.planner.transform
    ref = batch_aug.resize_batch(imgs, plans, planner)
    b = torch.backends
    saved = torch.get_float32_matmul_precision(), b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision
    try:
        if api == "global":
            torch.set_float32_matmul_precision("medium")
        else:
            b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = "tf32", "bf16"
        before = b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision
        assert before == ("tf32", "bf16")
        got = batch_aug.resize_batch(imgs, plans, planner)
        assert (b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision) == before
    finally:
        torch.set_float32_matmul_precision(saved[0])
        b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = saved[1:]
    assert torch.get_float32_matmul_precision() == saved[0]
    assert torch.equal(got, ref)


def test_dali_batched_rand_augment_equals_per_sample(jpegs):
    """DALI (CPU mode) does crop + resize + flip; RandAugment on its output per batch or image by image: equal."""
    if not HAS_DALI:
        pytest.skip("DALI is installed on x86_64 only")
    from modasm.data.dali import DaliDecoder
    tf, _ = image_transforms(DEIT, 64, "dali")
    samples = [(tf.from_bytes(d, "f", f"k{i}", i), i % 4, f"k{i}") for i, d in enumerate(jpegs[:10])]
    batch = collate(samples)
    dali = DaliDecoder(tf.planner.transform, CPU)
    a, ok_a, _ = dali(batch.x, batch.plans, batch.keys, batched=False)
    b, ok_b, _ = dali(batch.x, batch.plans, batch.keys, batched=True)
    assert ok_a == ok_b == list(range(10)) and torch.equal(a, b) and sum(bool(p.ops) for p in batch.plans) >= 5


def test_the_batched_path_does_not_sync(jpegs):
    """tests/syncs.py's counter around the whole batched path (resize, every RandAugment op, each erasing mode): no
    call that would make the host wait for a GPU once the constants are on the device; its numbers reach the device
    through ``upload`` (pinned, non-blocking on a GPU), which the counter cannot see on a CPU."""
    import numpy as np
    from syncs import SyncCounter
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS
    tf, ev = image_transforms(AugConfig(**{**DEIT.__dict__, "re_prob": 0.5}), 48, "nvjpeg")
    imgs, plans = _decoded(tf, jpegs[:12])
    eimgs, eplans = _decoded(ev, jpegs[:4])
    ra = _random_plans(len(imgs), list(_RAND_INCREASING_TRANSFORMS) + ["ColorJitter"], np.random.default_rng(1),
                       48, 48)
    for p, r in zip(plans, ra):
        p.ops = r.ops

    def run():
        for mode in ("const", "pixel", "rand"):
            batch_aug.finish(batch_aug.execute(imgs, plans, tf.planner.transform), plans, tf.mean, tf.std, mode)
        batch_aug.geometry(eimgs, eplans, ev.planner.transform)
    run()
    with SyncCounter() as c:
        run()
    assert c.events == [], c.summary()


def test_a_batch_past_the_int32_index_is_resized_in_halves(jpegs, monkeypatch):
    """The canvas gather indexes a batch's decoded values with int32: a batch with more is resized in halves (here
    with the limit lowered to a few images' worth), the same values within the float32 bound (other chunks: other
    summation blocking); one image past it is refused."""
    tf, _ = image_transforms(DEIT, 64, "nvjpeg")
    imgs, plans = _decoded(tf, jpegs[:9])
    planner = tf.planner.transform
    whole = batch_aug.resize_batch(imgs, plans, planner)
    monkeypatch.setattr(batch_aug, "_INDEXABLE", 3 * max(img.numel() for img in imgs))
    halves = batch_aug.resize_batch(imgs, plans, planner)
    assert halves.shape == whole.shape and (halves - whole).abs().max() <= _float32_bound(imgs, plans, planner)
    monkeypatch.setattr(batch_aug, "_INDEXABLE", imgs[0].numel())
    with pytest.raises(batch_aug.UserError, match="more than the batched resize indexes"):
        batch_aug.resize_batch(imgs[:1], plans[:1], planner)
