"""The learning rate: timm's CosineLRScheduler, stepped as the paper's main.py steps it (or per step).

The expected values come from the paper's formula written out here (timm 0.3.2's CosineLRScheduler as the
paper's code builds it: warm-up from --warmup-lr over --warmup-epochs, cosine over all --epochs including the
warm-up, ``lr_scheduler.step(epoch)`` after each epoch), not from the code under test.
"""
import math

import pytest
import torch

from conftest import ROOT
from modasm import engine as ds
from modasm import model as M
from modasm import phases, seeds
from modasm.config import PHASES, load_recipe
from modasm.metrics import read_jsonl
from modasm.shards import load_modules

RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))  # every shipped recipe


def paper_curve(t: float, peak: float, cfg) -> float:
    """The schedule's value at t (epochs, or optimizer steps with every length in steps)."""
    if t < cfg["warmup"]:
        return cfg["warmup_lr"] + t * (peak - cfg["warmup_lr"]) / cfg["warmup"]
    return cfg["min_lr"] + 0.5 * (peak - cfg["min_lr"]) * (1 + math.cos(math.pi * t / cfg["length"]))


def paper_lr_of_epoch(e: int, peak: float, cfg) -> float:
    """The paper steps the scheduler after epoch e-1, so epoch e trains at the value at e-1 (epoch 0: at 0)."""
    return paper_curve(max(e - 1, 0), peak, cfg)


def schedule_of(phase_cfg, steps_per_epoch: int):
    model = torch.nn.Linear(2, 2)
    peak = phase_cfg.lr * phase_cfg.batch_size / 512
    return ds.Schedule(torch.optim.AdamW(model.parameters(), lr=peak), phase_cfg, steps_per_epoch), peak


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("phase", PHASES)
def test_lr_of_every_epoch_matches_the_papers_formula(recipe, phase):
    cfg = getattr(load_recipe(ROOT / "recipes" / f"{recipe}.yaml"), phase)
    spe = 7  # a few optimizer steps per epoch: the loop's calls, in the loop's order
    sched, peak = schedule_of(cfg, spe)
    if cfg.lr_schedule == "epoch":
        formula = dict(warmup=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, length=cfg.epochs)
        expected = lambda step: paper_lr_of_epoch(step // spe, peak, formula)  # noqa: E731
    else:
        formula = dict(warmup=int(round(cfg.warmup_epochs * spe)), warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                       length=cfg.epochs * spe)
        expected = lambda step: paper_curve(step, peak, formula)  # noqa: E731
    for step in range(cfg.epochs * spe):
        assert sched.lr == pytest.approx(expected(step), rel=1e-12), (recipe, phase, step)
        sched.after_step(step + 1)
        if (step + 1) % spe == 0:
            sched.after_epoch((step + 1) // spe - 1)
    # a resume at any step sets the same lr as running there
    for step in sorted({0, spe - 1, spe, 2 * spe + 3, cfg.epochs * spe - 1} & set(range(cfg.epochs * spe))):
        fresh, _ = schedule_of(cfg, spe)
        fresh.restore(step)
        assert fresh.lr == pytest.approx(expected(step), rel=1e-12), (recipe, phase, step)


def test_paper_default_is_per_epoch_with_the_lag_and_warmup_from_1e_6():
    cfg = load_recipe(ROOT / "recipes" / "vit-b16.yaml").incubate
    assert cfg.lr_schedule == "epoch" and cfg.warmup_lr == 1e-6 and cfg.warmup_epochs == 20
    sched, peak = schedule_of(cfg, 1)
    lrs = []
    for e in range(cfg.epochs):
        lrs.append(sched.lr)
        sched.after_epoch(e)
    assert lrs[0] == lrs[1] == 1e-6                             # the paper's first two epochs
    assert lrs[20] == pytest.approx(1e-6 + 19 * (peak - 1e-6) / 20)  # the last warm-up value (t = 19)
    # then the cosine at t = 20 of 100, counted from 0, not from the end of the warm-up: the peak is never used
    assert lrs[21] == pytest.approx(cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * 0.2)))
    assert max(lrs) < peak and lrs[60] < lrs[30] < lrs[22] < lrs[21]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["step", "epoch"])
def test_lr_at_each_optimizer_step_under_accumulation(tiny, dist_info, mode):
    """Through the real loop with 2 micro-batches per optimizer step: the lr logged for every step (the one
    the optimizer is given for it) equals the formula."""
    recipe = tiny("e2e.accum_steps=2", "e2e.batch_size=64", f"e2e.lr_schedule={mode}", "e2e.warmup_epochs=1",
                  "e2e.epochs=3", "e2e.log_every_steps=1", "e2e.min_lr=1e-4", "data.train_limit=128")
    phases.run_e2e(recipe, dist_info)
    recs = read_jsonl(phases.phase_dir(recipe, "e2e") / "metrics.jsonl")
    start = next(r for r in recs if r["kind"] == "start")
    spe = start["steps_per_epoch"]
    assert start["accum_steps"] == 2 and spe == 2
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    peak = recipe.e2e.lr * 64 / 512
    for r in train:
        if mode == "step":
            want = paper_curve(r["step"] - 1, peak, dict(warmup=spe, warmup_lr=1e-6, min_lr=1e-4, length=3 * spe))
        else:
            want = paper_lr_of_epoch((r["step"] - 1) // spe, peak, dict(warmup=1, warmup_lr=1e-6, min_lr=1e-4,
                                                                         length=3))
        assert r["lr"] == pytest.approx(want, rel=1e-9), r


@pytest.mark.slow
def test_the_scheduled_lr_is_the_one_adam_applies(tiny, dist_info):
    """One optimizer step at the warm-up's first lr (1e-6, far below the peak): Adam's first update moves each
    weight by lr x g / (|g| + eps), so the largest move is that lr, not the peak's."""
    recipe = tiny("e2e.batch_size=64", "e2e.warmup_epochs=1", "e2e.epochs=1", "e2e.weight_decay=0",
                  "data.train_limit=64", "e2e.lr_schedule=step")
    phases.run_e2e(recipe, dist_info)
    torch.manual_seed(seeds.init(recipe.run.seed, phases.PHASES["e2e"].salt(None)))
    before = M.build_target(recipe.model).state_dict()
    after, _ = load_modules(phases.export_dir(recipe, "e2e"), model_cfg=recipe.model, modules=[0, 1], phase="e2e")
    moved = max((after[m][k] - before[M.global_name(k, recipe.model.split, m)]).abs().max().item()
                for m in (0, 1) for k in after[m])
    assert moved == pytest.approx(1e-6, rel=0.02)
