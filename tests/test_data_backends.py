"""Decode and augment on the device: the uint8 path (speed.uint8_batches) and the nvjpeg / dali backends
(data.backend), run on the CPU here (torchvision's CPU decode_jpeg, DALI's CPU mode), against the PIL path."""
import io
import json
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TVF
from PIL import Image

import photos
from conftest import ROOT, launch_env
from modasm import phases
from modasm.config import AugConfig, DataConfig, load_recipe
from modasm.data import build_datasets, collate, image_transforms, tensor_aug, to_device, train_loader
from modasm.data.transforms import Encoded
from modasm.metrics import read_jsonl

TINY_IMAGES = ROOT / "tests" / "recipes" / "tiny-images.yaml"
DEIT = load_recipe(ROOT / "recipes" / "vit-b16.yaml").aug  # RandAugment m9-mstd0.5-inc1, erasing 0.25 (pixel)
CPU = torch.device("cpu")
# DALI comes with the test extra on x86_64 (pyproject.toml); elsewhere its tests are skipped, never on x86_64
HAS_DALI = platform.machine() == "x86_64"
DALI = pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="DALI is installed on x86_64 only"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ImageFolder tree of real JPEG crops and its shards (as tests/test_data_imagenet.py)."""
    from modasm.data.writer import make_shards
    base = tmp_path_factory.mktemp("data")
    keys = photos.imagefolder(base / "tree", {"train": [6, 10, 14, 18], "val": [3, 4, 2, 5]})
    make_shards(base / "tree", base / "wds", shard_size=10, stream=io.StringIO())
    return base / "tree", base / "wds", keys


@pytest.fixture(scope="module")
def jpegs():
    return photos.jpegs(24, seed=7, min_side=240, max_side=427)


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _outside(plan, shape) -> torch.Tensor:
    keep = torch.ones(shape, dtype=torch.bool)
    for top, left, h, w in plan.erase:
        keep[:, top:top + h, left:left + w] = False
    return keep


# ---------------------------------------------------------------- plans: the PIL path's parameters


def _replay_with_pil(img: Image.Image, plan, tf) -> torch.Tensor:
    """A plan applied with PIL and timm's own op functions: the PIL path's output if the plan holds its draws."""
    from timm.data.auto_augment import NAME_TO_OP
    from timm.data.transforms import str_to_pil_interp
    planner = tf.planner.transform
    img = TVF.resized_crop(img, *plan.crop, list(planner.out_size), interpolation=TVF.InterpolationMode(plan.resample))
    if plan.flip:
        img = TVF.hflip(img)
    for name, args, kw in plan.ops:
        if name == "ColorJitter":
            order, *factors = args
            fns = (TVF.adjust_brightness, TVF.adjust_contrast, TVF.adjust_saturation, TVF.adjust_hue)
            for i in order:
                img = fns[i](img, factors[i]) if factors[i] is not None else img
            continue
        kw = {k: (str_to_pil_interp(v) if k == "resample" and isinstance(v, str) else v) for k, v in kw.items()}
        img = (Image.new(img.mode, img.size) if name.startswith("Posterize") and args[0] < 1
               else NAME_TO_OP[name](img, *args, **kw))
    x = TVF.normalize(TVF.to_tensor(img), tf.mean, tf.std)
    for top, left, h, w in plan.erase:
        x[:, top:top + h, left:left + w] = 0
    return x


@pytest.mark.parametrize("interpolation,jitter", [("bicubic", False), ("random", False), ("bicubic", True)])
def test_plans_hold_the_pil_paths_draws(jpegs, interpolation, jitter):
    """Each sample's plan (drawn from its seed on a stand-in image) replayed with PIL gives the PIL path's
    image bit for bit: crop, interpolation, flip, colour jitter or RandAugment ops and magnitudes, erasing boxes."""
    aug = AugConfig(**{**DEIT.__dict__, "re_prob": 0.5, "re_mode": "const", "interpolation": interpolation,
                       **({"rand_augment": "", "color_jitter": 0.4} if jitter else {})})
    plain, _ = image_transforms(aug, 96, "pil")
    tf, _ = image_transforms(aug, 96, "nvjpeg")
    ops, flips, erased = set(), 0, 0
    for i, data in enumerate(jpegs):
        seed = 1000 + i
        enc = tf.from_bytes(data, "f.jpg", f"k{i}", seed)
        assert isinstance(enc, Encoded) and enc.data.ndim == 1 and enc.plan.seed == seed
        assert torch.equal(_replay_with_pil(_pil(data), enc.plan, tf), plain(_pil(data), seed)), i
        ops |= {name for name, _, _ in enc.plan.ops}
        flips += enc.plan.flip
        erased += bool(enc.plan.erase)
    assert len(ops) >= (1 if jitter else 8) and 0 < flips < len(jpegs) and 0 < erased < len(jpegs)  # draws vary
    rng = torch.get_rng_state()
    tf.from_bytes(jpegs[0], "f.jpg", "k", 5)
    assert torch.equal(rng, torch.get_rng_state())  # the training process's RNG is left alone


# ---------------------------------------------------------------- tensor ops vs PIL ops


@pytest.mark.parametrize("name,args,kw,tol", [
    ("AutoContrast", (), {}, 0.5), ("Equalize", (), {}, 1.0), ("Invert", (), {}, 0.0),
    ("Rotate", (17.0,), {"resample": "bicubic", "fillcolor": (124, 116, 104)}, 2.0),
    ("PosterizeIncreasing", (3,), {}, 0.0), ("PosterizeIncreasing", (0,), {}, 0.0),
    ("SolarizeIncreasing", (100,), {}, 0.0), ("SolarizeAdd", (60,), {}, 0.0),
    ("ColorIncreasing", (1.6,), {}, 1.0), ("ContrastIncreasing", (0.5,), {}, 1.0),
    ("BrightnessIncreasing", (1.4,), {}, 1.0), ("SharpnessIncreasing", (1.8,), {}, 1.0),
    ("ShearX", (0.2,), {"resample": "bicubic", "fillcolor": (124, 116, 104)}, 2.0),
    ("ShearY", (-0.15,), {"resample": "bilinear", "fillcolor": (0, 0, 0)}, 2.0),
    ("TranslateXRel", (0.3,), {"resample": "bicubic", "fillcolor": (124, 116, 104)}, 1.0),
    ("TranslateYRel", (-0.2,), {"resample": "bicubic", "fillcolor": (124, 116, 104)}, 1.0),
])
def test_tensor_ops_match_timms_pil_ops(jpegs, name, args, kw, tol):
    """Every RandAugment op of the DeiT recipe as a tensor function of the same arguments: mean absolute
    difference to timm's PIL op within ``tol`` grey levels (resampling kernels differ; lookups are exact)."""
    from timm.data.auto_augment import NAME_TO_OP
    from timm.data.transforms import str_to_pil_interp
    img = _pil(jpegs[3]).resize((96, 80))
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    pil_kw = {k: (str_to_pil_interp(v) if k == "resample" else v) for k, v in kw.items()}
    ref = (Image.new("RGB", img.size) if name.startswith("Posterize") and args[0] < 1
           else NAME_TO_OP[name](img, *args, **pil_kw))
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
    got = tensor_aug._op(t, name, args, kw)
    assert got.dtype == torch.uint8 and got.shape == t.shape
    diff = (got.float() - ref).abs().mean().item()
    assert diff <= tol, diff
    assert not torch.equal(got, t) or name == "PosterizeIncreasing" and args[0] >= 8


# ---------------------------------------------------------------- uint8 batches: the plain path's inputs


@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
@pytest.mark.parametrize("re_mode", ["const", "pixel"])
def test_uint8_batches_give_the_plain_inputs(data, source, re_mode):
    """Through the real loaders: uint8 out of the loader, normalised and erased by to_device, against the plain
    float path. 'const' erasing: identical tensors. 'pixel': identical outside the erased boxes (the same boxes:
    the sample's seed draws them in the loader); inside, noise from a generator seeded by the sample (the plain
    path draws it from the worker's CPU generator), deterministic and N(0, 1)."""
    tree, wds_dir, _ = data
    aug = AugConfig(**{**DEIT.__dict__, "re_prob": 0.6, "re_mode": re_mode, "repeated_aug": 1})
    root = tree if source == "imagefolder" else wds_dir
    ds, _ = build_datasets(DataConfig(source=source, root=str(root), stream_splits=2, shuffle_buffer=8), 32, 0, aug)
    runs = []
    for uint8 in (False, True, True):
        loader = train_loader(ds, 8, 0, 1, 0, uint8=uint8)
        ds.set_epoch(1)
        raw = list(loader)
        assert all((b.x.dtype == torch.uint8) == uint8 for b in raw)
        runs.append([to_device(ds, b, CPU) for b in raw])
    plain, fast, again = runs
    erased = 0
    for p, f, a in zip(plain, fast, again):
        assert p.keys == f.keys and torch.equal(p.y, f.y) and f.x.dtype == torch.float32
        assert torch.equal(f.x, a.x)  # deterministic
        if re_mode == "const":
            assert torch.equal(p.x, f.x)
            continue
        for i, plan in enumerate(f.plans):
            keep = _outside(plan, f.x[i].shape)
            assert torch.equal(p.x[i][keep], f.x[i][keep])
            if plan.erase:
                erased += 1
                assert not torch.equal(p.x[i][~keep], f.x[i][~keep])
    if re_mode == "pixel":
        assert erased > 5
        noise = torch.cat([f.x[i][~_outside(plan, f.x[i].shape)] for f in fast for i, plan in enumerate(f.plans)])
        assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1


# ---------------------------------------------------------------- nvjpeg / dali against PIL


@pytest.mark.parametrize("backend", ["nvjpeg", DALI])
@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
@pytest.mark.parametrize("batched", [None, True])
def test_gpu_backends_on_cpu_match_the_pil_path(data, backend, source, batched):
    """The same batches (keys, labels) as the PIL path, images within a few grey levels: the parameters are the
    same, the decoders (libjpeg-turbo in all three here) and resampling kernels differ slightly. Erasing 'const'
    so that all pixels compare; RandAugment's affine ops (grid_sample vs PIL) differ most. The device work as
    to_device runs it on a CPU (image by image) and on a GPU (per batch: batched=True)."""
    tree, wds_dir, _ = data
    aug = AugConfig(**{**DEIT.__dict__, "re_mode": "const", "repeated_aug": 1})
    root = tree if source == "imagefolder" else wds_dir
    cfg = dict(source=source, root=str(root), stream_splits=2, shuffle_buffer=8)
    out = {}
    for be in ("pil", backend):
        train, val = build_datasets(DataConfig(**cfg, backend=be), 64, 0, aug)
        train.transform.batched = val.transform.batched = batched
        loader = train_loader(train, 8, 0, 1, 0)
        train.set_epoch(0)
        out[be] = [to_device(train, b, CPU) for b in loader]
        out[be, "val"] = [to_device(val, b, CPU) for b in train_loader(val, 7, 0, 1, 0)]
    for split in ("train", "val"):
        ref, got = (out["pil"], out[backend]) if split == "train" else (out["pil", "val"], out[backend, "val"])
        assert [b.keys for b in ref] == [b.keys for b in got] and all(torch.equal(a.y, b.y) for a, b in zip(ref, got))
        diffs = torch.cat([((a.x - b.x).abs() * 0.226 * 255).flatten(1).mean(1) for a, b in zip(ref, got)])
        assert diffs.mean() < (2.0 if split == "train" else 0.2) and diffs.max() < 12, diffs  # grey levels
        assert all(b.x.shape[1:] == (3, 64, 64) and b.x.dtype == torch.float32 for b in got)


@pytest.mark.parametrize("backend,uint8", [("nvjpeg", False), ("pil", True)])
def test_device_path_batches_do_not_depend_on_worker_count(data, backend, uint8):
    """The plans (and the erase noise) are functions of each sample's seed: 0, 1 or 2 loader workers give the
    same finished batches, bit for bit, and a resume with another worker count continues them."""
    _, wds_dir, _ = data
    cfg = DataConfig(source="webdataset", root=str(wds_dir), stream_splits=2, shuffle_buffer=8, backend=backend)
    ds, _ = build_datasets(cfg, 32, 0, AugConfig(**{**DEIT.__dict__, "re_prob": 0.5, "repeated_aug": 1}))

    def run(workers, start=0):
        loader = train_loader(ds, 4, 0, 1, workers, uint8=uint8)
        ds.set_epoch(2, start)
        return [(b.keys, to_device(ds, b, CPU).x) for b in loader]
    ref = run(0)
    assert len(ref) == 12
    for workers, start in ((1, 0), (2, 0), (2, 5 * 4)):
        got = run(workers, start)
        assert [k for k, _ in got] == [k for k, _ in ref[start // 4:]], workers
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, ref[start // 4:])), workers


@pytest.mark.skipif(not HAS_DALI, reason="DALI is installed on x86_64 only")
def test_dali_runs_its_pipeline_and_agrees_with_nvjpeg(jpegs):
    """DALI (CPU mode) decodes, crops, resizes and flips itself: close to the nvjpeg path's pixels, not equal."""
    from modasm.data.dali import DaliDecoder
    aug = AugConfig(**{**DEIT.__dict__, "rand_augment": "", "color_jitter": 0.0, "re_mode": "const"})
    tf, _ = image_transforms(aug, 64, "dali")
    samples = [(tf.from_bytes(d, "f", f"k{i}", i), i % 4, f"k{i}") for i, d in enumerate(jpegs[:8])]
    batch = collate(samples)
    x, ok, bad = DaliDecoder(tf.planner.transform, CPU)(batch.x, batch.plans, batch.keys)
    ref, ok2, _ = tensor_aug_decode(batch, tf)
    assert ok == ok2 == list(range(8)) and not bad and x.dtype == torch.uint8 and x.shape == (8, 3, 64, 64)
    diff = (x.float() - ref.float()).abs().mean().item()
    assert 0 < diff < 3.0, diff


def tensor_aug_decode(batch, tf):
    from modasm.data.nvjpeg import decode_on_device
    return decode_on_device(batch.x, batch.plans, batch.keys, tf.planner.transform, CPU)


# ---------------------------------------------------------------- the data contract


@pytest.mark.parametrize("backend", ["nvjpeg", DALI])
def test_undecodable_samples_become_bad_records(jpegs, backend):
    """The loader's header read finds bytes that are no image and JPEGs cut short (no end-of-image marker: PIL
    decodes those there and refuses them, as in the pil backend); a PNG is decoded by the loader and passes;
    a JPEG that fails to decode on the device falls back to PIL, and becomes Bad only if PIL fails too. The
    rest of the batch survives."""
    png = io.BytesIO()
    _pil(jpegs[2]).save(png, "PNG")
    cut = jpegs[1][:len(jpegs[1]) // 2]
    blobs = [jpegs[0], cut, b"not an image at all", png.getvalue(), jpegs[4]]
    tf, _ = image_transforms(AugConfig(**{**DEIT.__dict__, "re_prob": 0.0}), 32, backend)
    samples = []
    for i, d in enumerate(blobs):
        s = tf.from_bytes(d, f"shard.tar#{i}", f"k{i}", i)
        samples.append(s if not isinstance(s, Encoded) else (s, i, f"k{i}"))
    batch = collate(samples)
    assert batch.keys == ["k0", "k3", "k4"] and [b.key for b in batch.bad] == ["k1", "k2"]
    assert "truncated" in batch.bad[0].reason and batch.bad[0].where == "shard.tar#1"
    assert batch.x[1].ndim == 3  # the PNG: decoded pixels from the loader
    done = tf.to_device(batch, CPU)
    assert done.keys == ["k0", "k3", "k4"] and done.y.tolist() == [0, 3, 4] and done.x.shape == (3, 3, 32, 32)
    # a cut JPEG that reaches the device decoder (torchvision raises, PIL refuses it): dropped as Bad
    from modasm.data.nvjpeg import decode_on_device
    plan = tf.from_bytes(jpegs[1], "shard.tar#1", "k1", 1).plan
    x, ok, bad = decode_on_device([batch.x[0], torch.frombuffer(bytearray(cut), dtype=torch.uint8)],
                                  [batch.plans[0], plan], ["k0", "k1"], tf.planner.transform, CPU)
    assert ok == [0] and x.shape == (1, 3, 32, 32) and [b.key for b in bad] == ["k1"]
    assert "truncated" in bad[0].reason and bad[0].where == "shard.tar#1"


class _RecordingStream:
    """What torch.cuda.current_stream(device) returns on a GPU, none here: it records the device and each wait."""
    calls: list = []

    def __init__(self, device):
        self.device = device

    def synchronize(self):
        self.calls.append(("synchronize", self.device))


def test_nvjpeg_drains_the_devices_stream_before_every_decode(jpegs, monkeypatch):
    """On a GPU, decode_jpeg must not start while work is still queued on the caller's stream (it can overwrite
    live tensors: modasm/data/nvjpeg.py). No GPU here: the decode path runs with a CUDA device against streams that
    record their calls, up to torchvision's decode_jpeg, which then fails for want of a GPU. A wait recorded before
    that failure came before the decode: one before the batch's decode and one before each sample's retry."""
    from modasm.data import nvjpeg
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_RecordingStream, "calls", [])
    monkeypatch.setattr(torch.cuda, "current_stream", _RecordingStream)
    data = torch.frombuffer(bytearray(jpegs[0]), dtype=torch.uint8)
    with pytest.raises(RuntimeError):  # torchvision's decode_jpeg on a CUDA device, on a machine without one
        nvjpeg.decode_jpegs([data], cuda)
    assert _RecordingStream.calls == [("synchronize", cuda)]
    _RecordingStream.calls.clear()
    tf, _ = image_transforms(AugConfig(**{**DEIT.__dict__, "re_prob": 0.0}), 32, "nvjpeg")
    batch = collate([(tf.from_bytes(d, "f", f"k{i}", i), i, f"k{i}") for i, d in enumerate(jpegs[:3])])
    x, ok, bad = nvjpeg.decode_on_device(batch.x, batch.plans, batch.keys, tf.planner.transform, cuda)
    assert x is None and ok == [] and [b.key for b in bad] == ["k0", "k1", "k2"]  # nothing reaches a CUDA device here
    assert _RecordingStream.calls == [("synchronize", cuda)] * 4
    for cpu in (CPU, "cpu"):  # on the CPU there is nothing to wait for (devices come as names too)
        assert nvjpeg.decode_jpegs([data], cpu)[0].shape[1:] == _pil(jpegs[0]).size[::-1]
    assert _RecordingStream.calls == [("synchronize", cuda)] * 4
    with pytest.raises(RuntimeError):
        nvjpeg.decode_jpegs([data], "cuda:0")
    assert _RecordingStream.calls == [("synchronize", cuda)] * 5


@pytest.mark.slow
@pytest.mark.multiproc
def test_gpu_backends_two_ranks_two_workers_see_every_sample_once(data, tmp_path):
    """2 ranks x 2 loader workers, nvjpeg and dali: the PIL path's dealing (the same key sequences), every
    sample once per epoch, reshuffled, resume bit-exact (decoded on the CPU), sharded evaluation counts all."""
    tree, wds_dir, keys = data
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "data_probe.py"), str(tree), str(wds_dir), str(tmp_path), "2",
           "pil,nvjpeg,dali" if HAS_DALI else "pil,nvjpeg"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=launch_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for source in ("imagefolder", "webdataset"):
        for backend in ("nvjpeg", "dali") if HAS_DALI else ("nvjpeg",):
            name = f"{source}-{backend}"
            for r in (0, 1):
                rec, ref = ranks[r][name], ranks[r][source]
                for epoch in (0, 1):
                    assert [k for k, _ in rec["epochs"][epoch]] == [k for k, _ in ref["epochs"][epoch]], name
                assert rec["resume"] == rec["epochs"][0][3:], name  # the same batches, the same pixels
                assert rec["eval"] == ref["eval"] and rec["evaluate"]["eval_samples"] == 14, name
            for epoch in (0, 1):
                both = [k for r in (0, 1) for ks, _ in ranks[r][name]["epochs"][epoch] for k in ks]
                assert len(both) == len(set(both)) == 48 and set(both) == set(keys["train"]), name


@pytest.mark.slow
@pytest.mark.parametrize("backend,uint8", [("nvjpeg", False), ("pil", True)])
def test_phase_trains_on_the_device_path_and_resumes_exactly(data, tmp_path, dist_info, backend, uint8):
    """A whole phase (DeiT aug, mixup) with data.backend=nvjpeg, and with uint8 batches: it trains, and an
    interrupted run resumes to bit-identical shards."""
    from modasm import train
    from safetensors.torch import load_file
    _, wds_dir, _ = data
    ov = ["data.source=webdataset", f"data.root={wds_dir}", f"data.backend={backend}",
          f"speed.uint8_batches={str(uint8).lower()}", "e2e.epochs=1"]
    straight = phases.run_e2e(load_recipe(TINY_IMAGES, ov + [f"run.out_dir={tmp_path / 'a'}"]), dist_info)
    assert straight["steps"] == 6 and straight["eval_samples"] == 14 and straight["bad_samples"] == 0
    losses = [r["loss"] for r in read_jsonl(tmp_path / "a" / "tiny-images" / "e2e" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    interrupted = load_recipe(TINY_IMAGES, ov + [f"run.out_dir={tmp_path / 'b'}"])
    train.request_stop()
    assert phases.run_e2e(interrupted, dist_info) == {"interrupted": True, "step": 1}
    resumed = phases.run_e2e(interrupted, dist_info)
    assert resumed["top1"] == straight["top1"] and resumed["eval_loss"] == straight["eval_loss"]
    for m in (0, 1):
        a = load_file(str(tmp_path / "a" / "tiny-images" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        b = load_file(str(tmp_path / "b" / "tiny-images" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_backend_choices_are_checked():
    with pytest.raises(ValueError, match=r"data.backend='turbo' is not known; valid: pil, nvjpeg, dali"):
        DataConfig(backend="turbo")
    with pytest.raises(ValueError, match=r"not to fashion-mnist"):
        DataConfig(backend="nvjpeg")
    with pytest.raises(ValueError, match=r"AugMixAugment has no tensor version"):
        image_transforms(AugConfig(rand_augment="augmix-m5-w4-d2"), 32, "nvjpeg")
