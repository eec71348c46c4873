"""Training compute of the method's phases, counted before anything runs, and the budget-matched E2E baseline.

Each phase's cost is its model's training FLOPs per image (``perf.trace_step`` on a meta-device copy: what the
phase's own meter counts and logs as ``train_flops``) times the images of its optimizer steps (epochs x steps per
epoch x global batch). Counted FLOPs are deterministic and the same on any machine, so a budget fixed from them
does not depend on how loaded the machine was, unlike device-hours (which are measured and reported next to them).

``e2e.budget: b`` gives E2E b times the assembled path's compute (meta + all K incubations + fine-tune): its
epochs are fixed from the count before it starts, so its learning-rate schedule has that length.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import model as M
from .config import Recipe
from .errors import UserError


@dataclass(frozen=True)
class PhaseCompute:
    label: str               # meta, incubate[k], assemble, e2e
    flops_per_image: float   # forward + backward of one training image, counted
    images: int              # trained images: optimizer steps x global batch

    @property
    def flops(self) -> float:
        return self.flops_per_image * self.images


def _models(recipe: Recipe) -> dict[str, torch.nn.Module]:
    """Each phase's model as it trains (frozen modules included), on the meta device: no memory, no arithmetic."""
    cfg = recipe.model
    with torch.device("meta"):
        out = {"meta": M.build_meta(cfg, recipe.meta.drop_path)}
        out.update({f"incubate[{k}]": M.build_hybrid(cfg, k, None, recipe.incubate.drop_path) for k in range(cfg.K)})
        out["assemble"] = M.build_target(cfg, recipe.assemble.drop_path)
        out["e2e"] = M.build_target(cfg, recipe.e2e.drop_path)
    return out


def _images(recipe: Recipe, section: str, n_train: int, epochs: int | None = None) -> int:
    from .engine import plan
    cfg = getattr(recipe, section)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    return plan(cfg, 1, section, n_train).total * cfg.batch_size  # steps do not depend on the rank count


def compute(recipe: Recipe, n_train: int) -> dict[str, PhaseCompute]:
    """Counted training compute of every phase of ``recipe`` on ``n_train`` training samples (E2E at e2e.epochs)."""
    from .perf import trace_step
    out = {}
    for label, model in _models(recipe).items():
        section = label.split("[")[0]
        out[label] = PhaseCompute(label, trace_step(model).flops_per_image, _images(recipe, section, n_train))
    return out


def assembled_flops(phases: dict[str, PhaseCompute]) -> float:
    return sum(p.flops for label, p in phases.items() if label != "e2e")


def e2e_epochs(recipe: Recipe, n_train: int) -> tuple[int, str]:
    """E2E's epochs under ``e2e.budget`` and a line saying how they follow from the count."""
    if recipe.assemble.init_from:
        raise UserError("e2e.budget matches the assembled path's compute (meta + incubations + fine-tune), but "
                        "assemble.init_from fine-tunes another run's target, which has none here: set e2e.epochs")
    phases = compute(recipe, n_train)
    target = recipe.e2e.budget * assembled_flops(phases)
    per_epoch = phases["e2e"].flops_per_image * _images(recipe, "e2e", n_train, epochs=1)
    epochs = max(1, round(target / per_epoch))
    inc = sum(p.flops for label, p in phases.items() if label.startswith("incubate["))
    why = (f"e2e.budget={recipe.e2e.budget:g} x the assembled path's counted training compute (meta "
           f"{phases['meta'].flops:.3g} + incubation {inc:.3g} + fine-tune {phases['assemble'].flops:.3g} = "
           f"{assembled_flops(phases):.3g} FLOPs) -> e2e.epochs={epochs} ({epochs * per_epoch:.3g} FLOPs, "
           f"{per_epoch:.3g} per epoch)")
    return epochs, why


def resolve(recipe: Recipe, n_train: int) -> tuple[Recipe, str]:
    """The recipe with e2e.epochs fixed by e2e.budget (unchanged when the budget is 0), and why."""
    if not recipe.e2e.budget:
        return recipe, ""
    epochs, why = e2e_epochs(recipe, n_train)
    return dataclasses.replace(recipe, e2e=dataclasses.replace(recipe.e2e, epochs=epochs)), why
