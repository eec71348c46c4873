"""Where a pipeline stands: each phase (each incubated module) done, resumable at step N, or not started.

Read from disk only (shard manifests and resume checkpoints), so it answers for a pipeline running
anywhere, e.g. on a Slurm cluster (``slurm/pipeline.sh`` runs it as the pipeline's check job).
"""
from __future__ import annotations

import shlex

from .config import Recipe
from .engine import complete_steps
from .paths import export_dir, phase_dir
from .redact import redact
from .shards import read_manifest


def phases_of(recipe: Recipe) -> list[tuple[str, str, int | None]]:
    """(label, section, module) in pipeline order."""
    K = recipe.model.K
    return ([("meta", "meta", None)] + [(f"incubate[{k}]", "incubate", k) for k in range(K)]
            + [("assemble", "assemble", None), ("e2e", "e2e", None)])


def status(recipe: Recipe) -> dict[str, str]:
    """label -> 'done (top-1 x %)' | 'resumable at step N' | 'not started'."""
    out = {}
    for label, section, k in phases_of(recipe):
        manifest = read_manifest(export_dir(recipe, section, k))
        steps = complete_steps(phase_dir(recipe, section, k) / "ckpt")
        if manifest is not None:
            top1 = manifest["metrics"].get("top1")
            out[label] = "done" + (f" (top-1 {top1:.2f} %)" if top1 is not None else "")
        elif steps:
            out[label] = f"resumable at step {steps[-1]}"
        else:
            out[label] = "not started"
    return out


def require(recipe: Recipe, section: str, recipe_path: str, overrides: list[str]) -> str | None:
    """None when ``section`` (and what it needs) is done; else a message saying what is missing and the
    commands that finish it."""
    st = status(recipe)
    chain = list(st)[:-1]  # meta, incubate[0..K-1], assemble: each needs all before it
    if recipe.assemble.init_from:  # a fine-tune of another run's target (e.g. high resolution) needs only that
        chain = ["assemble"]
    needed = {"meta": chain[:1], "incubate": chain[:-1], "assemble": chain, "e2e": ["e2e"],
              "all": chain + ["e2e"]}[section]
    missing = [label for label in needed if not st[label].startswith("done")]
    if not missing:
        return None
    args = " ".join(shlex.quote(a) for a in [recipe_path, *overrides])
    lines = [f"pipeline {recipe.run.name}: not complete: " + ", ".join(f"{m} {st[m]}" for m in missing)]
    if "meta" in missing:
        lines.append(f"  finish the meta model: sbatch slurm/meta.sh {args}")
    mods = [label[9:-1] for label in missing if label.startswith("incubate[")]
    if mods:
        lines.append(f"  finish incubation of module(s) {', '.join(mods)} (each resumes where it stopped): "
                     f"sbatch --array={','.join(mods)} slurm/incubate.sh {args}")
    if "assemble" in missing:
        lines.append(f"  then assemble and fine-tune: sbatch slurm/assemble.sh {args}")
    if "e2e" in missing:
        lines.append(f"  the E2E baseline: sbatch slurm/e2e.sh {args}")
    lines.append(f"  logs: {recipe.run_dir / 'slurm'} (pipeline.sh) or slurm-<job>.out; "
                 f"or the whole chain again: slurm/pipeline.sh {args}")
    return redact("\n".join(lines))  # a Slurm log (the check job): no secret expanded into an override
