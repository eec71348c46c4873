"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check runs on CPU at toy sizes and is reported."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, launch_env

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = launch_env(PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    report = (out / "gpu_check.md").read_text()
    assert res.returncode == 0, report + res.stderr[-3000:]
    assert report.startswith("# GPU check") and "Dry run on CPU" in report
    assert "| DeepSpeed | 0.19.8 |" in report and "| torch |" in report
    summary = report[report.index("## Summary"):]
    for name in ("install", "versions", "bench-vit-h14", "bench-vit-b16", "farm-one-torchrun",
                 "farm-torchrun-per-group", "demo", "bench-vit-b16-compile", "bench-vit-h14-compile", "host-syncs"):
        assert re.search(rf"^\| {name} \| PASS \| \d+ \|$", summary, re.M), (name, summary)
    # bench tables (dry run: checkpointing on for each phase; compile on for the target only)
    for model in ("ViT-32w/14", "ViT-32w/16"):
        for phase in ("meta", "incubate[0]", "incubate[3]", "assemble"):
            rows = re.findall(rf"^{re.escape(model)}\s+{re.escape(phase)}\s+2\s+(on|off)\s+(on|off)\s+[\d.]+\s",
                              report, re.M)
            assert sorted(rows) == ([("off", "on"), ("on", "off")] if phase == "assemble" else [("off", "on")]), \
                (model, phase, rows)
    assert "both modules' shard sets written" in report
    assert re.search(r"assembled \(after fine-tune\)\s+\d+\.\d\d", report) and "E2E baseline" in report
    assert (out / "bench.json").is_file() and (out / "logs" / "demo.log").is_file()
    assert re.search(r"^\| fp32, ZeRO-0, clip 1.0 \| 1.0 \| 2.0 \| 0.0 \| n/a on CPU \| n/a on CPU \|$", report, re.M)
    assert re.search(r"^\| bf16, ZeRO-1 \| 1.0 \| [\d.]+ \| 0.0 \| n/a on CPU \| n/a on CPU \|$", report, re.M)
