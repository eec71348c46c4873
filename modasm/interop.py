"""Adapters at the edge: the paper's checkpoints in, plain timm ViTs out, fine-tunes from another resolution.

Import (``launch/import_paper.py``): a checkpoint of LeapLabTHU/Model-Assembling (``utils.save_model``: a
``torch.save``d dict whose ``model_stages`` is a list of K module-local state dicts, ``model`` the whole
model's, plus optimizer/scheduler/scaler state that is ignored) becomes the shard set of the phase it
belongs to, with the current recipe recorded, so the next phase of this pipeline starts from it. The file
is read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code; a file that
needs more is refused. Every tensor's name and shape is checked against the recipe's model, and the
first mismatch is named in the recipe's terms (width, depth, split, qkv bias, classes, patch, resolution).

Export (``launch/export.py``): an assemble or E2E shard set becomes a plain timm ``VisionTransformer``
state dict in ``model.safetensors`` next to the ``config.json`` that timm reads (``local-dir:`` and Hugging
Face Hub layout: architecture, model_args, pretrained_cfg).

Start a fine-tune from another run (``assemble.init_from`` / ``e2e.init_from``): the target shard set of
another run, verified like every hand-off except for the image size; at another resolution its position
embedding is resampled with timm's ``resample_abs_pos_embed`` (bicubic with antialiasing, as timm's own
ViT loader does; the paper's code interpolates bicubic without antialiasing). The init set's manifest
digest is part of what the phase's result depends on (``init_from_sha256``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
import zipfile
from pathlib import Path

import torch

from . import model as M
from .config import ModelConfig, Recipe
from .errors import UserError
from .paths import export_dir
from .integrity import atomic_write, sha256
from .shards import ShardError, load_modules, read_manifest, save_shards

IMPORT_AS = ("meta", "incubate", "assemble", "e2e")
TARGET_PHASES = ("assemble", "e2e")  # phases whose shard set is the whole target (layout = split)
TIMM_NORM_EPS = 1e-6  # the LayerNorm eps timm's VisionTransformer builds when config.json names none
_SIZES = {(192, 3, 12): "tiny", (384, 6, 12): "small", (768, 12, 12): "base", (1024, 16, 24): "large",
          (1280, 16, 32): "huge"}


# ---------------------------------------------------------------- import: the paper's checkpoints


def import_layout(cfg: ModelConfig, phase: str, module: int | None) -> list[int]:
    """Blocks per module of the model a checkpoint of ``phase`` holds (meta, hybrid(k) or target)."""
    if phase not in IMPORT_AS:
        raise UserError(f"--as {phase!r} is not a phase that can be imported; valid: {', '.join(IMPORT_AS)}")
    if phase == "incubate":
        if module is None or not 0 <= module < cfg.K:
            raise UserError(f"--as incubate needs --module k with 0 <= k < {cfg.K} (the recipe's model.split "
                             f"{cfg.split} has K={cfg.K} modules): the incubated module is model_stages[k] of "
                             "hybrid(k)")
        return M.hybrid_layout(cfg.split, module)
    if module is not None:
        raise UserError(f"--module is for --as incubate only (--as {phase} imports all {cfg.K} modules)")
    return M.meta_layout(cfg.K) if phase == "meta" else list(cfg.split)


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` of a checkpoint file; anything that needs code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:  # mmap: a training checkpoint's optimizer state is never read into memory
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        lines = [s.strip() for s in str(e).splitlines() if "GLOBAL" in s or "Unsupported" in s]
        raise UserError(
            f"{path}: refused: unpickling it needs code ({lines[0] if lines else 'not plain tensors'}). Only tensors "
            "and plain containers are read (torch.load weights_only=True), so nothing in the file ran. If you trust "
            "its origin, re-save just its weights with the code that wrote it, e.g. torch.save({'model_stages': "
            "ckpt['model_stages']}, 'weights.pth'), and import that") from None
    except (RuntimeError, EOFError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise UserError(f"{path}: not a readable torch checkpoint ({why})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict with 'model_stages' or 'model'")
    return ckpt


def _tensors(state, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path}: {what} is not a state dict (names -> tensors)")
    return dict(state)


def _block_count(state: dict, where: str) -> int:
    idx = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if idx and idx != set(range(max(idx) + 1)):
        raise UserError(f"{where}: block indices {sorted(idx)} are not 0..{max(idx)}")
    return len(idx)


def paper_modules(ckpt: dict, path: Path, layout: list[int]) -> list[dict[str, torch.Tensor]]:
    """The module-local state dicts of a checkpoint: ``model_stages`` (the paper's format) or, for a plain
    timm/DeiT checkpoint without it, ``model`` (or the dict itself) split by the recipe's layout."""
    if ckpt.get("model_stages"):
        stages = ckpt["model_stages"]
        if not isinstance(stages, (list, tuple)):
            raise UserError(f"{path}: 'model_stages' is a {type(stages).__name__}, not a list of module state dicts")
        return [_tensors(s, path, f"model_stages[{m}]") for m, s in enumerate(stages)]
    flat = ckpt.get("model", ckpt if "pos_embed" in ckpt else None)
    if flat is None:
        raise UserError(f"{path}: has neither 'model_stages' nor 'model' (keys: {sorted(ckpt)[:8]})")
    flat = {k: v for k, v in _tensors(flat, path, "'model'").items() if not k.startswith("stages.")}
    depth = _block_count(flat, f"{path}: 'model'")
    if depth != sum(layout):
        raise UserError(f"{path}: depth: the file's model has {depth} blocks, the recipe's model has {sum(layout)} "
                         f"(layout {layout}); the file has no 'model_stages' to tell its split")
    stages = [{} for _ in layout]
    for name, t in flat.items():
        try:
            m, local = M.owner(name, layout)
        except AssertionError:
            raise UserError(f"{path}: tensor {name!r} of 'model' belongs to no module of a timm ViT") from None
        stages[m][local] = t
    return stages


def _find(stages, suffix: str):
    """(module, name, shape) of the first tensor whose name ends with ``suffix``, or None."""
    for m, s in enumerate(stages):
        for name, t in s.items():
            if name == suffix or name.endswith("." + suffix):
                return m, name, tuple(t.shape)
    return None


def check_modules(stages: list[dict], cfg: ModelConfig, layout: list[int], path: Path, what: str) -> None:
    """Every tensor's name and shape against the recipe's model; raises ValueError naming the first mismatch."""
    K = len(layout)
    if len(stages) != K:
        raise UserError(f"{path}: split: the file holds {len(stages)} modules (model_stages), the recipe's "
                         f"model.split {cfg.split} has K={K}")
    if (hit := _find(stages, "norm1.weight") or _find(stages, "cls_token")) and hit[2][-1] != cfg.embed_dim:
        raise UserError(f"{path}: model.embed_dim: the file's width is {hit[2][-1]} ({hit[1]} of module {hit[0]} "
                         f"is {list(hit[2])}), the recipe's is {cfg.embed_dim}")
    got = [_block_count(s, f"{path}: model_stages[{m}]") for m, s in enumerate(stages)]
    if got != layout:
        kind = "depth" if sum(got) != sum(layout) else "split"
        raise UserError(f"{path}: {kind}: the file's modules have {got} blocks (depth {sum(got)}); {what} with "
                         f"model.split={cfg.split} needs {layout} (depth {sum(layout)})")
    bias = _find(stages, "attn.qkv.bias")
    if bool(bias) != cfg.qkv_bias:
        has = f"have a qkv bias ({bias[1]} of module {bias[0]})" if bias else "have no qkv bias"
        raise UserError(f"{path}: model.qkv_bias: the file's blocks {has}, the recipe says model.qkv_bias="
                         f"{str(cfg.qkv_bias).lower()} (the paper's ViT-B/L have one, its ViT-H/14 has none)")
    if (head := stages[-1].get("head.weight")) is not None and head.shape[0] != cfg.num_classes:
        raise UserError(f"{path}: model.num_classes: the file's head has {head.shape[0]} outputs (head.weight of "
                         f"module {K - 1} is {list(head.shape)}), the recipe's is {cfg.num_classes}")
    if (proj := stages[0].get("patch_embed.proj.weight")) is not None and proj.ndim == 4 and \
            (proj.shape[-1], proj.shape[1]) != (cfg.patch_size, cfg.in_chans):
        raise UserError(f"{path}: model.patch_size/in_chans: the file's patch_embed.proj.weight is {list(proj.shape)} "
                         f"(patch {proj.shape[-1]}, {proj.shape[1]} channels), the recipe's is patch {cfg.patch_size}, "
                         f"{cfg.in_chans} channels")
    if (pos := stages[0].get("pos_embed")) is not None and pos.ndim == 3:
        grid, want = math.isqrt(pos.shape[1] - 1), cfg.img_size // cfg.patch_size
        if pos.shape[1] != want * want + 1:
            raise UserError(f"{path}: model.img_size: the file's pos_embed {list(pos.shape)} is a {grid}x{grid} grid "
                             f"({grid * cfg.patch_size} px at patch {cfg.patch_size}), the recipe's model.img_size="
                             f"{cfg.img_size} is {want}x{want}. Import it with its own resolution (model.img_size="
                             f"{grid * cfg.patch_size}) and fine-tune at {cfg.img_size} from that shard set "
                             "(assemble.init_from)")
    if (fc1 := _find(stages, "mlp.fc1.weight")) and fc1[2][0] != int(cfg.embed_dim * cfg.mlp_ratio):
        raise UserError(f"{path}: model.mlp_ratio: the file's MLP hidden width is {fc1[2][0]} ({fc1[1]} of module "
                         f"{fc1[0]}), the recipe's is {int(cfg.embed_dim * cfg.mlp_ratio)} (mlp_ratio {cfg.mlp_ratio})")
    with torch.device("meta"):
        ref = M.build_vit(cfg, layout)
    for m, state in enumerate(stages):
        expected = M.expected_module_shapes(ref, layout, m)
        for name in sorted(set(expected) | set(state)):
            if name not in state:
                raise UserError(f"{path}: module {m}: tensor {name!r} of the recipe's model is missing from the file")
            if name not in expected:
                raise UserError(f"{path}: module {m}: tensor {name!r} {list(state[name].shape)} of the file is not in "
                                 "the recipe's model (a plain timm VisionTransformer)")
            if tuple(state[name].shape) != expected[name]:
                raise UserError(f"{path}: module {m}: tensor {name!r} is {list(state[name].shape)} in the file, "
                                 f"{list(expected[name])} in the recipe's model")


def import_paper(recipe: Recipe, path: str | Path, phase: str, module: int | None = None,
                 force: bool = False) -> Path:
    """Write the checkpoint at ``path`` as the shard set of ``phase`` (module ``module`` for incubate) where
    that phase's output belongs, recording the recipe: the pipeline treats the phase as done."""
    path = Path(path)
    layout = import_layout(recipe.model, phase, module)
    what = f"--as {phase}" + (f" --module {module}" if module is not None else "")
    ckpt = read_checkpoint(path)
    stages = paper_modules(ckpt, path, layout)
    check_modules(stages, recipe.model, layout, path, what)
    out = export_dir(recipe, phase, module)
    try:
        existing = read_manifest(out)
    except ShardError:
        existing = {"phase": "?", "step": "?"}  # a corrupt set: replace it only when asked to
    if existing is not None and not force:
        raise UserError(f"{out} already holds a shard set (phase {existing['phase']}, step {existing['step']}); "
                         "move it aside, or pass --force to replace it")
    keep = [module] if phase == "incubate" else range(len(layout))
    epoch = ckpt.get("epoch")
    # fp32 copies: off the memory map, and no two tensors share storage (safetensors refuses that)
    save_shards(out, {m: {k: v.detach().to(torch.float32, copy=True) for k, v in stages[m].items()} for m in keep},
                model_cfg=recipe.model, layout=layout, phase=phase, step=0, recipe=recipe.to_dict(),
                metrics={"imported_from": str(path.resolve()), "imported_sha256": sha256(path),
                         "imported_epoch": epoch if isinstance(epoch, int) else None})
    return out


# ---------------------------------------------------------------- export: a plain timm ViT


def manifest_model(manifest: dict, where: Path) -> ModelConfig:
    """The ModelConfig a shard set was made with (from the recipe its manifest records)."""
    try:
        return ModelConfig(**manifest["recipe"]["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{where / 'manifest.json'}: its recipe has no usable model section ({e})") from None


def timm_architecture(cfg: ModelConfig) -> str:
    """A registered timm ViT name of this size if there is one (cosmetic: model_args carry the whole shape)."""
    import timm
    size = _SIZES.get((cfg.embed_dim, cfg.num_heads, sum(cfg.split)))
    for name in ([f"vit_{size}_patch{cfg.patch_size}_{cfg.img_size}", f"vit_{size}_patch{cfg.patch_size}_224"]
                 if size else []):
        if timm.is_model(name):
            return name
    return "vit_base_patch16_224"


def _preprocessing(recipe: dict, in_chans: int) -> dict:
    """mean/std/interpolation/crop of the recipe's evaluation transform, as timm's pretrained_cfg keys."""
    data, aug = recipe.get("data", {}), recipe.get("aug", {})
    if data.get("source", "fashion-mnist") == "fashion-mnist":
        from .data.fmnist import MEAN as FMNIST_MEAN
        from .data.fmnist import STD as FMNIST_STD
        return {"mean": [FMNIST_MEAN] * in_chans, "std": [FMNIST_STD] * in_chans, "interpolation": "bilinear",
                "crop_pct": 1.0, "crop_mode": "center"}
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    interp = aug.get("interpolation", "bicubic")
    return {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
            "interpolation": "bicubic" if interp == "random" else interp, "crop_pct": aug.get("crop_pct", 0.875),
            "crop_mode": "center"}


def timm_config(cfg: ModelConfig, manifest: dict) -> dict:
    """timm's config.json (Hugging Face layout) for the target of ``cfg``."""
    model_args = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
                  "num_classes": cfg.num_classes, "embed_dim": cfg.embed_dim, "depth": sum(cfg.split),
                  "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias,
                  "class_token": True, "global_pool": "token"}
    pretrained_cfg = {"input_size": [cfg.in_chans, cfg.img_size, cfg.img_size], "fixed_input_size": True,
                      "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj", "classifier": "head",
                      **_preprocessing(manifest["recipe"], cfg.in_chans)}
    return {"architecture": timm_architecture(cfg), "num_classes": cfg.num_classes, "num_features": cfg.embed_dim,
            "global_pool": "token", "model_args": model_args, "pretrained_cfg": pretrained_cfg,
            "modasm": {"phase": manifest["phase"], "step": manifest["step"], "split": cfg.split,
                       "norm_eps": cfg.norm_eps, "manifest_sha256": manifest["manifest_sha256"],
                       "metrics": {k: manifest["metrics"][k] for k in ("top1", "top5") if k in manifest["metrics"]}}}


def create_lines(config: dict, out: Path) -> list[str]:
    """The timm.create_model calls that rebuild the exported model (Python source)."""
    args = ", ".join(f"{k}={v!r}" for k, v in config["model_args"].items())
    norm = "" if config["modasm"]["norm_eps"] == TIMM_NORM_EPS else \
        f", norm_layer=functools.partial(torch.nn.LayerNorm, eps={config['modasm']['norm_eps']!r})"
    overlay = (f"dict(file={str(out / 'model.safetensors')!r}, num_classes={config['num_classes']}, "
               f"input_size={tuple(config['pretrained_cfg']['input_size'])})")
    return [f"timm.create_model({config['architecture']!r}, pretrained=True, pretrained_cfg_overlay={overlay}, "
            f"{args}{norm})",
            f"timm.create_model({'local-dir:' + str(out)!r}, pretrained=True{norm})"]


def export_timm(run_dir: str | Path, phase: str, out: str | Path) -> dict:
    """Write the ``phase`` (assemble or e2e) shard set of ``run_dir`` as a plain timm ViT into ``out``:
    ``model.safetensors`` + ``config.json`` (+ ``README.md`` with the timm.create_model lines)."""
    from safetensors.torch import save_file
    if phase not in TARGET_PHASES:
        raise UserError(f"--phase {phase!r}: only a whole target exports as a timm ViT ({', '.join(TARGET_PHASES)})")
    run_dir, out = Path(run_dir), Path(out).resolve()
    shard_dir = run_dir if (run_dir / "manifest.json").is_file() else run_dir / phase / "export"
    manifest = read_manifest(shard_dir)
    if manifest is None:
        raise ShardError(f"{shard_dir}: no shard set (no manifest.json); finish the {phase} phase of {run_dir} first")
    cfg = manifest_model(manifest, shard_dir)
    modules, manifest = load_modules(shard_dir, model_cfg=cfg, modules=list(range(cfg.K)), phase=manifest["phase"])
    if manifest["phase"] not in TARGET_PHASES or manifest["layout"] != list(cfg.split):
        raise ShardError(f"{shard_dir / 'manifest.json'}: phase {manifest['phase']!r} with layout {manifest['layout']} "
                         f"is not a whole target (an assemble or e2e shard set of layout {cfg.split})")
    state = {M.global_name(k, cfg.split, m): v.contiguous() for m, s in modules.items() for k, v in s.items()}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in M.build_target(cfg).state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise ShardError(f"{shard_dir}: its tensors do not form the recipe's timm VisionTransformer")
    config = timm_config(cfg, manifest)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    lines = create_lines(config, out)
    note = "" if cfg.norm_eps == TIMM_NORM_EPS else (
        f"\nThe model's LayerNorm eps is {cfg.norm_eps}; config.json cannot name it (timm builds {TIMM_NORM_EPS} "
        "from it), so pass the norm_layer shown above for exact logits.\n")
    readme = (f"# {config['architecture']} (modasm {manifest['phase']}, split {cfg.split})\n\nExported from "
              f"{shard_dir} (manifest_sha256 {manifest['manifest_sha256']}).\n\n```python\nimport functools, timm, "
              "torch\n" + "\n".join(f"model = {line}" for line in lines) + "\n```\n" + note)
    atomic_write(out / "README.md", lambda p: p.write_text(readme))
    return {"out": out, "config": config, "lines": lines, "norm_note": note.strip()}


# ---------------------------------------------------------------- fine-tune from another run (init_from)


def pin_init(recipe: Recipe, section: str) -> Recipe:
    """The recipe with ``<section>.init_from_sha256`` set to the init shard set's manifest digest (what the
    phase's result depends on); a pinned digest that differs is an error. No init_from: unchanged."""
    sec = getattr(recipe, section)
    if not sec.init_from:
        return recipe
    manifest = read_manifest(sec.init_from)
    if manifest is None:
        raise ShardError(f"{section}.init_from={sec.init_from}: no shard set there (no manifest.json); run or import "
                         "the phase that makes it first (e.g. launch/import_paper.py RECIPE FILE --as assemble)")
    digest = manifest["manifest_sha256"]
    if sec.init_from_sha256 and sec.init_from_sha256 != digest:
        raise ShardError(f"{Path(sec.init_from) / 'manifest.json'}: manifest_sha256 {digest[:12]}… is not the "
                         f"{section}.init_from_sha256 {sec.init_from_sha256[:12]}… the recipe pins")
    return dataclasses.replace(recipe, **{section: dataclasses.replace(sec, init_from_sha256=digest)})


def resample_pos_embed(pos_embed: torch.Tensor, patch_size: int, old_img: int, new_img: int) -> torch.Tensor:
    """A class-token ViT's position embedding from an old_img to a new_img grid, by timm's own function."""
    from timm.layers import resample_abs_pos_embed
    old, new = old_img // patch_size, new_img // patch_size
    return resample_abs_pos_embed(pos_embed, new_size=[new, new], old_size=[old, old], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=True).contiguous()


def init_modules(recipe: Recipe, section: str) -> dict[int, dict[str, torch.Tensor]]:
    """The K target modules ``<section>.init_from`` holds, verified (hashes, model, split; its image size
    may differ) and with the position embedding resampled to the recipe's image size."""
    sec, cfg = getattr(recipe, section), recipe.model
    where = Path(sec.init_from)
    manifest = read_manifest(where)
    if manifest is None:
        raise ShardError(f"{section}.init_from={where}: no shard set there (no manifest.json)")
    if manifest["phase"] not in TARGET_PHASES:
        raise ShardError(f"{where / 'manifest.json'}: written by phase {manifest['phase']!r}; {section}.init_from "
                         "needs a whole target (an assemble or e2e shard set)")
    src = manifest["model"]
    if src.get("patch_size") != cfg.patch_size or not isinstance(src.get("img_size"), int) \
            or src["img_size"] % cfg.patch_size:
        raise ShardError(f"{where / 'manifest.json'}: model.patch_size is {src.get('patch_size')!r} (image size "
                         f"{src.get('img_size')!r}) in the shard set but {cfg.patch_size} in the recipe")
    at_src = dataclasses.replace(cfg, img_size=src["img_size"])
    modules, manifest = load_modules(where, model_cfg=at_src, modules=list(range(cfg.K)))
    if manifest["layout"] != list(cfg.split):
        raise ShardError(f"{where / 'manifest.json'}: layout {manifest['layout']} is not the target's {cfg.split}")
    if sec.init_from_sha256 and manifest["manifest_sha256"] != sec.init_from_sha256:
        raise ShardError(f"{where / 'manifest.json'}: changed while the phase started (manifest_sha256 "
                         f"{manifest['manifest_sha256'][:12]}…, expected {sec.init_from_sha256[:12]}…)")
    if src["img_size"] != cfg.img_size:
        modules[0]["pos_embed"] = resample_pos_embed(modules[0]["pos_embed"], cfg.patch_size, src["img_size"],
                                                     cfg.img_size)
    return modules


def init_cost(recipe: Recipe, section: str, key: str = "device_hours") -> float | None:
    """What lies behind the init shard set (its pipeline's cumulative ``key``: 'device_hours' or 'train_flops'),
    or None without init_from."""
    init = getattr(getattr(recipe, section), "init_from", "")
    if not init:
        return None
    metrics = (read_manifest(init) or {}).get("metrics", {})
    return float(metrics.get(f"pipeline_{key}", metrics.get(key, 0.0)) or 0.0)
