"""The phases of the method, each a function of the recipe: meta, incubate(k), assemble, e2e.

Each builds its model, reads what it needs from the previous phase's shard sets (verified before
any training), runs the shared loop and writes its own shard set. Paths come from the recipe:
``<out_dir>/<run>/meta``, ``…/incubate/module-XX``, ``…/assemble``, ``…/e2e``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import interop
from . import model as M
from .config import Recipe, fingerprint
from .data import build_datasets
from . import dist
from .dist import DistInfo
from .metrics import MetricsLog, WandbRun, wandb_mode
from .shards import ShardError, load_modules, read_manifest, save_shards
from .train import Job, finished, train


def phase_dir(recipe: Recipe, phase: str, module: int | None = None) -> Path:
    d = recipe.run_dir / phase
    return d / f"module-{module:02d}" if module is not None else d


def export_dir(recipe: Recipe, phase: str, module: int | None = None) -> Path:
    return phase_dir(recipe, phase, module) / "export"


def _exporter(recipe: Recipe, phase: str, layout: list[int], out: Path, only: int | None = None):
    def export(model: torch.nn.Module, step: int, metrics: dict) -> None:
        modules = M.split_modules(model, layout)
        if only is not None:
            modules = {only: modules[only]}
        save_shards(out / "export", {m: {k: v.float() for k, v in s.items()} for m, s in modules.items()},
                    model_cfg=recipe.model, layout=layout, phase=phase, step=step,
                    recipe=recipe.to_dict(), metrics=metrics)
    return export


def _cached_datasets(recipe: Recipe):
    """A zero-argument loader that reads the datasets on first call only (phases with work to do)."""
    return functools.lru_cache(maxsize=1)(lambda: build_datasets(recipe.data, recipe.model.img_size, recipe.run.seed,
                                                                   recipe.aug))


def _datasets(recipe: Recipe, data):
    """(train, val) from ``data`` (a loader shared by the pipeline) or, if None, read now."""
    return (data or _cached_datasets(recipe))()


def _logger(recipe: Recipe, label: str, section: str, out: Path):
    """JSON lines of the phase, mirrored to a W&B run (group = pipeline, job_type = phase) on rank 0."""
    def make(info: DistInfo) -> MetricsLog:
        wb = None
        if info.is_main and wandb_mode(recipe.logging.wandb.mode) != "disabled":
            wb = WandbRun(recipe.logging.wandb, run_dir=recipe.run_dir, group=recipe.logging.wandb.group or recipe.run.name,
                          job_type=section, label=label, out=out, config=recipe.to_dict())
        return MetricsLog(out / "metrics.jsonl", label, info.is_main, recipe.logging.progress, wb)
    return make


def upstream_hours(recipe: Recipe, section: str) -> float:
    """Device-hours the pipeline spent before this phase: meta for incubation; meta + all incubations
    for the fine-tune; nothing for meta and E2E (from the verified upstream manifests). A fine-tune from
    another run's target (``init_from``): that run's cumulative hours."""
    if (hours := interop.init_hours(recipe, section)) is not None:
        return hours
    dirs = {"meta": [], "e2e": [], "incubate": [export_dir(recipe, "meta")],
            "assemble": [export_dir(recipe, "meta")] + [export_dir(recipe, "incubate", k) for k in range(recipe.model.K)]}
    return sum((read_manifest(d) or {}).get("metrics", {}).get("device_hours", 0.0) for d in dirs[section])


def _job(recipe: Recipe, label: str, section: str, out: Path, model, export) -> Job:
    return Job(label=label, section=section, out=out, model=model, cfg=getattr(recipe, section),
               ds=recipe.deepspeed, export=export, seed=recipe.run.seed, workers=recipe.data.num_workers,
               eval_batch=recipe.data.eval_batch_size, fingerprint=fingerprint(recipe.to_dict(), section),
               base_hours=upstream_hours(recipe, section), make_log=_logger(recipe, label, section, out),
               aug=recipe.aug, num_classes=recipe.model.num_classes, max_bad_fraction=recipe.data.max_bad_fraction)


def _finished(recipe: Recipe, section: str, out: Path, label: str, info: DistInfo) -> dict | None:
    return finished(out, label, info, fingerprint(recipe.to_dict(), section), section)


def _seed(recipe: Recipe, salt: int) -> None:
    # Same initial weights on every rank (DeepSpeed also broadcasts them) and across re-runs.
    torch.manual_seed(recipe.run.seed * 7919 + salt)


def run_meta(recipe: Recipe, info: DistInfo, data=None) -> dict:
    out = phase_dir(recipe, "meta")
    if (done := _finished(recipe, "meta", out, "meta", info)) is not None:
        return done
    data = _datasets(recipe, data)
    _seed(recipe, 1)
    model = M.build_meta(recipe.model, recipe.meta.drop_path).to(info.device)
    layout = M.meta_layout(recipe.model.K)
    return train(_job(recipe, "meta", "meta", out, model, _exporter(recipe, "meta", layout, out)), *data, info)


def load_meta(recipe: Recipe) -> dict[int, dict[str, torch.Tensor]]:
    modules, _ = load_modules(export_dir(recipe, "meta"), model_cfg=recipe.model,
                              modules=list(range(recipe.model.K)), phase="meta")
    return modules


def run_incubate(recipe: Recipe, k: int, info: DistInfo, data=None) -> dict:
    K = recipe.model.K
    if not 0 <= k < K:
        raise ValueError(f"--module {k} is out of range: the recipe's split has K={K} modules (0..{K - 1})")
    out = phase_dir(recipe, "incubate", k)
    label = f"incubate[{k}]"
    if (done := _finished(recipe, "incubate", out, label, info)) is not None:
        return done
    meta = load_meta(recipe)  # verified before anything trains
    data = _datasets(recipe, data)
    _seed(recipe, 100 + k)
    model = M.build_hybrid(recipe.model, k, meta, recipe.incubate.drop_path).to(info.device)
    layout = M.hybrid_layout(recipe.model.split, k)
    return train(_job(recipe, label, "incubate", out, model,
                      _exporter(recipe, "incubate", layout, out, only=k)), *data, info)


def load_incubated(recipe: Recipe) -> dict[int, dict[str, torch.Tensor]]:
    """All K incubated modules, each verified (hash, split, width, module index) before use."""
    missing = [k for k in range(recipe.model.K) if read_manifest(export_dir(recipe, "incubate", k)) is None]
    if missing:
        raise ShardError(
            f"incubation is not complete: module(s) {missing} of K={recipe.model.K} have no shard set "
            f"({export_dir(recipe, 'incubate', missing[0])}/manifest.json is missing). Incubate them first: "
            f"`python launch/incubate.py RECIPE --module {missing[0]}` (Slurm: `sbatch --array="
            f"{','.join(map(str, missing))} slurm/incubate.sh RECIPE`), then re-run this command")
    modules = {}
    for k in range(recipe.model.K):
        got, _ = load_modules(export_dir(recipe, "incubate", k), model_cfg=recipe.model, modules=[k],
                              phase="incubate")
        modules[k] = got[k]
    return modules


def run_assemble(recipe: Recipe, info: DistInfo, data=None) -> dict:
    recipe = interop.pin_init(recipe, "assemble")  # the init set's digest joins the fingerprint
    out = phase_dir(recipe, "assemble")
    if (done := _finished(recipe, "assemble", out, "assemble", info)) is not None:
        return done
    modules = interop.init_modules(recipe, "assemble") if recipe.assemble.init_from else load_incubated(recipe)
    data = _datasets(recipe, data)
    model = M.build_target(recipe.model, recipe.assemble.drop_path, modules).to(info.device)
    return train(_job(recipe, "assemble", "assemble", out, model,
                      _exporter(recipe, "assemble", recipe.model.split, out)), *data, info)


def run_e2e(recipe: Recipe, info: DistInfo, data=None) -> dict:
    recipe = interop.pin_init(recipe, "e2e")
    out = phase_dir(recipe, "e2e")
    if (done := _finished(recipe, "e2e", out, "e2e", info)) is not None:
        return done
    modules = interop.init_modules(recipe, "e2e") if recipe.e2e.init_from else None
    data = _datasets(recipe, data)
    _seed(recipe, 2)
    model = M.build_target(recipe.model, recipe.e2e.drop_path, modules).to(info.device)
    return train(_job(recipe, "e2e", "e2e", out, model, _exporter(recipe, "e2e", recipe.model.split, out)),
                 *data, info)


def module_cost(split: list[int], k: int) -> int:
    """Relative cost of incubating module k: blocks in its hybrid (its d_k blocks + the K-1 meta blocks).

    Every hybrid runs the same K-1 frozen meta blocks, so the trained module's depth decides which job is
    longest; equal depths cost the same.
    """
    return split[k] + len(split) - 1


def deal(split: list[int], groups: int) -> list[list[int]]:
    """Modules per group, longest first onto the least-loaded group (LPT: the slowest group finishes as
    early as this greedy rule allows, within 4/3 of optimal). Equal depths give g, g+G, g+2G, ..."""
    load, out = [0] * groups, [[] for _ in range(groups)]
    for k in sorted(range(len(split)), key=lambda k: (-module_cost(split, k), k)):
        g = min(range(groups), key=lambda g: (load[g], g))
        out[g].append(k)
        load[g] += module_cost(split, k)
    return out


def run_incubate_all(recipe: Recipe, info: DistInfo, module: int | None = None) -> dict[int, dict]:
    """Array mode (``module`` = k): all ranks incubate module k. Farm mode: the ranks split into module
    groups (recipe ``incubate.groups``), each incubating its dealt modules in turn, independently.

    Returns metrics per module this rank took part in; stops early when a module was interrupted.
    """
    K = recipe.model.K
    if module is not None:
        return {module: run_incubate(recipe, module, info)}
    G = recipe.incubate.groups or dist.default_groups(K, info.world)
    if G > K:
        raise ValueError(f"incubate.groups={G} is more than the K={K} modules: at most {K} groups have work")
    info = dist.split_world(info, G)
    mine = deal(recipe.model.split, G)[info.module_group]
    if info.is_main:
        first, last = info.global_rank - info.rank, info.global_rank - info.rank + info.world - 1
        ranks = f"rank {first}" if first == last else f"ranks {first}-{last}"
        print(f"[incubate] group {info.module_group + 1}/{G} ({ranks}): modules {mine}", flush=True)
    data = _cached_datasets(recipe)
    results = {}
    for k in mine:
        results[k] = run_incubate(recipe, k, info, data)
        if results[k].get("interrupted"):
            break
    return results


def run_pipeline(recipe: Recipe, info: DistInfo) -> None:
    """Every phase in order in one process (the demo); each still hands off through its shard set."""
    data = _cached_datasets(recipe)
    if not recipe.assemble.init_from:  # a fine-tune from another run's target needs no meta/incubation
        if run_meta(recipe, info, data).get("interrupted"):
            return
        for k in range(recipe.model.K):
            if run_incubate(recipe, k, info, data).get("interrupted"):
                return
    if not run_assemble(recipe, info, data).get("interrupted"):
        run_e2e(recipe, info, data)
