"""ImageNet-scale data on tiny real trees: ImageFolder, webdataset shards (written by webdataset's own
TarWriter), exactly-once dealing over ranks and workers, resume, DeiT augmentation, bad samples."""
import io
import json
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

import photos
from conftest import ROOT, launch, run_cmd
from modasm import phases, train
from modasm.config import AugConfig, DataConfig, load_recipe
from modasm.data import Bad, SeededMixup, TrainSampler, build_datasets, collate, image_transforms, train_loader
from modasm.data import wds as webds
from modasm.data.imagefolder import ImageFolderDataset
from modasm.data.imagefolder import scan as scan_imagefolder
from modasm.data.writer import make_shards
from modasm.metrics import read_jsonl

TINY_IMAGES = ROOT / "tests" / "recipes" / "tiny-images.yaml"
TRAIN_COUNTS, VAL_COUNTS = [6, 10, 14, 18], [3, 4, 2, 5]  # uneven classes; 48 training images, 14 validation


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ImageFolder tree of real JPEG crops and its shards (make_shards, 10 images per shard)."""
    base = tmp_path_factory.mktemp("data")
    keys = photos.imagefolder(base / "tree", {"train": TRAIN_COUNTS, "val": VAL_COUNTS})
    make_shards(base / "tree", base / "wds", shard_size=10, stream=io.StringIO())
    return base / "tree", base / "wds", keys


def stream_keys(ds, rank=0, world=1, micro=1, workers=0, epoch=0, start=0):
    loader = train_loader(ds, micro, rank, world, workers)
    ds.set_epoch(epoch, start)
    return [(b.keys, float(b.x.double().sum())) for b in loader]


# ---------------------------------------------------------------- make_shards


def test_make_shards_writes_index_and_resumes(data, tmp_path):
    tree, wds_dir, keys = data
    index = webds.read_index(webds.index_path(wds_dir, "train"))
    assert index.names == [f"train-{i:06d}.tar" for i in range(5)] and [len(k) for k in index.keys] == [10] * 4 + [8]
    assert sorted(k for ks in index.keys for k in ks) == sorted(keys["train"])
    classes = json.loads((wds_dir / "classes.json").read_text())
    assert classes["classes"] == [f"class{c}" for c in range(4)] and classes["class_to_idx"]["class3"] == 3
    # shards mix the classes (shuffled before sharding), and webdataset reads them back
    first = list(wds.WebDataset(str(wds_dir / "train-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in first] == index.keys[0] and len({int(s["cls"]) for s in first}) > 1
    assert all(int(s["cls"]) == int(s["__key__"][5]) for s in first)

    out = tmp_path / "wds"
    make_shards(tree, out, shard_size=10, stream=io.StringIO())
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert before == {p.name: p.read_bytes() for p in wds_dir.glob("*.tar")}  # same plan, same bytes
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000001.tar").unlink()                                     # never finished
    (out / "train-000002.tar").write_bytes(before["train-000002.tar"][:5000])  # cut short
    (out / "val-index.json").unlink()
    log = io.StringIO()
    make_shards(tree, out, shard_size=10, stream=log)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    redone = {n for n, t in mtimes.items() if (out / n).stat().st_mtime_ns != t}
    assert redone == {"train-000001.tar", "train-000002.tar"}
    assert (out / "val-index.json").is_file() and not list(out.glob("*.tmp"))
    assert "48/48 images (100.0 %)" in log.getvalue() and "img/s, ETA" in log.getvalue()
    with pytest.raises(ValueError, match=r"another plan \(shard_size: 10 -> 7\)"):
        make_shards(tree, out, shard_size=7, stream=io.StringIO())


# ---------------------------------------------------------------- dealing: exactly once, reshuffled, resumable


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_two_workers_see_every_sample_once(data, tmp_path):
    tree, wds_dir, keys = data
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "data_probe.py"), str(tree), str(wds_dir), str(tmp_path), "2"]
    res = run_cmd(cmd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for source in ("imagefolder", "webdataset"):
        recs = [r[source] for r in ranks]
        per_epoch = []
        for epoch in (0, 1):
            seqs = [[k for ks, _ in rec["epochs"][epoch] for k in ks] for rec in recs]
            assert len(recs[0]["epochs"][epoch]) == len(recs[1]["epochs"][epoch]) == 8, source  # equal step counts
            both = seqs[0] + seqs[1]
            assert len(both) == len(set(both)) == 48 and set(both) == set(keys["train"]), source  # exactly once
            per_epoch.append(seqs)
        for r in (0, 1):  # reshuffled per epoch, across ranks too
            assert per_epoch[0][r] != per_epoch[1][r] and set(per_epoch[0][r]) != set(per_epoch[1][r]), source
            assert recs[r]["resume"] == recs[r]["epochs"][0][3:], source  # resume: the same batches, bit-exact
        evals = recs[0]["eval"] + recs[1]["eval"]
        assert len(evals) == len(set(evals)) == 14 and set(evals) == set(keys["val"]), source
        for rec in recs:  # evaluate() all-reduces: each validation sample counted once, no padding
            assert rec["evaluate"]["eval_samples"] == 14 and rec["evaluate"]["eval_bad_samples"] == 0, source


def test_stream_batches_do_not_depend_on_worker_count(data):
    _, wds_dir, keys = data
    cfg = DataConfig(source="webdataset", root=str(wds_dir), stream_splits=4, shuffle_buffer=8)
    train_ds, _ = build_datasets(cfg, 32, 0, AugConfig(rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.25))
    ref = stream_keys(train_ds, micro=3)
    assert len(ref) == 16 and sorted(k for ks, _ in ref for k in ks) == sorted(keys["train"])
    for workers in (1, 2, 4):
        assert stream_keys(train_ds, micro=3, workers=workers) == ref, workers
    assert stream_keys(train_ds, micro=3, workers=4, start=5 * 3) == ref[5:]  # resume with another worker count
    with pytest.raises(ValueError, match=r"data.num_workers=3 must divide data.stream_splits=4"):
        train_loader(train_ds, 3, 0, 1, 3)


def test_leftover_samples_and_repeated_augmentation(data):
    _, wds_dir, keys = data
    cfg = DataConfig(source="webdataset", root=str(wds_dir), stream_splits=2, shuffle_buffer=8)
    train_ds, _ = build_datasets(cfg, 32, 0)
    seen = [[k for ks, _ in stream_keys(train_ds, rank=r, world=3, micro=5) for k in ks] for r in range(3)]
    flat = sum(seen, [])  # 48 // 3 = 16 per rank, 3 micro-batches of 5: 45 read, none twice
    assert len(flat) == len(set(flat)) == 45 and set(flat) <= set(keys["train"])

    # repeated augmentation (3): each drawn sample 3 times per epoch, differently augmented; epoch length kept
    samplers = [TrainSampler(48, r, 3, seed=0, repeats=3) for r in range(3)]
    dealt = [list(s) for s in samplers]
    idx = Counter(i for d in dealt for i, _ in d)
    assert sum(idx.values()) == 48 and set(idx.values()) == {3} and len(idx) == 16
    assert all(len({i for i, _ in d}) == 16 for d in dealt)  # the 3 copies land on 3 different ranks
    assert len({s for d in dealt for _, s in d}) == 48     # with 3 different augmentation seeds
    rep = build_datasets(cfg, 32, 0, AugConfig(repeated_aug=3))[0]
    got = Counter(k for ks, _ in stream_keys(rep, micro=4) for k in ks)
    assert sum(got.values()) == 48 and set(got.values()) == {3}


def test_fraction_is_class_balanced_nested_and_source_independent(data):
    tree, wds_dir, keys = data
    chosen = {}
    for fraction in (0.25, 0.5):
        for source, root in (("imagefolder", tree), ("webdataset", wds_dir)):
            cfg = DataConfig(source=source, root=str(root), fraction=fraction, stream_splits=1)
            train_ds, val_ds = build_datasets(cfg, 32, 0)
            got = sorted(k for ks, _ in stream_keys(train_ds) for k in ks)
            per_class = Counter(k.split("/")[0] for k in got)
            assert per_class == {f"class{c}": max(1, int(fraction * n + 0.5)) for c, n in enumerate(TRAIN_COUNTS)}
            assert len(val_ds) == 14  # validation is never subset
            chosen[fraction, source] = got
        assert chosen[fraction, "imagefolder"] == chosen[fraction, "webdataset"]
    assert set(chosen[0.25, "imagefolder"]) < set(chosen[0.5, "imagefolder"])
    # the subset does not depend on the run seed
    again = build_datasets(DataConfig(source="imagefolder", root=str(tree), fraction=0.25), 32, 7)[0]
    assert sorted(f.rsplit(".", 1)[0] for f in again.files) == chosen[0.25, "imagefolder"]


def test_pipe_urls_and_brace_patterns(data):
    _, wds_dir, _ = data
    local = DataConfig(source="webdataset", root=str(wds_dir), stream_splits=2)
    piped = DataConfig(source="webdataset", root=str(wds_dir), stream_splits=2,
                       train_shards=f"pipe:cat {wds_dir}/train-{{000000..000004}}.tar",
                       val_shards=f"{wds_dir}/val-{{000000..000001}}.tar")
    a, b = build_datasets(local, 32, 0), build_datasets(piped, 32, 0)
    assert b[0].urls[0] == f"pipe:cat {wds_dir}/train-000000.tar"
    assert stream_keys(a[0], micro=4) == stream_keys(b[0], micro=4)
    with pytest.raises(ValueError, match=r"data.train_shards=.* names no shard 'train-000004.tar'"):
        build_datasets(DataConfig(source="webdataset", root=str(wds_dir),
                                  train_shards=f"pipe:cat {wds_dir}/train-{{000000..000003}}.tar"), 32, 0)
    with pytest.raises(ValueError, match=r"index .*missing.tar.* not found: make the shards"):
        build_datasets(DataConfig(source="webdataset", root=str(wds_dir / "missing.tar")), 32, 0)


# ---------------------------------------------------------------- DeiT augmentation through timm


@pytest.mark.parametrize("size,resize", [(224, 256), (384, 438)])
def test_deit_transforms_from_the_recipe(size, resize):
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation
    aug = load_recipe(ROOT / "recipes" / "vit-b16.yaml").aug
    train_tf, eval_tf = image_transforms(aug, size)
    parts = {type(t): t for t in train_tf.transform.transforms}
    rrc, ra, re = parts[RandomResizedCropAndInterpolation], parts[RandAugment], parts[RandomErasing]
    assert rrc.size == (size, size) and rrc.scale == (0.08, 1.0) and str(rrc.interpolation).endswith("BICUBIC")
    assert ra.num_layers == 2 and all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    names = [op.name for op in ra.ops]
    assert "SolarizeIncreasing" in names and "Solarize" not in names  # inc1: increasing-magnitude variants
    assert re.probability == 0.25 and re.mode == "pixel"
    assert [type(t).__name__ for t in eval_tf.transform.transforms][:2] == ["Resize", "CenterCrop"]
    assert eval_tf.transform.transforms[0].size == resize  # crop_pct 0.875

    img = Image.open(io.BytesIO(photos.jpegs(1, seed=3, min_side=300)[0]))
    a, b, c = train_tf(img, 11), train_tf(img, 11), train_tf(img, 12)
    assert a.shape == (3, size, size) and torch.equal(a, b) and not torch.equal(a, c)
    assert eval_tf(img, None).shape == (3, size, size)
    rng_before = torch.get_rng_state()
    train_tf(img, 13)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training process's RNG is left alone


def test_rand_augment_at_magnitude_ten_does_not_crash():
    """m9 + mstd0.5 reaches magnitude 10: timm then posterizes to 0 bits, which Pillow 13 refuses (DeiT got black)."""
    from PIL import ImageOps
    from timm.data.auto_augment import RandAugment
    img = Image.open(io.BytesIO(photos.jpegs(1, seed=3, min_side=64, max_side=64)[0])).convert("RGB")
    with pytest.raises(ValueError, match="bits"):
        ImageOps.posterize(img, 0)
    train_tf, _ = image_transforms(load_recipe(ROOT / "recipes" / "vit-b16.yaml").aug, 32)
    ra = next(t for t in train_tf.transform.transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    bits, fn = [], op.aug_fn
    op.aug_fn = lambda im, b, *a, **k: (bits.append(b), fn(im, b, *a, **k))[1]  # observe the drawn bits
    for seed in range(600):
        assert train_tf(img, seed).shape == (3, 32, 32)
    assert 0 in bits
    assert fn(img, 0).getextrema() == ((0, 0),) * 3  # black, as older Pillow made it


def test_mixup_soft_targets_are_seeded_and_smoothed():
    from timm.loss import SoftTargetCrossEntropy
    mix = SeededMixup(AugConfig(mixup=0.8, cutmix=1.0), label_smoothing=0.1, num_classes=4)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    (x1, t1), (x2, t2), (x3, _) = mix(x.clone(), y, 5), mix(x.clone(), y, 5), mix(x.clone(), y, 6)
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and not torch.equal(x1, x3)
    assert t1.shape == (6, 4) and torch.allclose(t1.sum(1), torch.ones(6))
    assert t1.min() >= 0.1 / 4 - 1e-6 and not torch.equal(x1, x)  # smoothed floor, images mixed
    xo, to = mix(x[:5].clone(), y[:5], 5)  # odd batch (after a skipped sample): all samples kept
    assert xo.shape[0] == 5 and to.shape == (5, 4) and torch.allclose(to.sum(1), torch.ones(5))
    assert SoftTargetCrossEntropy()(torch.randn(6, 4), t1).item() > 0


# ---------------------------------------------------------------- bad samples


def _shard_with_bad(root, split: str, n: int, bad: dict[int, str]):
    """One shard of n samples written by webdataset's TarWriter; at the positions in ``bad`` a truncated JPEG
    ("truncated") or a sample without label ("unlabeled")."""
    jpegs = photos.jpegs(n, seed=5)
    root.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / f"{split}-000000.tar")) as w:
        for i, data in enumerate(jpegs):
            sample = {"__key__": f"s{i:03d}", "jpg": data, "cls": i % 4}
            if bad.get(i) == "truncated":
                sample["jpg"] = data[:len(data) // 2]
            elif bad.get(i) == "unlabeled":
                del sample["cls"]
            w.write(sample)
    webds.index_shards([str(root / f"{split}-000000.tar")], split, root)


def _corrupt_shards(root, good: int, truncated: int, unlabeled: int, split: str):
    """good JPEGs, then truncated JPEGs, then samples without label."""
    bad = {good + i: "truncated" for i in range(truncated)}
    bad.update({good + truncated + i: "unlabeled" for i in range(unlabeled)})
    _shard_with_bad(root, split, good + truncated + unlabeled, bad)


@pytest.mark.slow
def test_bad_samples_are_skipped_counted_and_stop_the_phase(tmp_path, dist_info):
    shards = tmp_path / "bad"
    _corrupt_shards(shards, 21, 2, 1, "train")  # 24 = 3 micro-batches of 8: every sample read once
    _corrupt_shards(shards, 8, 1, 0, "val")
    ov = [f"run.out_dir={tmp_path}", "data.source=webdataset", f"data.root={shards}", "e2e.epochs=1"]
    done = phases.run_e2e(load_recipe(TINY_IMAGES, ov), dist_info)
    assert done["bad_samples"] == 3 and done["eval_samples"] == 8 and done["eval_bad_samples"] == 1
    recs = read_jsonl(tmp_path / "tiny-images" / "e2e" / "metrics.jsonl")
    assert [r["bad_samples"] for r in recs if r["kind"] == "train"][-1] == 3
    assert [r for r in recs if r["kind"] == "eval"][-1]["eval_bad_samples"] == 1

    with pytest.raises(ValueError, match=r"\d of \d+ training samples .*more than data.max_bad_fraction=0.05; e\.g\. "
                                         r".*bad/train-000000.tar \(key s02[123]"):
        phases.run_e2e(load_recipe(TINY_IMAGES, ov + ["run.name=strict", "data.max_bad_fraction=0.05"]), dist_info)


@pytest.mark.multiproc
@pytest.mark.slow
def test_bad_samples_are_summed_over_two_ranks_and_two_workers(tmp_path):
    """24 training samples, 2 ranks x 2 workers (stream_splits=2, micro-batch 4, 3 steps): rank r reads positions
    12r..12r+11, its worker 0 the first 8 of them, worker 1 the last 4. One bad sample in each of the four
    shares, so only the sum over the group of what every worker dropped makes 4."""
    shards = tmp_path / "bad"
    _shard_with_bad(shards, "train", 24, {2: "truncated", 9: "unlabeled", 14: "truncated", 21: "unlabeled"})
    _shard_with_bad(shards, "val", 10, {1: "truncated", 8: "unlabeled"})  # ranks read 0-4 / 5-9
    ov = [f"run.out_dir={tmp_path}", "data.source=webdataset", f"data.root={shards}", "e2e.epochs=1",
          "data.num_workers=2"]
    res = launch("e2e.py", str(TINY_IMAGES), *ov, nproc=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = tmp_path / "tiny-images" / "e2e"
    metrics = json.loads((run / "export" / "manifest.json").read_text())["metrics"]
    assert metrics["world"] == 2 and metrics["steps"] == 3
    assert (metrics["bad_samples"], metrics["eval_samples"], metrics["eval_bad_samples"]) == (4, 8, 2), metrics
    recs = read_jsonl(run / "metrics.jsonl")
    counts = [r["bad_samples"] for r in recs if r["kind"] == "train"]  # group totals so far, logged each step
    assert len(counts) == 3 and counts == sorted(counts) and counts[-1] == 4, counts
    assert [r["eval_bad_samples"] for r in recs if r["kind"] == "eval"] == [2]


def test_bad_files_and_cut_shards_become_bad_records(data, tmp_path):
    tree, wds_dir, keys = data
    classes, files, labels = scan_imagefolder(tree / "train")
    (tmp_path / "class0").mkdir()
    good = (tree / "train" / files[0]).read_bytes()
    (tmp_path / "class0" / "a.jpg").write_bytes(good[:len(good) // 3])
    (tmp_path / "class0" / "b.jpg").write_bytes(good)
    ds = ImageFolderDataset(tmp_path, ["class0/a.jpg", "class0/b.jpg"], np.array([0, 0]), image_transforms(AugConfig(), 32)[0],
                            train=True)
    batch = collate([ds[(0, 1)], ds[(1, 2)]])
    assert batch.keys == ["class0/b"] and batch.x.shape == (1, 3, 32, 32)
    assert len(batch.bad) == 1 and batch.bad[0].key == "class0/a" and "truncated" in batch.bad[0].reason

    # a shard cut in the middle: the samples not wholly before the cut are bad, named by shard and position
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in wds_dir.iterdir():
        (cut / f.name).write_bytes(f.read_bytes())
    shard = (cut / "train-000003.tar").read_bytes()
    at = len(shard) // 2
    (cut / "train-000003.tar").write_bytes(shard[:at])
    ends = {}  # sample key -> end of its last member's data in the intact shard
    with tarfile.open(wds_dir / "train-000003.tar") as t:
        for m in t.getmembers():
            key = m.name.rsplit(".", 1)[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    index = webds.read_index(webds.index_path(wds_dir, "train"))
    in_shard = index.keys[index.names.index("train-000003.tar")]
    lost = [p for p, k in enumerate(in_shard) if ends[k] > at]
    assert 0 < len(lost) < len(in_shard), "the cut is not inside the shard's samples"
    train_ds, _ = build_datasets(DataConfig(source="webdataset", root=str(cut), train_shards=f"{cut}/train-{{000000..000004}}.tar",
                                            stream_splits=1), 32, 0)
    loader = DataLoader(train_ds, batch_size=None)
    train_ds.configure(0, 1, 4, 0)
    batches = list(loader)
    bad = [b for batch in batches for b in batch.bad]
    got = [k for batch in batches for k in batch.keys]
    assert sorted(b.key for b in bad) == sorted(f"train-000003.tar#{p}" for p in lost)
    assert all(isinstance(b, Bad) and b.where == str(cut / "train-000003.tar") and b.reason.startswith("ReadError")
               for b in bad), bad[:2]
    assert sorted(got) == sorted(set(keys["train"]) - {in_shard[p] for p in lost})  # every other sample, once


# ---------------------------------------------------------------- a phase on the image sources


@pytest.mark.slow
@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
def test_phase_trains_with_deit_aug_and_resumes_exactly(data, tmp_path, dist_info, source, monkeypatch, one_thread):
    tree, wds_dir, _ = data
    root = tree if source == "imagefolder" else wds_dir
    ov = [f"data.source={source}", f"data.root={root}", "aug.repeated_aug=3", "e2e.drop_path=0.1"]  # drop path: RNG resumed too
    straight = phases.run_e2e(load_recipe(TINY_IMAGES, ov + [f"run.out_dir={tmp_path / 'a'}"]), dist_info)
    assert straight["steps"] == 12 and straight["eval_samples"] == 14 and straight["bad_samples"] == 0
    recs = read_jsonl(tmp_path / "a" / "tiny-images" / "e2e" / "metrics.jsonl")
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    assert len(losses) == 12 and all(np.isfinite(losses)) and len({round(v, 6) for v in losses}) > 1

    interrupted = load_recipe(TINY_IMAGES, ov + [f"run.out_dir={tmp_path / 'b'}"])
    (tmp_path / "stop").touch()  # checkpoint after the first optimizer step, mid-epoch
    monkeypatch.setenv(train.STOP_FILE_ENV, str(tmp_path / "stop"))
    assert phases.run_e2e(interrupted, dist_info) == {"interrupted": True, "step": 1}
    monkeypatch.delenv(train.STOP_FILE_ENV)
    # the resume is a new process (one thread, as this one): only what is on disk carries over
    res = launch("e2e.py", str(TINY_IMAGES), *ov, f"run.out_dir={tmp_path / 'b'}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "resuming from step 1/12" in res.stdout
    resumed = json.loads((tmp_path / "b" / "tiny-images" / "e2e" / "export" / "manifest.json").read_text())["metrics"]
    assert (resumed["top1"], resumed["eval_loss"]) == (straight["top1"], straight["eval_loss"]), "evaluates differently"
    from safetensors.torch import load_file
    for m in (0, 1):
        a = load_file(str(tmp_path / "a" / "tiny-images" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        b = load_file(str(tmp_path / "b" / "tiny-images" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"module {m} differs after resume"


@pytest.mark.slow
@pytest.mark.parametrize("source,start", [("imagefolder", "spawn"), ("webdataset", "forkserver")])
def test_loader_workers_start_under_spawn_and_forkserver(data, tmp_path, source, start):
    """A phase as users launch it, its 2 loader workers started by spawn / forkserver (the default on Linux from
    Python 3.14): everything they receive pickles, the entry point is import-safe, and the result is the one
    of a run without workers."""
    from conftest import launch
    tree, wds_dir, _ = data
    ov = [str(TINY_IMAGES), f"data.source={source}", f"data.root={tree if source == 'imagefolder' else wds_dir}"]
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        res = launch("e2e.py", *ov, f"run.out_dir={out}", f"data.num_workers={workers}", f"data.worker_start={start}",
                     timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        from safetensors.torch import load_file
        runs[workers] = [load_file(str(out / "tiny-images" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
                         for m in (0, 1)]
    for a, b in zip(runs[0], runs[2]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
