"""The budget-matched E2E baseline (modasm/budget.py) and the study runner (modasm/study.py, launch/study.py)."""
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, launch_env
from modasm import budget, phases
from modasm.config import load_recipe
from modasm.errors import UserError
from modasm.metrics import read_jsonl


def _done(run: Path, sub: str) -> dict:
    return next(r for r in read_jsonl(run / sub / "metrics.jsonl") if r["kind"] == "done")


def _start(run: Path, sub: str) -> dict:
    return [r for r in read_jsonl(run / sub / "metrics.jsonl") if r["kind"] == "start"][-1]


def test_e2e_budget_matches_the_assembled_paths_counted_flops(incubated, tmp_path, dist_info):
    """e2e.budget=b: E2E's counted training FLOPs are within half an epoch's worth of b x the assembled path's
    (meta + incubations + fine-tune, as each phase logged them), its schedule has that length, and the count made
    before anything ran is what the phases logged."""
    shutil.copytree(incubated / "tiny", tmp_path / "tiny")
    ov = [f"run.out_dir={tmp_path}", "logging.wandb.mode=disabled"]
    phases.run_assemble(load_recipe(TINY, ov), dist_info)
    run = tmp_path / "tiny"
    asm = _done(run, "assemble")
    logged = {"meta": _done(run, "meta")["train_flops"], "assemble": asm["train_flops"],
              **{f"incubate[{k}]": _done(run, f"incubate/module-{k:02d}")["train_flops"] for k in (0, 1)}}
    assert asm["pipeline_train_flops"] == pytest.approx(sum(logged.values()), rel=1e-12)
    counted = budget.compute(load_recipe(TINY, ov), 512)
    assert {k: v.flops for k, v in counted.items() if k != "e2e"} == pytest.approx(logged, rel=1e-12)
    per_epoch = counted["e2e"].flops_per_image * 512  # tiny: 8 steps of 64 images an epoch
    for b in (1.0, 2.0):
        out = tmp_path / f"x{b:g}"
        out.mkdir()  # no upstream phase here: the budget is counted from the recipe, before anything runs
        recipe = load_recipe(TINY, [f"run.out_dir={out}", "logging.wandb.mode=disabled", f"e2e.budget={b}"])
        phases.run_e2e(recipe, dist_info)
        e2e = _done(out / "tiny", "e2e")
        assert abs(e2e["train_flops"] - b * asm["pipeline_train_flops"]) <= 0.5 * per_epoch, (b, e2e["train_flops"])
        epochs = round(e2e["train_flops"] / per_epoch)
        assert epochs > 1 and _start(out / "tiny", "e2e")["total_steps"] == 8 * epochs  # the schedule's length
        manifest = json.loads((out / "tiny" / "e2e" / "export" / "manifest.json").read_text())
        assert manifest["recipe"]["e2e"]["epochs"] == epochs and manifest["recipe"]["e2e"]["budget"] == b
    x1, x2 = (_done(tmp_path / f"x{b}" / "tiny", "e2e")["train_flops"] for b in ("1", "2"))
    assert abs(x2 - 2 * x1) <= per_epoch  # the factor scales it (each rounded to a whole epoch)


def test_e2e_budget_refuses_what_it_cannot_count(tiny):
    with pytest.raises(UserError, match="budget must be >= 0"):
        tiny("e2e.budget=-1")
    with pytest.raises(UserError, match="init_from"):
        budget.e2e_epochs(tiny("e2e.budget=1", "assemble.init_from=/x/export"), 512)


# ---------------------------------------------------------------- the study runner


TOY = """
name: toy
base: {tiny}
overrides: [logging.wandb.mode=disabled, data.train_limit=256, e2e.budget=1.0]
replicate: seed
axes:
  seed: {{0: [run.seed=0], 1: [run.seed=1]}}
  arm:
    both: []
    x2: {{phases: [e2e], overrides: [e2e.budget=2.0]}}
grid:
  - {{seed: [0, 1], arm: [both]}}
  - {{seed: 0, arm: x2}}
out_dir: {out}
results: {results}
threads: 1
"""


def _study(tmp_path: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "study.py"), str(tmp_path / "toy.yaml"), *args],
                          cwd=ROOT, env=launch_env(**(env or {})), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_study_resumes_a_killed_cell_skips_finished_ones_and_aggregates_the_cells_metrics(tmp_path):
    results = tmp_path / "results"
    (tmp_path / "toy.yaml").write_text(TOY.format(tiny=TINY, out=tmp_path / "runs", results=results))
    cells = ["seed-0_arm-both", "seed-1_arm-both", "seed-0_arm-x2"]
    # 0. a stop request (what SIGTERM/SIGUSR1 or the Slurm stop file give): the phase saves and exits 0, the cell is
    #    not finished, and the study says so and stops without keeping anything
    stop = tmp_path / "stop"
    stop.touch()
    stopped = _study(tmp_path, env={"MODASM_STOP_FILE": str(stop)})
    assert stopped.returncode == 1 and "seed-0_arm-both stopped (exit 0; not finished: meta" in stopped.stdout, \
        stopped.stdout[-3000:]
    assert "[meta] stop requested: saved step 1" in stopped.stdout and not results.exists()
    # 1. the first cell's E2E phase SIGKILLs itself after step 6 (its epoch-4 checkpoint holds step 4): the study stops
    killed = _study(tmp_path, env={"MODASM_FAULT_KILL_AT_STEP": "6", "MODASM_FAULT_PHASE": "e2e"})
    assert killed.returncode != 0, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "seed-0_arm-both stopped (exit -9; not finished: e2e)" in killed.stdout
    assert not results.exists() or not (results / "cells").exists()
    # 2. the same command resumes that cell at its checkpoint and runs the others; x2 runs E2E only
    again = _study(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[e2e] resuming from step 4/" in again.stdout
    assert "seed-0_arm-both: finished" not in again.stdout
    x2_run = tmp_path / "runs" / "toy" / "seed-0_arm-x2"
    assert not (x2_run / "meta").exists() and (x2_run / "e2e" / "export" / "manifest.json").is_file()
    for c in cells:
        assert (results / "cells" / c / "e2e" / "metrics.jsonl").is_file(), c
    assert not (results / "cells" / "seed-0_arm-x2" / "assemble").exists()
    # 3. again: every cell finished, nothing runs (no process, no file of a run touched)
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    third = _study(tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert all(f"{c}: finished" in third.stdout for c in cells) and "launch/pipeline.py" not in third.stdout
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    # 4. the aggregate equals what the kept metrics.jsonl files give, computed here independently
    summary = json.loads((results / "summary.json").read_text())
    row = {(r["arm"], r["path"]): r for r in summary}
    done = {c: {p: _done(results / "cells" / c, p) for p in ("assemble", "e2e")
                if (results / "cells" / c / p).is_dir()} for c in cells}
    for path, sub in (("assembled", "assemble"), ("E2E", "e2e")):
        top1 = [done[f"seed-{s}_arm-both"][sub]["top1"] for s in (0, 1)]
        best = [done[f"seed-{s}_arm-both"][sub]["best_top1"] for s in (0, 1)]
        assert row[("both", path)]["n"] == 2
        assert row[("both", path)]["top1"] == pytest.approx([statistics.mean(top1), statistics.stdev(top1)], abs=1e-9)
        assert row[("both", path)]["best"] == pytest.approx([statistics.mean(best), statistics.stdev(best)], abs=1e-9)
    diffs = [done[f"seed-{s}_arm-both"]["assemble"]["top1"] - done[f"seed-{s}_arm-both"]["e2e"]["top1"] for s in (0, 1)]
    paired = row[("both", "assembled - E2E (paired)")]
    assert paired["top1"] == pytest.approx([statistics.mean(diffs), statistics.stdev(diffs)], abs=1e-9)
    hours = [done[f"seed-{s}_arm-both"]["assemble"]["pipeline_device_hours"] for s in (0, 1)]
    assert row[("both", "assembled")]["hours"] == pytest.approx([statistics.mean(hours), statistics.stdev(hours)])
    x2 = row[("x2", "E2E")]
    assert x2["n"] == 1 and x2["top1"] == [done["seed-0_arm-x2"]["e2e"]["top1"], 0.0]
    assert x2["flops"][0] > 1.5 * row[("both", "E2E")]["flops"][0]
    text = (results / "README.md").read_text()
    assert "| 1 | x2 | E2E |" not in text and "| x2 | E2E | 1 |" in text
    for png in ("top1_vs_device_hours.png",):
        assert (results / png).stat().st_size > 10_000


def test_study_file_errors_name_the_key(tmp_path):
    from modasm import study
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: t\nbase: {TINY}\naxes: {{seed: {{0: []}}}}\ngrdi: []\n")
    with pytest.raises(UserError, match=r"unknown key\(s\) \['grdi'\]"):
        study.load(bad)
    bad.write_text(f"name: t\nbase: {TINY}\naxes: {{seed: {{0: [meta.epochz=2]}}}}\n")
    with pytest.raises(UserError, match="cell seed-0: unknown override key 'meta.epochz'"):
        study.load(bad)
    bad.write_text(f"name: t\nbase: {TINY}\naxes: {{seed: {{0: []}}}}\ngrid: [{{seed: [3]}}]\n")
    with pytest.raises(UserError, match=r"grid\[0\].seed: \[3\] not among axes.seed"):
        study.load(bad)


def test_a_phase_with_the_same_settings_is_taken_over_not_retrained(incubated, tmp_path):
    """A cell whose meta and incubations equal another cell's (a fine-tune lr sweep) copies them; one whose
    settings differ (another seed) copies nothing."""
    from modasm import study
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: s\nbase: {TINY}\nreplicate: seed\nout_dir: {tmp_path / 'runs'}\n"
                    "axes:\n  lr: {a: [assemble.lr=1.0e-3], b: [assemble.lr=5.0e-4]}\n"
                    "  seed: {0: [], 1: [run.seed=1]}\n")
    s = study.load(spec)
    shutil.copytree(incubated / "tiny", tmp_path / "runs" / "s" / "lr-a_seed-0")
    said = []
    b0 = s.cell("lr-b_seed-0")
    taken = study.take_over(s, b0, b0.recipe(s), said.append)
    assert taken == ["meta", "incubate/module-00", "incubate/module-01"], said
    a1 = s.cell("lr-a_seed-1")
    assert study.take_over(s, a1, a1.recipe(s), said.append) == []
