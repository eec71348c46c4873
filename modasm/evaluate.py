"""Evaluate any phase's shard set: meta, hybrid(k), assembled or E2E, on the sharded val set."""
from __future__ import annotations

from . import model as M
from .config import Recipe
from .data import build_datasets, eval_loader
from .dist import DistInfo
from .errors import UserError
from .phases import export_dir, load_meta
from .shards import load_modules
from .train import evaluate


def build_from_shards(recipe: Recipe, phase: str, module: int | None = None):
    cfg, K = recipe.model, recipe.model.K
    if phase == "meta":
        return _load(recipe, "meta", M.meta_layout(K))
    if phase == "incubate":
        if module is None or not 0 <= module < K:
            raise UserError(f"--phase incubate needs --module k with 0 <= k < {K}")
        mod, _ = load_modules(export_dir(recipe, "incubate", module), model_cfg=cfg, modules=[module],
                              phase="incubate")
        meta = load_meta(recipe)
        meta[module] = mod[module]
        model = M.build_vit(cfg, M.hybrid_layout(cfg.split, module))
        for m, state in meta.items():
            M.load_module_state(model, M.hybrid_layout(cfg.split, module), m, state, source=f"module {m}")
        return model
    return _load(recipe, phase, list(cfg.split))


def _load(recipe: Recipe, phase: str, layout: list[int]):
    modules, _ = load_modules(export_dir(recipe, phase), model_cfg=recipe.model, modules=list(range(len(layout))),
                              phase=phase)
    model = M.build_vit(recipe.model, layout)
    for m, state in modules.items():
        M.load_module_state(model, layout, m, state, source=f"{export_dir(recipe, phase)} module {m}")
    return model


def run(recipe: Recipe, info: DistInfo, phase: str, module: int | None = None) -> dict:
    model = build_from_shards(recipe, phase, module).to(info.device)
    _, val = build_datasets(recipe.data, recipe.model.img_size, recipe.run.seed, recipe.aug)
    loader = eval_loader(val, recipe.data.eval_batch_size, info.rank, info.world, recipe.data.num_workers)
    metrics = evaluate(model, loader, info, max_bad_fraction=recipe.data.max_bad_fraction, dataset=val)
    if info.is_main:
        what = phase if module is None else f"{phase}[{module}]"
        print(f"{what}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
              f"loss {metrics['eval_loss']:.4f}  ({metrics['eval_samples']} samples)", flush=True)
    return metrics
