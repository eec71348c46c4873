"""A study: one base recipe x axes. Each cell is an ordinary pipeline under ``<out_dir>/<study>/<cell>/``, run
serially, one process per cell (``launch/pipeline.py``); the aggregate is computed from the cells' own metrics.

    python launch/study.py studies/fmnist-depth.yaml [--cell NAME] [--list] [--aggregate]

A study file (YAML; unknown keys are errors)::

    name: fmnist-depth                  # cells run in <out_dir>/<name>/<cell>/
    base: recipes/study-fmnist.yaml     # the base recipe (relative to the working directory)
    overrides: [data.fraction=0.05]     # for every cell
    replicate: seed                     # the axis averaged over (mean +- std); the other axes group the results
    axes:                               # axis -> value -> its overrides, or {overrides: [...], phases: [...]}
      depth: {8: ["model.split=[2,2,2,2]"], 32: ["model.split=[8,8,8,8]"]}
      seed: {0: [run.seed=0], 1: [run.seed=1]}
      arm: {both: [], e2e-x2: {overrides: [e2e.budget=2.0], phases: [e2e]}}
    grid:                               # the cells in run order: each entry is the product of the listed values
      - {depth: [8, 32], seed: [0, 1], arm: [both]}
      - {depth: [32], seed: [0], arm: [e2e-x2]}
    reuse_from: [fmnist-depth-tune]     # other studies (same out_dir) whose finished phases a cell may take over
    threads: 0                          # intra-op threads per cell (OMP_NUM_THREADS); 0: torch's default
    results: docs/studies/fmnist-depth # what is kept (committed): each finished cell's manifests + metrics.jsonl,
                                        # the table (README.md, summary.json) and the plots

A cell's name is ``axis-value`` joined by ``_`` (``depth-32_seed-0_arm-both``). Re-running the same command skips
every finished cell (its results are kept), resumes an interrupted one (each phase from its newest checkpoint), and
runs the rest. A phase of a cell whose settings equal those of a finished phase elsewhere in the study (or in a
``reuse_from`` study) is taken over from it (its shard set and metrics, copied) instead of being trained again: the
cells of a learning-rate sweep of the fine-tune share one meta model and one incubation.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import PHASES, Recipe, fingerprint, fingerprint_changes, load_recipe
from .errors import UserError
from .metrics import read_jsonl
from .report import save_figure
from .shards import read_manifest

ROOT = Path(__file__).resolve().parents[1]
_KEYS = {"name", "base", "overrides", "replicate", "axes", "grid", "reuse_from", "threads", "out_dir", "results",
         "panel"}


@dataclass(frozen=True)
class Cell:
    name: str
    values: dict            # axis -> value (as a string)
    overrides: tuple        # the base's overrides, then each axis value's
    phases: tuple           # what this cell runs, in pipeline order

    def recipe(self, study: "Study") -> Recipe:
        return load_recipe(study.base, [*self.overrides, f"run.out_dir={study.run_root}", f"run.name={self.name}"])


@dataclass
class Study:
    path: Path
    name: str
    base: Path
    replicate: str
    axes: dict              # axis -> {value: (overrides, phases or None)}
    cells: list
    reuse_from: list = field(default_factory=list)
    threads: int = 0
    out_dir: Path = Path("runs")
    results: Path = Path()
    panel: str = ""

    @property
    def run_root(self) -> Path:
        return self.out_dir / self.name

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise UserError(f"{self.path}: no cell named {name!r}; cells: {', '.join(c.name for c in self.cells)}")


# ---------------------------------------------------------------- the study file


def _value_spec(where: str, spec) -> tuple[tuple, tuple | None]:
    if spec is None:
        return (), None
    if isinstance(spec, list):
        return tuple(str(o) for o in spec), None
    if isinstance(spec, dict):
        unknown = set(spec) - {"overrides", "phases"}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; a value takes 'overrides' and 'phases'")
        phases = spec.get("phases")
        if phases is not None:
            bad = [p for p in phases if p not in PHASES]
            if bad or not phases:
                raise UserError(f"{where}.phases: {phases!r}; choose from {', '.join(PHASES)}")
            phases = tuple(p for p in PHASES if p in phases)
        return tuple(str(o) for o in spec.get("overrides") or ()), phases
    raise UserError(f"{where}: expected a list of overrides or a mapping with 'overrides'/'phases', got {spec!r}")


def load(path: str | Path, root: Path = Path("."), out_dir: str | None = None, results: str | None = None,
         extra: tuple = ()) -> Study:
    """Read and check a study file (every cell's recipe is loaded once, so a bad override fails here).
    ``out_dir`` / ``results``: instead of the file's (e.g. a GPU machine's output folder); ``extra``: overrides
    after every cell's own (e.g. toy sizes for a dry run)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"study file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a study file is a mapping (name, base, axes, ...)")
    unknown = set(raw) - _KEYS
    if unknown:
        raise UserError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {', '.join(sorted(_KEYS))}")
    for key in ("name", "base", "axes"):
        if key not in raw:
            raise UserError(f"{path}: '{key}' is missing")
    name = str(raw["name"])
    if not name or "/" in name:
        raise UserError(f"{path}: name {name!r} must be a plain directory name")
    if not isinstance(raw["axes"], dict) or not raw["axes"]:
        raise UserError(f"{path}: 'axes' must map each axis to its values")
    axes = {}
    for axis, values in raw["axes"].items():
        if not isinstance(values, dict) or not values:
            raise UserError(f"{path}: axes.{axis} must map each value to its overrides")
        axes[str(axis)] = {str(v): _value_spec(f"{path}: axes.{axis}.{v}", spec) for v, spec in values.items()}
    replicate = str(raw.get("replicate", "seed"))
    if replicate not in axes:
        raise UserError(f"{path}: replicate: {replicate!r} is not an axis ({', '.join(axes)})")
    panel = str(raw.get("panel") or next((a for a in axes if a != replicate), replicate))
    if panel not in axes:
        raise UserError(f"{path}: panel: {panel!r} is not an axis ({', '.join(axes)})")
    grid = raw.get("grid") or [{a: list(v) for a, v in axes.items()}]
    base_ov = tuple(str(o) for o in raw.get("overrides") or ())
    cells, seen = [], set()
    for i, entry in enumerate(grid):
        if not isinstance(entry, dict) or set(entry) != set(axes):
            raise UserError(f"{path}: grid[{i}] must list values for every axis ({', '.join(axes)}), got {entry!r}")
        lists = []
        for axis in axes:
            vals = entry[axis] if isinstance(entry[axis], list) else [entry[axis]]
            bad = [v for v in vals if str(v) not in axes[axis]]
            if bad:
                raise UserError(f"{path}: grid[{i}].{axis}: {bad} not among axes.{axis} ({', '.join(axes[axis])})")
            lists.append([str(v) for v in vals])
        for combo in itertools.product(*lists):
            values = dict(zip(axes, combo))
            cell_name = "_".join(f"{a}-{v}" for a, v in values.items())
            if cell_name in seen:
                continue
            seen.add(cell_name)
            ov, phases = list(base_ov), None
            for a, v in values.items():
                own, ph = axes[a][v]
                ov += own
                if ph is not None:
                    phases = ph if phases is None else tuple(p for p in phases if p in ph)
            cells.append(Cell(cell_name, values, (*ov, *extra), phases or tuple(PHASES)))
    study = Study(path=path, name=name, base=root / str(raw["base"]), replicate=replicate, axes=axes, cells=cells,
                  reuse_from=[str(r) for r in raw.get("reuse_from") or []], threads=int(raw.get("threads", 0)),
                  out_dir=root / str(out_dir or raw.get("out_dir", "runs")),
                  results=root / str(results or raw.get("results", f"docs/studies/{name}")), panel=panel)
    for c in cells:
        try:
            c.recipe(study)
        except UserError as e:
            raise UserError(f"{path}: cell {c.name}: {e}") from None
    return study


# ---------------------------------------------------------------- phases of a cell, finished or taken over


def phase_paths(recipe: Recipe, phases: tuple) -> list[tuple[str, str]]:
    """(section, path under the run directory) of every phase output ``phases`` make: incubation per module."""
    out = []
    for p in phases:
        if p == "incubate":
            out += [("incubate", f"incubate/module-{k:02d}") for k in range(recipe.model.K)]
        else:
            out.append((p, p))
    return out


def _same_settings(recipe: Recipe, section: str, manifest: dict) -> list[str]:
    """What differs between ``recipe``'s settings of ``section`` and those that made ``manifest``. Under
    e2e.budget the epochs are derived from the rest (modasm/budget.py), so they are not compared."""
    old, new = fingerprint(manifest["recipe"], section), fingerprint(recipe.to_dict(), section)
    if section == "e2e" and new.get("e2e.budget"):
        old.pop("e2e.epochs", None)
        new.pop("e2e.epochs", None)
    return fingerprint_changes(old, new)


def _donor(study: Study, recipe: Recipe, section: str, sub: str, cell: Cell) -> Path | None:
    """A finished phase output with this cell's settings elsewhere in the study or a reuse_from study."""
    for name in [study.name, *study.reuse_from]:
        root = study.out_dir / name
        if not root.is_dir():
            continue
        for other in sorted(d for d in root.iterdir() if d.is_dir() and not (name == study.name and d.name == cell.name)):
            manifest = read_manifest(other / sub / "export")
            if manifest is not None and not _same_settings(recipe, section, manifest):
                return other / sub
    return None


def take_over(study: Study, cell: Cell, recipe: Recipe, say=print) -> list[str]:
    """Copy every phase this cell lacks from a finished twin (same settings); the labels of those taken."""
    taken = []
    for section, sub in phase_paths(recipe, cell.phases):
        dst = recipe.run_dir / sub
        if read_manifest(dst / "export") is not None:
            continue
        src = _donor(study, recipe, section, sub, cell)
        if src is None:
            continue
        shutil.rmtree(dst / "export", ignore_errors=True)
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / "export", dst / "export")
        shutil.copy2(src / "metrics.jsonl", dst / "metrics.jsonl")
        say(f"[study] {cell.name}: {sub} taken over from {src} (same settings)")
        taken.append(sub)
    return taken


def _results_of(study: Study, cell: Cell) -> Path:
    return study.results / "cells" / cell.name


def finished(study: Study, cell: Cell, recipe: Recipe) -> bool:
    """The cell's results are kept (every phase's manifest): done. Kept results of other settings are an error."""
    kept = _results_of(study, cell)
    manifests = {sub: read_manifest(kept / sub)
                 for _, sub in phase_paths(recipe, cell.phases)}
    if not all(manifests.values()):
        return False
    for section, sub in phase_paths(recipe, cell.phases):
        changes = _same_settings(recipe, section, manifests[sub])
        if changes:
            raise UserError(f"the kept results of cell {cell.name} ({kept / sub}) were made with other settings "
                            f"({'; '.join(changes[:4])}): restore the study file, or remove {kept} to redo the cell")
    return True


def keep(study: Study, cell: Cell, recipe: Recipe) -> None:
    """Copy the finished cell's manifests and metrics.jsonl (no weights) into the study's results."""
    kept = _results_of(study, cell)
    tmp = kept.with_name(kept.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for _, sub in phase_paths(recipe, cell.phases):
        src = recipe.run_dir / sub
        (tmp / sub).mkdir(parents=True)
        shutil.copy2(src / "export" / "manifest.json", tmp / sub / "manifest.json")
        shutil.copy2(src / "metrics.jsonl", tmp / sub / "metrics.jsonl")
    shutil.rmtree(kept, ignore_errors=True)
    tmp.rename(kept)


# ---------------------------------------------------------------- running


def run_cell(study: Study, cell: Cell, python: str = sys.executable) -> int:
    """The cell's pipeline as its own process (resumes what an earlier run left); its exit code."""
    recipe = cell.recipe(study)
    take_over(study, cell, recipe)
    cmd = [python, str(ROOT / "launch" / "pipeline.py"), str(study.base), *cell.overrides,
           f"run.out_dir={study.run_root}", f"run.name={cell.name}", "--phases", ",".join(cell.phases)]
    env = dict(os.environ)
    if study.threads:
        env["OMP_NUM_THREADS"] = str(study.threads)
    print(f"[study] {cell.name}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    # a stop request to the study (SIGTERM from `timeout` or Slurm, SIGUSR1) is the cell's: it saves at its next
    # optimizer step and exits; the study then stops (re-running resumes the cell)
    forward = lambda sig, _frame: proc.send_signal(sig)  # noqa: E731
    before = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def run(study: Study, only: str | None = None, python: str = sys.executable, first: int = 0) -> int:
    """Run the cells that are not finished (``only``: that one; ``first``: only the grid's first N), keeping each
    finished cell's results and re-writing the aggregate after it. 0 when every cell asked for is finished."""
    cells = [study.cell(only)] if only else study.cells[:first or None]
    for i, cell in enumerate(cells):
        recipe = cell.recipe(study)
        if finished(study, cell, recipe):
            print(f"[study] {cell.name}: finished (results in {_results_of(study, cell)}); skipped", flush=True)
            continue
        print(f"[study] cell {i + 1}/{len(cells)}: {cell.name}", flush=True)
        rc = run_cell(study, cell, python)
        missing = [sub for _, sub in phase_paths(recipe, cell.phases)
                   if read_manifest(recipe.run_dir / sub / "export") is None]
        if rc != 0 or missing:  # a stop request ends a phase early with exit 0: the cell is not finished
            print(f"[study] {cell.name} stopped (exit {rc}{'; not finished: ' + ', '.join(missing) if missing else ''});"
                  " re-run the same command to resume it", flush=True)
            return rc or 1
        keep(study, cell, recipe)
        write(study)
    write(study)
    return 0


def status_lines(study: Study) -> list[str]:
    out = []
    for cell in study.cells:
        recipe = cell.recipe(study)
        if finished(study, cell, recipe):
            state = "finished"
        else:
            have = [sub for _, sub in phase_paths(recipe, cell.phases) if read_manifest(recipe.run_dir / sub / "export")]
            state = f"{len(have)} of {len(phase_paths(recipe, cell.phases))} phase outputs" if have else "not started"
        out.append(f"{cell.name:<40} {','.join(cell.phases):<28} {state}")
    return out


# ---------------------------------------------------------------- the aggregate (from the kept results only)


PATHS = {"assembled": "assemble", "E2E": "e2e"}


@dataclass
class Outcome:
    """One path of one cell: its final accuracy, best evaluation, counted FLOPs and device-hours (whole path)."""
    top1: float
    best: float
    flops: float
    hours: float


def outcome(kept: Path, path: str) -> Outcome | None:
    sub = PATHS[path]
    if not (kept / sub / "manifest.json").is_file():
        return None
    m = json.loads((kept / sub / "manifest.json").read_text())["metrics"]
    cumul = path == "assembled"  # the assembled path's cost is the pipeline's: meta + incubations + fine-tune
    return Outcome(top1=m["top1"], best=m.get("best_top1") or m["top1"],
                   flops=m["pipeline_train_flops" if cumul else "train_flops"],
                   hours=m["pipeline_device_hours" if cumul else "device_hours"])


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def summarise(study: Study) -> list[dict]:
    """One row per group (the non-replicate axes' values) and path, over the replicates with kept results; then
    the paired per-replicate difference assembled - E2E where a group has both."""
    groups: dict[tuple, dict] = {}
    for cell in study.cells:
        key = tuple((a, v) for a, v in cell.values.items() if a != study.replicate)
        g = groups.setdefault(key, {p: {} for p in PATHS})
        kept = _results_of(study, cell)
        for path in PATHS:
            if (o := outcome(kept, path)) is not None:
                g[path][cell.values[study.replicate]] = o
    rows = []
    for key, g in groups.items():
        group = dict(key)
        for path, by_rep in g.items():
            if not by_rep:
                continue
            reps = sorted(by_rep)
            outs = [by_rep[r] for r in reps]
            rows.append({**group, "path": path, "n": len(outs), study.replicate + "s": reps,
                         "top1": mean_std([o.top1 for o in outs]), "best": mean_std([o.best for o in outs]),
                         "flops": mean_std([o.flops for o in outs]), "hours": mean_std([o.hours for o in outs]),
                         "per_replicate": {r: dataclasses.asdict(by_rep[r]) for r in reps}})
        both = sorted(set(g["assembled"]) & set(g["E2E"]))
        if both:
            diffs = [g["assembled"][r].top1 - g["E2E"][r].top1 for r in both]
            rows.append({**group, "path": "assembled - E2E (paired)", "n": len(both), study.replicate + "s": both,
                         "top1": mean_std(diffs), "diffs": dict(zip(both, diffs)),
                         "hours_ratio": mean_std([g["assembled"][r].hours / g["E2E"][r].hours for r in both]),
                         "flops_ratio": mean_std([g["assembled"][r].flops / g["E2E"][r].flops for r in both])})
    return rows


def _pm(ms: tuple[float, float], spec: str = ".2f", sign: bool = False) -> str:
    m, s = ms
    return f"{m:+{spec}} ± {s:{spec}}" if sign else f"{m:{spec}} ± {s:{spec}}"


def markdown(study: Study, rows: list[dict]) -> str:
    axes = [a for a in study.axes if a != study.replicate]
    head = [*axes, "path", f"{study.replicate}s", "top-1 % (last epoch), mean ± std [best epoch]",
            "train FLOPs", "device-hours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(axes) + "---|---:|---:|---:|---:|"]
    for r in rows:
        cols = [str(r[a]) for a in axes] + [r["path"], str(r["n"])]
        if "diffs" in r:
            cols += [f"{_pm(r['top1'], sign=True)}",
                     f"x {r['flops_ratio'][0]:.2f} (assembled / E2E)", f"x {r['hours_ratio'][0]:.2f} ± {r['hours_ratio'][1]:.2f}"]
        else:
            cols += [f"{_pm(r['top1'])} [{r['best'][0]:.2f}]", f"{r['flops'][0]:.3g}", f"{_pm(r['hours'], '.4f')}"]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _curve(kept: Path, sub: str) -> list[tuple[float, float, float]]:
    """(pipeline device-hours, pipeline train FLOPs, top-1) of every evaluation of a phase, in step order."""
    by_step = {}
    for r in read_jsonl(kept / sub / "metrics.jsonl"):
        if r.get("kind") == "eval":
            by_step[r["step"]] = (r["pipeline_device_hours"], r.get("pipeline_train_flops"), r["top1"])
    return [by_step[s] for s in sorted(by_step)]


def _mean_curve(curves: list[list[tuple]]) -> tuple[list, list, list]:
    """Mean x (device-hours), mean and std of top-1 at each evaluation index shared by all replicates."""
    n = min(len(c) for c in curves)
    xs, ms, ss = [], [], []
    for i in range(n):
        xs.append(sum(c[i][0] for c in curves) / len(curves))
        m, s = mean_std([c[i][2] for c in curves])
        ms.append(m)
        ss.append(s)
    return xs, ms, ss


def _band(ax, curve: tuple[list, list, list], color: str, label: str, marker: str = "o") -> None:
    """A mean curve with a +-std band."""
    xs, ms, ss = curve
    ax.plot(xs, ms, marker=marker, ms=3, color=color, label=label)
    ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], color=color, alpha=0.2)


def _kept_with(study: Study, cells: list[Cell], sub: str) -> list[Path]:
    return [_results_of(study, c) for c in cells if (_results_of(study, c) / sub / "manifest.json").is_file()]


def plot(study: Study, rows: list[dict], out: Path) -> list[Path]:
    """top-1 vs cumulative device-hours, one panel per value of the panel axis (E2E: mean +- std band per variant of
    the other axes; the assembled path: meta, each hybrid, fine-tune); and, when the panel axis is numeric, top-1
    (last epoch, mean +- std) vs that axis for both paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    panels = list(dict.fromkeys(c.values[study.panel] for c in study.cells))
    others = [a for a in study.axes if a not in (study.panel, study.replicate)]
    variant = lambda c: tuple(c.values[a] for a in others)  # noqa: E731
    variants = list(dict.fromkeys(variant(c) for c in study.cells))
    name = lambda v: ", ".join(f"{a} {x}" for a, x in zip(others, v))  # noqa: E731
    e2e_colors = dict(zip(variants, itertools.cycle(["tab:red", "tab:purple", "tab:brown", "tab:olive"])))
    fig, axs = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, pv in zip(axs[0], panels):
        for v in variants:
            cells = [c for c in study.cells if c.values[study.panel] == pv and variant(c) == v]
            if e2e := _kept_with(study, cells, "e2e"):
                _band(ax, _mean_curve([_curve(k, "e2e") for k in e2e]), e2e_colors[v],
                      f"E2E {name(v)} (n={len(e2e)})".replace("  ", " "))
            if asm := _kept_with(study, cells, "assemble"):
                xs, ms, _ = _mean_curve([_curve(k, "meta") for k in asm])
                ax.plot(xs, ms, marker="s", ms=3, color="tab:gray", label="meta model")
                for k in range(len(list((asm[0] / "incubate").iterdir()))):
                    pts = [_curve(a, f"incubate/module-{k:02d}")[-1] for a in asm]
                    m, sd = mean_std([p[2] for p in pts])
                    ax.errorbar([sum(p[0] for p in pts) / len(pts)], [m], yerr=[sd], fmt="^", ms=4, color="tab:green",
                                alpha=0.8, label="hybrids (after incubation)" if k == 0 else None)
                _band(ax, _mean_curve([_curve(a, "assemble") for a in asm]), "tab:blue",
                      f"assembled, fine-tuned (n={len(asm)})")
        ax.set(title=f"{study.panel} {pv}", xlabel="cumulative device-hours (wall x ranks)", ylabel="test top-1 %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    files.append(save_figure(fig, out / "top1_vs_device_hours.png"))

    if all(_is_number(v) for v in panels):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for path, color, marker in (("assembled", "tab:blue", "o"), ("E2E", "tab:red", "s")):
            for v in variants:
                pts = sorted((float(r[study.panel]), r["top1"]) for r in rows
                             if r["path"] == path and tuple(r[a] for a in others) == v)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], capsize=3,
                                marker=marker, color=e2e_colors[v] if path == "E2E" else color,
                                label=f"{path} {name(v)}".strip())
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({float(v) for v in panels}), [str(v) for v in sorted(panels, key=float)])
        ax.set(xlabel=study.panel, ylabel="test top-1 % (last epoch), mean ± std", title=f"top-1 vs {study.panel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        files.append(save_figure(fig, out / f"top1_vs_{study.panel}.png"))
    return files


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def write(study: Study) -> Path | None:
    """The aggregate of the kept results: summary.json, README.md (table + plots). None before any cell is kept."""
    rows = summarise(study)
    if not rows:
        return None
    out = study.results
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    plots = plot(study, rows, out)
    done = sum((_results_of(study, c)).is_dir() for c in study.cells)
    text = [f"# Study {study.name}", "",
            f"Made by `python launch/study.py {study.path}` from {done} of {len(study.cells)} cells' own metrics "
            f"(`cells/<cell>/<phase>/metrics.jsonl` and `manifest.json`). Base recipe: `{study.base}`.", "",
            markdown(study, rows), "",
            f"top-1: the last epoch's test accuracy, mean ± sample std over {study.replicate}s; in brackets the mean "
            "of each run's best evaluation (the paper reports the best epoch). The assembled path's train FLOPs and "
            "device-hours are the whole path's (meta + every incubation + fine-tune); E2E's are its own. Paired: "
            f"assembled - E2E per {study.replicate}, and the ratios of their FLOPs and device-hours.", ""]
    text += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "README.md").write_text("\n".join(text) + "\n")
    return out / "README.md"
