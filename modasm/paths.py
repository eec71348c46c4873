"""Where each phase's outputs live, derived from the recipe (never globbed):
``<out_dir>/<run>/meta``, ``…/incubate/module-XX``, ``…/assemble``, ``…/e2e``; each with ``export/`` (its
shard set), ``ckpt/`` (resume state) and ``metrics.jsonl``."""
from __future__ import annotations

from pathlib import Path

from .config import Recipe


def phase_dir(recipe: Recipe, phase: str, module: int | None = None) -> Path:
    d = recipe.run_dir / phase
    return d / f"module-{module:02d}" if module is not None else d


def export_dir(recipe: Recipe, phase: str, module: int | None = None) -> Path:
    return phase_dir(recipe, phase, module) / "export"
