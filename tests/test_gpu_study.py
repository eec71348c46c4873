"""benchmarks/gpu_study.sh, the depth study's GPU twin: its dry run on CPU at toy sizes, and its time budget."""
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, launch_env

pytestmark = pytest.mark.slow


def _gpu_study(out, *args):
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_study.sh"), "--dry-run", "--out", str(out), *args],
                          cwd=ROOT, env=launch_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=1800)


def test_gpu_study_dry_run_writes_each_finished_cells_table_and_metrics(tmp_path):
    res = _gpu_study(tmp_path / "out")
    report = (tmp_path / "out" / "gpu_study.md").read_text()
    assert res.returncode == 0, report + res.stderr[-3000:]
    assert report.startswith("# GPU depth study") and "Dry run on CPU" in report and "All cells finished" in report
    results = tmp_path / "out" / "results"
    for cell in ("depth-32_seed-0", "depth-128_seed-0"):
        for sub in ("meta", "incubate/module-00", "incubate/module-03", "assemble", "e2e"):
            assert (results / "cells" / cell / sub / "metrics.jsonl").is_file(), (cell, sub)
        manifest = json.loads((results / "cells" / cell / "e2e" / "manifest.json").read_text())
        recipe = manifest["recipe"]
        assert recipe["deepspeed"]["precision"] == "bf16" and recipe["e2e"]["budget"] == 1.0, recipe
        assert recipe["data"]["fraction"] == 0.1 and recipe["model"]["num_heads"] == 2  # toy width, the study's data
    for depth in (32, 128):  # the table, in the report and the results
        assert re.search(rf"^\| {depth} \| assembled - E2E \(paired\) \| 1 \|", report, re.M), report
    summary = json.loads((results / "summary.json").read_text())
    assert {(r["depth"], r["path"]) for r in summary} >= {("32", "assembled"), ("128", "E2E")}


def test_gpu_study_stops_at_its_budget_and_says_so(tmp_path):
    res = _gpu_study(tmp_path / "out", "--budget", "1")
    report = (tmp_path / "out" / "gpu_study.md").read_text()
    assert res.returncode == 0, report + res.stderr[-3000:]
    assert "Stopped at the budget (1 s)" in report and "(no cell finished)" in report
