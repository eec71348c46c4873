"""No host syncs in the hot loop (issue 21): between the loader's batch and the optimizer step, training only
enqueues work; the syncs left are the step's one read of its flags (``train.step_flags``), the logged step's one
read (``log_step``) and the evaluation's one read, plus DeepSpeed's own (docs/method.md, "Host syncs").

Counted with ``tests/syncs.py`` (the calls that would make the host wait for a GPU) around the real
``_Run.micro_step`` and ``evaluate`` of whole phases through real DeepSpeed engines; on a GPU,
benchmarks/gpu_check.sh counts CUDA's own sync warnings for the same loop."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import photos
from conftest import ROOT, TINY
from modasm import phases, train
from modasm.config import AugConfig, load_recipe
from modasm.data import collate, image_transforms, tensor_aug
from modasm.data.transforms import Encoded
from syncs import SyncCounter

TINY_IMAGES = ROOT / "tests" / "recipes" / "tiny-images.yaml"
DEIT = load_recipe(ROOT / "recipes" / "vit-b16.yaml").aug
STEP_FLAGS = ("tolist", "step_flags")
LOG_STEP = ("tolist", "log_step")
CLIP = [("tensor(host data, device=)", "clip_grad_norm_")] * 2  # DeepSpeed's clip_grad_norm_, plain engine


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    photos.imagefolder(root, {"train": [6, 10, 14, 18], "val": [3, 4, 2, 5]})
    return root


def calls(counter: SyncCounter, package: str) -> list[tuple[str, str]]:
    """(call, function) of each sync of ``package``, in order."""
    return [(e.what, e.where.split()[-1]) for e in counter.events if e.package == package]


def watched_phase(monkeypatch, recipe, info):
    """Run the e2e phase of ``recipe``; per micro-step (step number, boundary, counter), and per evaluation
    (counter, batches)."""
    steps, evals = [], []
    micro_step, evaluate = train._Run.micro_step, train.evaluate

    def watched_micro_step(self, batch, epoch, micro_no):
        step_no = self.state.step + 1
        with SyncCounter() as c:
            boundary = micro_step(self, batch, epoch, micro_no)
        steps.append((step_no, boundary, c))
        return boundary

    def watched_evaluate(model, loader, *args, **kwargs):
        with SyncCounter() as c:
            out = evaluate(model, loader, *args, **kwargs)
        evals.append((c, len(loader)))
        return out
    monkeypatch.setattr(train._Run, "micro_step", watched_micro_step)
    monkeypatch.setattr(train, "evaluate", watched_evaluate)
    done = phases.run_e2e(recipe, info)
    return done, steps, evals


PATHS = {
    # Fashion-MNIST float batches, the plain fp32 engine with gradient clipping
    "float": (TINY, ["e2e.clip_grad=1.0", "data.eval_batch_size=64"]),
    # real JPEGs, DeiT augmentation (RandAugment, erasing) + mixup/cutmix: uint8 batches normalised and erased on the
    # device, and the nvjpeg backend (decode + every augmentation op on the device; torchvision's CPU decoder here)
    "uint8": (TINY_IMAGES, ["speed.uint8_batches=true", "data.eval_batch_size=4"]),
    "nvjpeg": (TINY_IMAGES, ["data.backend=nvjpeg", "data.eval_batch_size=4"]),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_a_training_step_syncs_once_and_a_logged_step_twice(monkeypatch, tmp_path, tree, dist_info, path):
    """Every micro-step before the boundary: no sync at all. An optimizer step: the one read of its flags (stop,
    non-finite loss, non-finite gradients); a logged one also its record's one read (loss, grad norm, data-health
    counts). DeepSpeed's own: none, but its clip_grad_norm_'s two host-to-device copies per step where it clips
    (its throughput timer, which synchronised at every forward and step, is off). An evaluation: one read,
    whatever its number of batches. The first optimizer step is left out (constants copied to the device once)."""
    recipe_file, extra = PATHS[path]
    ov = [f"run.out_dir={tmp_path}", "e2e.epochs=1", "e2e.accum_steps=2", "e2e.log_every_steps=3", *extra]
    if recipe_file == TINY_IMAGES:
        ov.append(f"data.root={tree}")
    recipe = load_recipe(recipe_file, ov)
    done, steps, evals = watched_phase(monkeypatch, recipe, dist_info)
    total = done["steps"]
    assert total >= 6 and len(steps) == 2 * total and [b for _, b, _ in steps] == [False, True] * total
    clips = CLIP if recipe.e2e.clip_grad > 0 else []
    for step_no, boundary, c in steps:
        if step_no == 1:
            continue
        where = f"{path}: micro-step of step {step_no} ({'boundary' if boundary else 'accumulating'})"
        if not boundary:
            assert c.events == [], (where, c.summary())
            continue
        logged = step_no % 3 == 0 or step_no == total
        assert calls(c, "modasm") == [STEP_FLAGS] + ([LOG_STEP] if logged else []), (where, c.summary())
        assert calls(c, "deepspeed") == clips, (where, c.summary("deepspeed"))
        assert c.count() == c.count("modasm") + c.count("deepspeed"), (where, c.summary())
    assert len(evals) == 1
    c, batches = evals[0]
    assert batches >= 4 and [(e.what, e.where.split()[-1]) for e in c.events] == [("tolist", "evaluate")], \
        (path, batches, c.summary())


def test_device_ops_of_the_augmentation_do_not_sync():
    """Each RandAugment op of the nvjpeg/dali paths, normalising and erasing: no sync once their constants are on
    the device (each copied there once). Sharpness is torchvision's, the same ops with its kernel kept on the device."""
    ops = [("AutoContrast", (), {}), ("Equalize", (), {}), ("Invert", (), {}), ("PosterizeIncreasing", (3,), {}),
           ("Rotate", (17.0,), {"resample": "bicubic", "fillcolor": (124, 116, 104)}),
           ("SolarizeIncreasing", (100,), {}), ("SolarizeAdd", (60,), {}), ("ColorIncreasing", (1.6,), {}),
           ("ContrastIncreasing", (0.5,), {}), ("BrightnessIncreasing", (1.4,), {}),
           ("SharpnessIncreasing", (1.8,), {}), ("ShearX", (0.2,), {"resample": "bicubic", "fillcolor": (0, 0, 0)}),
           ("ShearY", (-0.15,), {"resample": "bilinear", "fillcolor": (0, 0, 0)}),
           ("TranslateXRel", (0.3,), {"resample": "bicubic", "fillcolor": (124, 116, 104)}),
           ("TranslateYRel", (-0.2,), {"resample": "bicubic", "fillcolor": (124, 116, 104)}),
           ("ColorJitter", ([3, 0, 2, 1], 1.2, 0.8, 1.3, 0.05), {})]
    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plans = [tensor_aug.Plan(seed=7, size=(40, 48), erase=[(3, 4, 10, 12)]), tensor_aug.Plan(seed=8, size=(40, 48))]
    for name, args, kw in ops:
        tensor_aug._op(img, name, args, kw)
    for mode in ("const", "pixel", "rand"):
        tensor_aug.finish(torch.stack([img, img]), plans, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), mode)
    for name, args, kw in ops:
        with SyncCounter() as c:
            tensor_aug._op(img, name, args, kw)
        assert c.events == [], (name, c.summary())
    for mode in ("const", "pixel", "rand"):
        with SyncCounter() as c:
            tensor_aug.finish(torch.stack([img, img]), plans, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), mode)
        assert c.events == [], (mode, c.summary())
    for factor in (0.1, 1.0, 1.8):
        assert torch.equal(tensor_aug.sharpness(img, factor), TF.adjust_sharpness(img, factor))


def test_labels_of_a_batch_with_undecodable_samples_are_chosen_on_the_host():
    """nvjpeg: a sample the device decoder (and PIL after it) refuses is dropped from the batch; the labels of
    the others are picked on the host and copied with the batch, no index built on the host and sent over."""
    jpegs = photos.jpegs(4, seed=3, min_side=64, max_side=120)
    tf, _ = image_transforms(AugConfig(**{**DEIT.__dict__, "re_prob": 0.0}), 32, "nvjpeg")
    samples = [(tf.from_bytes(d, f"f{i}.jpg", f"k{i}", i), i, f"k{i}") for i, d in enumerate(jpegs)]
    cut = jpegs[1][:len(jpegs[1]) // 2]  # past the loader's checks: as if the file changed after its header read
    samples[1] = (Encoded(torch.frombuffer(bytearray(cut), dtype=torch.uint8), samples[1][0].plan), 1, "k1")
    batch = collate(samples)
    with SyncCounter() as c:
        done = tf.to_device(batch, torch.device("cpu"))
    assert done.keys == ["k0", "k2", "k3"] and done.y.tolist() == [0, 2, 3] and [b.key for b in done.bad] == ["k1"]
    assert [e for e in c.events if e.where.endswith(" to_device")] == [], c.summary()
    whole = collate([(tf.from_bytes(d, f"f{i}.jpg", f"k{i}", i), i, f"k{i}") for i, d in enumerate(jpegs)])
    with SyncCounter() as c:
        done = tf.to_device(whole, torch.device("cpu"))
    assert done.y.tolist() == [0, 1, 2, 3] and c.events == [], c.summary()  # all decoded: nothing indexed


def test_the_counter_sees_each_kind_of_sync():
    """tests/syncs.py itself: each kind it claims to see, attributed to this file; host-side work apart."""
    t = torch.arange(6.0)
    with SyncCounter() as c:
        t.sum().item()
        t.tolist()
        bool(t[0] > 1)
        t[t > 2]
        t[[0, 2]]
        t.nonzero()
        torch.tensor([1.0, 2.0], device=t.device)
        torch.as_tensor((1, 2), device=t.device)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t[t > 2] = 0.0            # masked_fill_: no sync
        torch.tensor([1.0, 2.0])  # a host tensor
        torch.zeros(3, device=t.device)
    kinds = ["item", "tolist", "__bool__", "boolean-mask index", "host-list index", "nonzero",
             "tensor(host data, device=)", "as_tensor(host data, device=)"]
    assert [e.what for e in c.events] == kinds + (["synchronize"] if torch.cuda.is_available() else [])
    assert {e.package for e in c.events} == {"tests"} and all("test_syncs.py" in e.where for e in c.events)
    # host work: torch.optim's step counters, a DataLoader's fetch (its dataset's reads of host tensors)
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = torch.optim.AdamW([p])
    opt.step()
    with SyncCounter() as c:
        opt.step()
        list(torch.utils.data.DataLoader([torch.tensor(i) for i in range(4)], batch_size=2,
                                         collate_fn=lambda b: [int(t) for t in b]))
    assert c.events == [] and c.host_calls >= 5, (c.summary(), c.host_calls)
