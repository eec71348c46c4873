"""Interop: the paper's checkpoints in (same logits), plain timm ViTs out (same logits), high-res fine-tunes.

The paper-format files are written here from timm ViTs by this file's own code (not modasm's), following
LeapLabTHU/Model-Assembling ``utils.save_model``: ``model`` (the whole state dict, again under ``stages.<m>.``),
``model_stages`` (K module-local state dicts), and optimizer/scheduler/scaler state and the epoch.
"""
import argparse
import copy
import json
import os
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from conftest import TINY, launch
from modasm import evaluate, interop, phases
from modasm import model as M
from modasm.config import load_recipe
from modasm.shards import ShardError, load_modules, read_manifest, save_shards

CASES = {"K2": ("[1,2]", True, 1e-6), "K4-uneven-no-qkv-bias": ("[2,1,1,3]", False, 1e-5)}


def recipe_of(tmp_path, split="[1,2]", qkv_bias=True, eps=1e-6, *ov):
    return load_recipe(TINY, [f"run.out_dir={tmp_path}", f"model.split={split}",
                              f"model.qkv_bias={str(qkv_bias).lower()}", f"model.norm_eps={eps}", *ov])


def paper_vit(depth, *, width=32, heads=2, classes=10, qkv_bias=True, eps=1e-6, img=28, seed=0):
    """The paper's ViT: a timm VisionTransformer (its vendored timm has the same tensor names)."""
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=img, patch_size=7, in_chans=1, num_classes=classes, embed_dim=width, depth=depth,
                          num_heads=heads, qkv_bias=qkv_bias, norm_layer=partial(nn.LayerNorm, eps=eps))
    with torch.no_grad():  # non-trivial values everywhere (timm zero-inits biases and the head)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def to_stages(state, layout):
    """The paper's ``stages``: module 0 owns cls_token/pos_embed/patch_embed, the last norm/head; block
    indices restart at 0 in every module."""
    starts = [sum(layout[:m]) for m in range(len(layout))]
    stages = [{} for _ in layout]
    for name, t in state.items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            m = max(j for j in range(len(layout)) if starts[j] <= int(i))
            stages[m][f"blocks.{int(i) - starts[m]}.{rest}"] = t
        elif name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            stages[0][name] = t
        else:
            assert name.startswith(("norm.", "head.")), name
            stages[-1][name] = t
    return stages


def from_stages(stages, layout):
    starts = [sum(layout[:m]) for m in range(len(layout))]
    out = {}
    for m, s in enumerate(stages):
        for name, t in s.items():
            if name.startswith("blocks."):
                _, i, rest = name.split(".", 2)
                name = f"blocks.{int(i) + starts[m]}.{rest}"
            out[name] = t
    return out


def save_paper(path, model, layout, epoch=299):
    """torch.save a checkpoint as the paper's utils.save_model does (training state included)."""
    stages = to_stages(model.state_dict(), layout)
    whole = dict(model.state_dict())
    whole.update({f"stages.{m}.{k}": v for m, s in enumerate(stages) for k, v in s.items()})
    trained = copy.deepcopy(model)  # optimizer state of a step taken on a copy: the saved weights stay the model's
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    trained(torch.randn(2, 1, *model.patch_embed.img_size)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {"model": whole, "model_stages": stages, "optimizer": opt.state_dict(),
             "lr_scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
             "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                        "_growth_tracker": 0}, "epoch": epoch}
    torch.save(state, path)
    return path


@torch.no_grad()
def same_logits(a, b, x):
    """The same function: copies of both models in float64 (exact from fp32 weights) give the same logits to 1e-10
    of their scale. Rounding in float64 (u = 1.1e-16, ~1e3 roundings per logit) stays below 1e-12; a weight that
    lost its fp32 bits, another eps or another layer moves logits by 1e-8 or far more. (In fp32 the tolerance would
    be the rounding itself, which depends on the CPU's vector width and thread count.)"""
    a, b = copy.deepcopy(a).eval().double(), copy.deepcopy(b).eval().double()
    ya, yb = a(x.double()), b(x.double())
    diff = (ya - yb).abs().max().item()
    assert diff <= 1e-10 * max(1.0, yb.abs().max().item()), f"logits differ by {diff}"
    return diff


@pytest.mark.parametrize("case", list(CASES))
def test_imported_checkpoints_give_the_paper_models_logits(tmp_path, dist_info, case):
    split_s, qkv_bias, eps = CASES[case]
    recipe = recipe_of(tmp_path, split_s, qkv_bias, eps)
    cfg, K = recipe.model, recipe.model.K
    kw = dict(qkv_bias=qkv_bias, eps=eps)
    x = torch.randn(4, 1, 28, 28)

    meta = paper_vit(K, seed=1, **kw)
    meta_stages = to_stages(meta.state_dict(), [1] * K)
    interop.import_paper(recipe, save_paper(tmp_path / "meta.pth", meta, [1] * K), "meta")
    same_logits(evaluate.build_from_shards(recipe, "meta"), meta, x)

    incubated = []
    for k in range(K):
        layout = M.hybrid_layout(cfg.split, k)
        hybrid = paper_vit(sum(layout), seed=10 + k, **kw)
        stages = to_stages(hybrid.state_dict(), layout)
        hybrid.load_state_dict(from_stages([stages[m] if m == k else meta_stages[m] for m in range(K)], layout))
        interop.import_paper(recipe, save_paper(tmp_path / f"hybrid{k}.pth", hybrid, layout), "incubate", k)
        same_logits(evaluate.build_from_shards(recipe, "incubate", k), hybrid, x)
        incubated.append(to_stages(hybrid.state_dict(), layout)[k])

    original = paper_vit(sum(cfg.split), **kw)  # the paper's assembled model: module k of hybrid(k), k = 0..K-1
    original.load_state_dict(from_stages(incubated, cfg.split))
    ours = M.build_target(cfg, modules=phases.load_incubated(recipe))  # what our assemble phase starts from
    same_logits(ours, original, x)
    assert ours.blocks[0].norm1.eps == eps and (ours.blocks[0].attn.qkv.bias is not None) == qkv_bias

    # the pipeline treats the imported phases as done: nothing trains, nothing is written beside them
    assert "imported_from" in phases.run_meta(recipe, dist_info)
    assert phases.run_incubate(recipe, K - 1, dist_info)["imported_epoch"] == 299
    assert not (phases.phase_dir(recipe, "meta") / "ckpt").exists()

    fine_tuned = paper_vit(sum(cfg.split), seed=99, **kw)  # an assembled + fine-tuned checkpoint
    interop.import_paper(recipe, save_paper(tmp_path / "ft.pth", fine_tuned, cfg.split), "assemble")
    same_logits(evaluate.build_from_shards(recipe, "assemble"), fine_tuned, x)
    manifest = read_manifest(phases.export_dir(recipe, "assemble"))
    assert manifest["recipe"] == recipe.to_dict() and manifest["split"] == list(cfg.split)
    with pytest.raises(ValueError, match="already holds a shard set"):
        interop.import_paper(recipe, tmp_path / "ft.pth", "assemble")


def test_plain_timm_checkpoint_without_model_stages_imports_by_the_recipes_split(tmp_path):
    recipe = recipe_of(tmp_path, "[2,1]")
    model = paper_vit(3, seed=5)
    torch.save({"model": model.state_dict()}, tmp_path / "deit.pth")
    interop.import_paper(recipe, tmp_path / "deit.pth", "e2e")
    same_logits(evaluate.build_from_shards(recipe, "e2e"), model, torch.randn(2, 1, 28, 28))


MISMATCHES = {  # what the file is built from (recipe: split [1,2], width 32, qkv bias, 10 classes) -> message
    "width": (dict(depth=3, width=48), "[1, 2]", ["model.embed_dim", "width is 48", "the recipe's is 32"]),
    "depth": (dict(depth=4), "[1, 3]", ["depth:", "[1, 3] blocks (depth 4)", "needs [1, 2] (depth 3)"]),
    "split": (dict(depth=3), "[2, 1]", ["split:", "[2, 1] blocks", "needs [1, 2]"]),
    "modules": (dict(depth=3), "[1, 1, 1]", ["split:", "holds 3 modules", "K=2"]),
    "qkv bias": (dict(depth=3, qkv_bias=False), "[1, 2]", ["model.qkv_bias", "have no qkv bias", "=true"]),
    "classes": (dict(depth=3, classes=1000), "[1, 2]", ["model.num_classes", "1000 outputs", "the recipe's is 10"]),
    "resolution": (dict(depth=3, img=42), "[1, 2]", ["model.img_size", "6x6 grid", "model.img_size=42", "init_from"]),
}


@pytest.mark.parametrize("what", list(MISMATCHES))
def test_a_mismatched_checkpoint_is_refused_naming_the_mismatch(tmp_path, what):
    build, layout_s, expect = MISMATCHES[what]
    recipe = recipe_of(tmp_path)
    f = save_paper(tmp_path / "bad.pth", paper_vit(**build), json.loads(layout_s))
    with pytest.raises(ValueError) as e:
        interop.import_paper(recipe, f, "assemble")
    for s in [str(f), *expect]:
        assert s in str(e.value), f"{s!r} not in {e.value}"
    assert read_manifest(phases.export_dir(recipe, "assemble")) is None, "a refused file was written"


def test_a_hybrid_imported_under_the_wrong_module_index_is_refused(tmp_path):
    recipe = recipe_of(tmp_path, "[2,2]")
    f = save_paper(tmp_path / "hybrid0.pth", paper_vit(3), M.hybrid_layout([2, 2], 0))  # layout [2, 1]
    with pytest.raises(ValueError, match=r"split: the file's modules have \[2, 1\] blocks \(depth 3\); --as incubate "
                                         r"--module 1 with model.split=\[2, 2\] needs \[1, 2\]"):
        interop.import_paper(recipe, f, "incubate", 1)
    with pytest.raises(ValueError, match="needs --module k with 0 <= k < 2"):
        interop.import_paper(recipe, f, "incubate", 2)
    assert read_manifest(phases.export_dir(recipe, "incubate", 1)) is None


def _payload(marker):  # what a malicious checkpoint would run while being unpickled
    Path(marker).write_text("ran")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _payload, (self.marker,)


@pytest.mark.parametrize("extra", ["payload", "namespace"])
def test_a_file_that_needs_code_to_unpickle_is_refused_and_never_runs(tmp_path, extra):
    recipe = recipe_of(tmp_path)
    marker = tmp_path / "payload-ran"
    model = paper_vit(3)
    obj = Payload(str(marker)) if extra == "payload" else argparse.Namespace(lr=5e-4)  # DeiT saves its args
    torch.save({"model_stages": to_stages(model.state_dict(), [1, 2]), "args": obj}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(ValueError) as e:
        interop.import_paper(recipe, tmp_path / "evil.pth", "assemble")
    msg = str(e.value)
    assert str(tmp_path / "evil.pth") in msg and "needs code" in msg and "nothing in the file ran" in msg
    assert ("_payload" if extra == "payload" else "argparse.Namespace") in msg
    assert not marker.exists(), "the payload ran"
    assert read_manifest(phases.export_dir(recipe, "assemble")) is None


def _assembled_run(tmp_path, *ov, seed=3):
    """A run dir holding an assemble shard set (written through save_shards, as the phase does)."""
    recipe = load_recipe(TINY, [f"run.out_dir={tmp_path}", *ov])
    torch.manual_seed(seed)
    model = M.build_target(recipe.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_shards(phases.export_dir(recipe, "assemble"), M.split_modules(model, recipe.model.split),
                model_cfg=recipe.model, layout=recipe.model.split, phase="assemble", step=8, recipe=recipe.to_dict(),
                metrics={"top1": 12.5, "device_hours": 0.5, "pipeline_device_hours": 2.0})
    return recipe, model.eval()


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_export_loads_with_timm_create_model_with_the_same_logits(tmp_path, eps):
    recipe, ours = _assembled_run(tmp_path, f"model.norm_eps={eps}", "model.split=[2,1]", "model.qkv_bias=false")
    out = tmp_path / "exported"
    done = interop.export_timm(recipe.run_dir, "assemble", out)
    config = json.loads((out / "config.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert set(load_file(str(out / "model.safetensors"))) == set(ours.state_dict())  # plain timm names
    x = torch.randn(3, 1, 28, 28)
    norm = {} if eps == 1e-6 else {"norm_layer": partial(nn.LayerNorm, eps=eps)}
    pc = config["pretrained_cfg"]
    by_name = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=dict(
        file=str(out / "model.safetensors"), num_classes=pc["num_classes"], input_size=tuple(pc["input_size"])),
        **config["model_args"], **norm)
    same_logits(by_name, ours, x)
    local = timm.create_model(f"local-dir:{out}", pretrained=True, **norm)
    same_logits(local, ours, x)
    assert local.pretrained_cfg["mean"] == [0.2860] and local.pretrained_cfg["input_size"] == (1, 28, 28)
    assert all("timm.create_model(" in line for line in done["lines"])
    assert done["lines"][1] in (out / "README.md").read_text()
    if eps != 1e-6:  # config.json cannot name the eps: without the norm_layer timm builds eps 1e-6
        assert "norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-05)" in done["lines"][0]
        plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert plain.blocks[0].norm1.eps == 1e-6 and "eps is 1e-05" in done["norm_note"]
        with torch.no_grad():
            assert 0 < (plain(x) - ours(x)).abs().max() < 1e-3


def test_export_verifies_the_shard_set_first(tmp_path):
    recipe, _ = _assembled_run(tmp_path)
    f = phases.export_dir(recipe, "assemble") / "module-01.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="module-01.safetensors: sha256"):
        interop.export_timm(recipe.run_dir, "assemble", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ShardError, match="no shard set"):
        interop.export_timm(recipe.run_dir, "e2e", tmp_path / "out")


def test_init_from_resamples_pos_embed_with_timms_function(tmp_path):
    src, model = _assembled_run(tmp_path)
    init = phases.export_dir(src, "assemble")
    hi = load_recipe(TINY, [f"run.out_dir={tmp_path}", "run.name=hi", "model.img_size=42",
                            f"assemble.init_from={init}"])
    modules = interop.init_modules(interop.pin_init(hi, "assemble"), "assemble")
    pos = model.state_dict()["pos_embed"]
    assert modules[0]["pos_embed"].shape == (1, 37, 32) and pos.shape == (1, 17, 32)
    assert torch.equal(modules[0]["pos_embed"], resample_abs_pos_embed(pos, new_size=(6, 6), num_prefix_tokens=1))
    source = M.split_modules(model, [1, 2])
    assert all(torch.equal(v, source[m][k]) for m in (0, 1) for k, v in modules[m].items() if k != "pos_embed")

    with pytest.raises(ShardError, match="assemble.init_from_sha256 ffff"):
        interop.pin_init(load_recipe(TINY, [f"run.out_dir={tmp_path}", f"assemble.init_from={init}",
                                            "assemble.init_from_sha256=" + "f" * 64]), "assemble")
    meta = phases.export_dir(src, "meta")
    save_shards(meta, M.split_modules(M.build_meta(src.model), [1, 1]), model_cfg=src.model, layout=[1, 1],
                phase="meta", step=0, recipe=src.to_dict(), metrics={})
    with pytest.raises(ShardError, match="written by phase 'meta'; e2e.init_from needs a whole target"):
        interop.init_modules(load_recipe(TINY, [f"run.out_dir={tmp_path}", f"e2e.init_from={meta}"]), "e2e")
    with pytest.raises(ShardError, match="model.embed_dim is 32 in the shard set but 48"):
        interop.init_modules(load_recipe(TINY, [f"run.out_dir={tmp_path}", "model.embed_dim=48",
                                                f"assemble.init_from={init}"]), "assemble")


@pytest.mark.parametrize("section", ["assemble", "e2e"])
def test_fine_tune_at_a_higher_resolution_from_a_lower_resolution_shard_set(tmp_path, dist_info, section):
    src, model = _assembled_run(tmp_path)
    init = phases.export_dir(src, "assemble")
    run = getattr(phases, f"run_{section}")

    def hi(name, *ov):
        return load_recipe(TINY, [f"run.out_dir={tmp_path}", f"run.name={name}", "model.img_size=42",
                                  f"{section}.init_from={init}", "data.train_limit=256", "data.eval_limit=128",
                                  f"{section}.epochs=1", *ov])
    # lr 0: the exported model is the model the fine-tune started from
    start = hi("start", f"{section}.lr=0.0")
    run(start, dist_info)
    got, manifest = load_modules(phases.export_dir(start, section), model_cfg=start.model, modules=[0, 1])
    pos = model.state_dict()["pos_embed"]
    assert torch.equal(got[0]["pos_embed"], resample_abs_pos_embed(pos, new_size=(6, 6), num_prefix_tokens=1))
    assert torch.equal(got[1]["head.weight"], model.state_dict()["head.weight"])
    assert manifest["model"]["img_size"] == 42
    assert manifest["recipe"][section]["init_from_sha256"] == read_manifest(init)["manifest_sha256"]

    tuned = hi("tuned")  # a real fine-tune: 4 steps at 42 px
    metrics = run(tuned, dist_info)
    assert metrics["steps"] == 4 and metrics["eval_samples"] == 128
    assert metrics["pipeline_device_hours"] > 2.0  # the 28 px run's 2.0 device-hours come first
    after, _ = load_modules(phases.export_dir(tuned, section), model_cfg=tuned.model, modules=[0, 1])
    assert not torch.equal(after[0]["pos_embed"], got[0]["pos_embed"]), "nothing trained"

    # the init set is part of what the result depends on: another one at the same path is refused
    _assembled_run(tmp_path, seed=4)
    with pytest.raises(ValueError, match=f"other settings \\({section}.init_from_sha256"):
        run(hi("tuned"), dist_info)


@pytest.mark.slow
def test_command_lines_import_then_export(tmp_path):
    """The two entry points as a user runs them: the paper's fine-tuned ViT in, a timm model out."""
    model = paper_vit(3, seed=7)
    f = save_paper(tmp_path / "vit_tiny.pth", model, [1, 2])
    run = ["run.name=paper", f"run.out_dir={tmp_path}"]
    res = launch("import_paper.py", str(TINY), str(f), "--as", "assemble", *run)
    assert res.returncode == 0, res.stderr
    assert "[import]" in res.stdout and "norm_eps=1e-06 are taken from the recipe" in res.stdout
    bad = launch("import_paper.py", str(TINY), str(f), "--as", "assemble", *run, "model.num_classes=100")
    assert bad.returncode == 2 and "model.num_classes" in bad.stderr and "Traceback" not in bad.stderr
    out = tmp_path / "timm"
    res = launch("export.py", str(tmp_path / "paper"), str(out))
    assert res.returncode == 0, res.stderr
    assert f"local-dir:{out}" in res.stdout
    same_logits(timm.create_model(f"local-dir:{out}", pretrained=True), model, torch.randn(2, 1, 28, 28))
    res = launch("export.py", str(tmp_path / "nothing"), str(tmp_path / "out2"))
    assert res.returncode == 1 and "no shard set" in res.stderr and "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "out2")
