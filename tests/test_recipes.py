"""The paper's ViT-B/L/H recipes build meta, hybrid and assembled models of timm's sizes (meta device)."""
import dataclasses

import pytest
import timm
import torch

from conftest import ROOT
from modasm import model as M
from modasm.config import load_recipe

CASES = [("vit-b16", "vit_base_patch16_224"), ("vit-l16", "vit_large_patch16_224"),
         ("vit-h14", "vit_huge_patch14_224")]


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def timm_count(name: str, cfg, depth: int | None = None) -> int:
    kw = {"depth": depth} if depth is not None else {}
    with torch.device("meta"):
        ref = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes, qkv_bias=cfg.qkv_bias, **kw)
    assert all(p.is_meta for p in ref.parameters())
    return count(ref)


@pytest.mark.parametrize("recipe,timm_name", CASES + [("vit-h14:uneven", "vit_huge_patch14_224")])
def test_recipe_models_match_timm(recipe, timm_name):
    name, _, variant = recipe.partition(":")
    ov = ["model.split=[4,3,3,3,3,3,3,3,3,4]"] if variant == "uneven" else []
    cfg = load_recipe(ROOT / "recipes" / f"{name}.yaml", ov).model
    K = cfg.K
    with torch.device("meta"):
        target = M.build_target(cfg)
        meta = M.build_meta(cfg)
        hybrids = [M.build_hybrid(cfg, k, None) for k in range(K)]
    for m in [target, meta, *hybrids]:
        assert all(t.is_meta for t in m.state_dict().values()), "a full weight was allocated"

    assert count(target) == timm_count(timm_name, cfg)
    assert count(meta) == timm_count(timm_name, cfg, depth=K)
    per_module = {m: sum(t.numel() for n, t in target.named_parameters() if M.owner(n, cfg.split)[0] == m)
                  for m in range(K)}
    assert sum(per_module.values()) == count(target)
    for k, h in enumerate(hybrids):
        assert count(h) == timm_count(timm_name, cfg, depth=K - 1 + cfg.split[k])
        layout = M.hybrid_layout(cfg.split, k)
        trainable = {n for n, p in h.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in h.named_parameters() if M.owner(n, layout)[0] == k}
        assert sum(p.numel() for p in h.parameters() if p.requires_grad) == per_module[k]
    if name == "vit-h14":
        assert 631e6 < count(target) < 633e6
        # the paper's ViT-H/14: no qkv bias, LayerNorm eps 1e-5
        assert not cfg.qkv_bias and target.blocks[0].norm1.eps == 1e-5
        with_bias = dataclasses.replace(cfg, qkv_bias=True)
        assert timm_count(timm_name, with_bias) - count(target) == 32 * 3 * 1280  # today's timm default


@pytest.mark.parametrize("recipe,fine_tune_drop_path", [("vit-b16", 0.1), ("vit-l16", 0.5), ("vit-h14", 0.6)])
def test_recipe_phases_follow_the_paper(recipe, fine_tune_drop_path):
    """LeapLabTHU/Deep-Incubation TRAINING.md + main.py defaults (E2E: the fine-tune's drop path, our choice)."""
    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml")
    # (epochs, warm-up, clip, drop path) per phase; PT --drop-path 0, MT --drop-path 0.1, FT no warm-up, clip 1
    expected = {"meta": (300, 20, 0.0, 0.0), "incubate": (100, 20, 0.0, 0.1),
                "assemble": (100, 0, 1.0, fine_tune_drop_path), "e2e": (300, 20, 0.0, fine_tune_drop_path)}
    for phase, (epochs, warmup, clip, dp) in expected.items():
        p = getattr(r, phase)
        assert (p.epochs, p.warmup_epochs, p.clip_grad, p.drop_path) == (epochs, warmup, clip, dp), phase
        assert (p.batch_size, p.lr, p.min_lr, p.weight_decay, p.label_smoothing) == (2048, 5e-4, 1e-5, 0.05, 0.1), phase
    assert r.deepspeed.precision == "bf16"  # ZeRO stage and micro-batches: launch/estimate.py's (test_estimate.py)
    assert r.data.source != "fashion-mnist", "an ImageNet recipe must not fall back to the demo dataset"
    assert (r.model.img_size, r.model.in_chans, r.model.num_classes, sum(r.model.split)) == \
        (224, 3, 1000, {"vit-b16": 12, "vit-l16": 24, "vit-h14": 32}[recipe])


@pytest.mark.parametrize("recipe", ["vit-b16", "vit-l16", "vit-h14"])
def test_recipe_augmentation_is_deit(recipe):
    """DeiT's recipe (the paper's main.py defaults): RandAugment, mixup/cutmix, erasing, repeated aug, crop 0.875."""
    r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml")
    a = r.aug
    assert a.rand_augment == "rand-m9-mstd0.5-inc1" and a.interpolation == "bicubic"
    assert (a.mixup, a.cutmix, a.mixup_prob, a.mixup_switch_prob, a.mixup_mode) == (0.8, 1.0, 1.0, 0.5, "batch")
    assert (a.re_prob, a.re_mode, a.re_count) == (0.25, "pixel", 1)
    assert a.repeated_aug == 3 and a.crop_pct == 0.875 and a.hflip == 0.5
    assert a.scale == [0.08, 1.0] and a.ratio == pytest.approx([3 / 4, 4 / 3])
    assert a.mixes and all(getattr(r, p).label_smoothing == 0.1 for p in ("meta", "incubate", "assemble", "e2e"))
    assert r.data.source in ("imagefolder", "webdataset") and r.data.fraction == 1.0
    assert r.data.stream_splits % r.data.num_workers == 0


HIGH_RES = [("vit-b16-384", "vit-b16", "vit_base_patch16_384", 384), ("vit-l16-384", "vit-l16", "vit_large_patch16_384", 384),
            ("vit-h14-392", "vit-h14", "vit_huge_patch14_224", 392)]  # timm registers no ViT-H/14 at 392


@pytest.mark.parametrize("recipe,base,timm_name,img", HIGH_RES)
def test_high_res_recipes_fine_tune_the_224_runs_targets(recipe, base, timm_name, img):
    """The paper's 384/392 fine-tunes: the 224 recipe's model at another img_size, started from that run's
    assemble and e2e targets, with DeiT's published 384 fine-tune settings (recipe header)."""
    from modasm import phases
    r, b = load_recipe(ROOT / "recipes" / f"{recipe}.yaml"), load_recipe(ROOT / "recipes" / f"{base}.yaml")
    assert r.model == dataclasses.replace(b.model, img_size=img) and r.run.name == recipe != b.run.name
    assert (r.data, r.aug, r.deepspeed) == (b.data, b.aug, b.deepspeed)
    for section in ("assemble", "e2e"):
        p = getattr(r, section)
        assert p.init_from == str(phases.export_dir(b, section)) and not p.init_from_sha256
        assert (p.epochs, p.batch_size, p.lr, p.min_lr, p.warmup_epochs, p.weight_decay, p.clip_grad,
                p.label_smoothing) == (30, 512, 5e-6, 5e-6, 5, 1e-8, 0.0, 0.1), section
        assert p.drop_path == b.assemble.drop_path  # the paper's fine-tune value for the size
    with torch.device("meta"):
        target = M.build_target(r.model)
        ref = timm.create_model(timm_name, pretrained=False, img_size=img, qkv_bias=r.model.qkv_bias,
                                num_classes=r.model.num_classes)
    assert count(target) == count(ref) and target.pos_embed.shape == (1, (img // r.model.patch_size) ** 2 + 1,
                                                                       r.model.embed_dim)


@pytest.mark.parametrize("name", ["vit-b16", "vit-l16", "vit-h14", "vit-b16-384", "vit-l16-384", "vit-h14-392"])
def test_imagenet_recipes_save_twice_an_epoch(name):
    """A preemption without grace time (Slurm's GraceTime is 0 unless a site sets it) loses the steps since the last
    save: with ckpt_every_steps 0, up to an epoch. Every phase but meta saves every half epoch; the header says what
    that is at the step time launch/estimate.py projects for the hardware it names (40 % MFU assumed), and how
    GraceTime decides whether anything is lost."""
    import re

    from modasm import estimate, perf
    path = ROOT / "recipes" / f"{name}.yaml"
    recipe, header = load_recipe(path), path.read_text().split("\nrun:")[0]
    every = {s: getattr(recipe, s).ckpt_every_steps for s in estimate.sections(recipe)}
    for s, n in every.items():
        steps = estimate.IMAGENET_TRAIN // getattr(recipe, s).batch_size
        assert (n == 0) if s == "meta" else (0 < n <= steps // 2 and n > steps // 2 - 25), (s, n, steps)
    gpus, gpu = estimate.sized_for(path)
    peak = getattr(perf.gpu(gpu), perf.matmul_precision(recipe.deepspeed.precision)) * 1e12
    minutes = [every[pm.section] * pm.trace.flops_per_image * getattr(recipe, pm.section).batch_size
               / (pm.ranks * peak * 0.4) / 60 for pm in estimate.phase_models(recipe, gpus) if pm.section != "meta"]
    text = " ".join(line.lstrip("# ") for line in header.splitlines())
    span = f"{min(minutes):.1f} to {max(minutes):.1f} min" if f"{min(minutes):.1f}" != f"{max(minutes):.1f}" \
        else f"{min(minutes):.1f} min"
    assert f"every {max(every.values())} steps" in text, text
    assert f"{span} projected" in text, (span, text)
    assert re.search(r"GraceTime.*scontrol show partition", text) and "lose nothing" in text, text
