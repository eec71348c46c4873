"""The phases of the method, each a function of the recipe: meta, incubate(k), assemble, e2e.

Each builds its model, reads what it needs from the previous phase's shard sets (verified before
any training), runs the shared loop and writes its own shard set. Paths come from the recipe:
``<out_dir>/<run>/meta``, ``…/incubate/module-XX``, ``…/assemble``, ``…/e2e``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import budget, dist, interop, seeds
from . import model as M
from .config import Recipe, fingerprint
from .data import build_datasets
from .dist import DistInfo
from .errors import UserError
from .metrics import MetricsLog, WandbRun, wandb_mode
from .paths import export_dir, phase_dir
from .shards import ShardError, load_modules, read_manifest, save_shards
from .train import Job, finished, train


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


def _logger(recipe: Recipe, label: str, section: str, out: Path):
    """JSON lines of the phase, mirrored to a W&B run (group = pipeline, job_type = phase) on rank 0."""
    def make(info: DistInfo, run_id: str | None = None) -> MetricsLog:  # run_id: the resumed phase's W&B run
        wb = None
        if info.is_main and wandb_mode(recipe.logging.wandb.mode) != "disabled":
            wb = WandbRun(recipe.logging.wandb, run_dir=recipe.run_dir, group=recipe.logging.wandb.group or recipe.run.name,
                          job_type=section, label=label, out=out, config=recipe.to_dict(), run_id=run_id)
        return MetricsLog(out / "metrics.jsonl", label, info.is_main, recipe.logging.progress, wb)
    return make


def upstream(recipe: Recipe, section: str, key: str = "device_hours") -> float:
    """What the pipeline spent before this phase (``key``: 'device_hours' measured, or 'train_flops' counted):
    meta for incubation; meta + all incubations for the fine-tune; nothing for meta and E2E (from the verified
    upstream manifests). A fine-tune from another run's target (``init_from``): that run's cumulative cost."""
    if (spent := interop.init_cost(recipe, section, key)) is not None:
        return spent
    dirs = {"meta": [], "e2e": [], "incubate": [export_dir(recipe, "meta")],
            "assemble": [export_dir(recipe, "meta")] + [export_dir(recipe, "incubate", k) for k in range(recipe.model.K)]}
    return sum((read_manifest(d) or {}).get("metrics", {}).get(key, 0.0) or 0.0 for d in dirs[section])


def _job(recipe: Recipe, label: str, section: str, out: Path, model, export) -> Job:
    return Job(label=label, section=section, out=out, model=model, cfg=getattr(recipe, section),
               ds=recipe.deepspeed, export=export, seed=recipe.run.seed, workers=recipe.data.num_workers,
               eval_batch=recipe.data.eval_batch_size, fingerprint=fingerprint(recipe.to_dict(), section),
               base_hours=upstream(recipe, section),
               base_flops=upstream(recipe, section, "train_flops"), make_log=_logger(recipe, label, section, out),
               aug=recipe.aug, num_classes=recipe.model.num_classes, max_bad_fraction=recipe.data.max_bad_fraction,
               speed=recipe.speed, peak_tflops=recipe.run.peak_tflops)


def load_meta(recipe: Recipe) -> dict[int, dict[str, torch.Tensor]]:
    modules, _ = load_modules(export_dir(recipe, "meta"), model_cfg=recipe.model,
                              modules=list(range(recipe.model.K)), phase="meta")
    return modules


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


@dataclass(frozen=True)
class PhaseSpec:
    """What sets one phase apart from the others; ``run_phase`` does the rest the same way for all."""
    name: str                  # its recipe section and directory under runs/<run>/
    salt: Callable[[int | None], int]  # of the seed of its fresh weights (seeds.init); k for incubation
    inputs: Callable[[Recipe, int | None], object]  # upstream shards, loaded and verified before training
    build: Callable[[Recipe, int | None, object], torch.nn.Module]  # (recipe, k, inputs) -> model to train
    layout: Callable[[Recipe, int | None], list[int]]  # blocks per module of that model


_TARGET = lambda recipe, k: list(recipe.model.split)  # noqa: E731
PHASES = {
    "meta": PhaseSpec("meta", lambda k: 1, lambda recipe, k: None,
                      lambda recipe, k, _: M.build_meta(recipe.model, recipe.meta.drop_path),
                      lambda recipe, k: M.meta_layout(recipe.model.K)),
    "incubate": PhaseSpec("incubate", lambda k: 100 + k, lambda recipe, k: load_meta(recipe),
                          lambda recipe, k, meta: M.build_hybrid(recipe.model, k, meta, recipe.incubate.drop_path),
                          lambda recipe, k: M.hybrid_layout(recipe.model.split, k)),
    # the fine-tunes may start from another run's target (init_from: a high-resolution fine-tune)
    "assemble": PhaseSpec("assemble", lambda k: 3,
                          lambda recipe, k: (interop.init_modules(recipe, "assemble") if recipe.assemble.init_from
                                             else load_incubated(recipe)),
                          lambda recipe, k, mods: M.build_target(recipe.model, recipe.assemble.drop_path, mods),
                          _TARGET),
    "e2e": PhaseSpec("e2e", lambda k: 2,
                     lambda recipe, k: interop.init_modules(recipe, "e2e") if recipe.e2e.init_from else None,
                     lambda recipe, k, mods: M.build_target(recipe.model, recipe.e2e.drop_path, mods), _TARGET),
}


def label(phase: str, k: int | None = None) -> str:
    return phase if k is None else f"{phase}[{k}]"


def run_phase(recipe: Recipe, phase: str, info: DistInfo, k: int | None = None, data=None) -> dict:
    """Run one phase (incubation: of module ``k``) to its shard set; a finished phase returns its metrics.

    ``data``: a zero-argument loader of (train, val) shared by the phases of one process (read once).
    """
    spec = PHASES[phase]
    if phase in ("assemble", "e2e"):
        recipe = interop.pin_init(recipe, phase)  # the init shard set's digest joins the fingerprint
    data = data or _cached_datasets(recipe)
    if phase == "e2e" and recipe.e2e.budget:  # its length follows from the assembled path's counted compute
        recipe, why = budget.resolve(recipe, len(data()[0]))
        if info.is_main:
            print(f"[e2e] {why}", flush=True)
    if phase == "incubate" and not 0 <= k < recipe.model.K:
        raise UserError(f"--module {k} is out of range: the recipe's split has K={recipe.model.K} modules "
                        f"(0..{recipe.model.K - 1})")
    out, name = phase_dir(recipe, phase, k), label(phase, k)
    if (done := finished(out, name, info, fingerprint(recipe.to_dict(), phase), phase)) is not None:
        return done
    inputs = spec.inputs(recipe, k)  # verified before anything trains
    train_ds, val_ds = data()
    torch.manual_seed(seeds.init(recipe.run.seed, spec.salt(k)))  # the same weights on every rank and re-run
    model = spec.build(recipe, k, inputs).to(info.device)
    layout = spec.layout(recipe, k)
    return train(_job(recipe, name, phase, out, model, _exporter(recipe, phase, layout, out, only=k)),
                 train_ds, val_ds, info)


def run_meta(recipe: Recipe, info: DistInfo, data=None) -> dict:
    return run_phase(recipe, "meta", info, data=data)


def run_incubate(recipe: Recipe, k: int, info: DistInfo, data=None) -> dict:
    return run_phase(recipe, "incubate", info, k, data)


def run_assemble(recipe: Recipe, info: DistInfo, data=None) -> dict:
    return run_phase(recipe, "assemble", info, data=data)


def run_e2e(recipe: Recipe, info: DistInfo, data=None) -> dict:
    return run_phase(recipe, "e2e", info, data=data)


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


def check_farm(recipe: Recipe, launches: int) -> None:
    """A farm over ``launches`` launches (one torchrun per node) fits the recipe: every launch holds whole module
    groups, and there are at most K groups. Needs no ranks, so slurm/pipeline.sh checks it before submitting."""
    K, G = recipe.model.K, recipe.incubate.groups
    if launches < 1:
        raise UserError(f"a farm needs at least one node, got {launches}")
    if launches > K:
        raise UserError(f"a farm over {launches} nodes has more nodes than the K={K} modules: each node's torchrun "
                        f"holds at least one module group; use --farm-nodes {K} or fewer, or --array (one job per "
                        "module, each on any number of nodes)")
    if G > K:
        raise UserError(f"incubate.groups={G} is more than the K={K} modules: at most {K} groups have work")
    if G and G % launches:
        raise UserError(f"incubate.groups={G} does not split over the farm's {launches} launches (one per node): "
                        f"each launch holds whole module groups; use a multiple of {launches}, or the array mode "
                        "(one job per module) for groups larger than a node")


def farm_groups(recipe: Recipe, world: int, launches: int) -> int:
    """The module groups G of a farm of ``world`` ranks started as ``launches`` torchruns of world / launches ranks
    (one per node): ``incubate.groups``, or the most that fit (the largest G <= K that divides the ranks and is a
    multiple of the launches). Checked as ``check_farm`` does, and each launch's G / launches groups must split its
    ranks equally. launch/estimate.py counts with it too."""
    check_farm(recipe, launches)
    G = recipe.incubate.groups or dist.default_groups(recipe.model.K, world, multiple_of=launches)
    per, here = world // launches, G // launches
    if per % here:
        valid = [g for g in range(launches, recipe.model.K + 1, launches) if per % (g // launches) == 0]
        raise UserError(f"incubate.groups={G}: {here} module groups per node do not split its {per} ranks into equal "
                        f"groups; valid incubate.groups here: {', '.join(map(str, valid))}")
    return G


def run_incubate_all(recipe: Recipe, info: DistInfo, module: int | None = None,
                     part: tuple[int, int] = (0, 1)) -> dict[int, dict]:
    """Array mode (``module`` = k): all ranks incubate module k. Farm mode: the farm's ``incubate.groups``
    module groups each incubate their dealt modules in turn, independently; this launch is ``part`` = (p, P)
    of the farm (one torchrun per node, each with its own rendezvous) and holds groups p*G/P .. (p+1)*G/P - 1,
    formed from its ranks.

    Returns metrics per module this rank took part in; stops early when a module was interrupted.
    """
    p, P = part
    if module is not None:
        if P > 1:  # each launch would train module k into the same directory, deleting the other's checkpoints
            raise UserError(f"--module {module} with --part {p}/{P}: one module trains as one torchrun world over all "
                            "the nodes it runs on (slurm/phase.sh launches --module that way), not once per node; "
                            "drop --part, or drop --module to farm the K modules over the nodes")
        return {module: run_incubate(recipe, module, info)}
    G = farm_groups(recipe, info.world * P, P)
    here = G // P
    if here > 1 and info.nodes > 1:
        raise UserError(f"this torchrun spans {info.nodes} nodes and would hold {here} module groups: groups sharing "
                        "one rendezvous stop when the first node's group finishes (its torchrun agent leaves with the "
                        "rendezvous store). Launch one torchrun per node with --part i/N (slurm/incubate.sh does), "
                        "or one job per module (--module k)")
    info = dist.split_world(info, here)
    g = p * here + info.module_group
    mine = deal(recipe.model.split, G)[g]
    if info.is_main:
        first, last = info.global_rank - info.rank, info.global_rank - info.rank + info.world - 1
        ranks = f"rank {first}" if first == last else f"ranks {first}-{last}"
        where = f" of launch {p + 1}/{P}" if P > 1 else ""
        print(f"[incubate] group {g + 1}/{G} ({ranks}{where}): modules {mine}", flush=True)
    data = _cached_datasets(recipe)
    results = {}
    for k in mine:
        results[k] = run_incubate(recipe, k, info, data)
        if results[k].get("interrupted"):
            break
    return results


def run_pipeline(recipe: Recipe, info: DistInfo, only: tuple[str, ...] = tuple(PHASES)) -> None:
    """Every phase in order in one process (the demo); each still hands off through its shard set.
    ``only``: these phases (e.g. ``("e2e",)``: the baseline alone; ``("meta", "incubate", "assemble")``: the
    assembled path alone)."""
    data = _cached_datasets(recipe)
    fine_tune_only = bool(recipe.assemble.init_from)  # from another run's target: no meta/incubation
    steps = ([] if fine_tune_only else [("meta", None)] + [("incubate", k) for k in range(recipe.model.K)])
    for phase, k in steps + [("assemble", None), ("e2e", None)]:
        if phase in only and run_phase(recipe, phase, info, k, data).get("interrupted"):
            return
