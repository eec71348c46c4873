"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check runs on CPU at toy sizes and is reported."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, launch_env



def _no_torch_path(tmp_path) -> str:
    """A PATH whose python3 and python have no torch (this interpreter without its site-packages), as on a CPU
    machine whose system Python lacks it, and no .venv/bin on it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3", "python"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def _env(tmp_path, **extra):
    env = {k: v for k, v in launch_env().items() if k not in ("PYTHON", "MODASM_VENV", "VIRTUAL_ENV")}
    return {**env, "PATH": _no_torch_path(tmp_path), **extra}


def test_gpu_check_takes_the_checkouts_venv(tmp_path):
    """Run from a CPU checkout without the venv on PATH, the steps use the checkout's .venv (make setup); before,
    they took python3 from PATH and every step failed with "No module named 'torch'"."""
    venv_py = ROOT / ".venv" / "bin" / "python"
    assert venv_py.exists(), f"{venv_py} is missing: make setup (the tests run from this checkout's venv)"
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--only",
                          "install,versions,nvjpeg-order", "--out", str(out)], cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    report = (out / "gpu_check.md").read_text()
    assert res.returncode == 0, report + res.stderr[-3000:]
    assert re.search(rf"^\| python \| 3\.[\d.]+ \({re.escape(str(venv_py))}\) \|$", report, re.M), report
    summary = report[report.index("## Summary"):]
    for name in ("install", "versions", "nvjpeg-order"):
        assert re.search(rf"^\| {name} \| PASS \| \d+ \|$", summary, re.M), (name, summary)
    assert re.search(r"^\| demo \| SKIP \(not in --only\) \| 0 \|$", summary, re.M), summary
    assert re.search(r"^ordered\s+3\s+0\s+0\s", report, re.M), report  # the nvJPEG check's table, in the report


def test_gpu_check_reports_the_device_augmentation_rows(tmp_path):
    """The device-augmentation step (benchmarks/bench_aug.py, issue 21): per-sample and batched rows with their ops,
    host ms and img/s, and the batched-vs-per-sample differences (RandAugment on the same input: none)."""
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--only", "aug-batched",
                          "--out", str(out)], cwd=ROOT, env=launch_env(PYTHON=sys.executable), capture_output=True,
                         text=True, timeout=600)
    report = (out / "gpu_check.md").read_text()
    assert res.returncode == 0, report + res.stderr[-3000:]
    assert re.search(r"^\| aug-batched \| PASS \| \d+ \|$", report, re.M), report
    num = r"\s+\d+\.\d+"
    for row in (r"crop\+resize\+flip\+RandAugment\+normalise\+erase: per-sample \(before\)", r"  batched",
                r"RandAugment only \(dali\): per-sample \(before\)"):
        assert re.search(rf"^{row}{num}{num}{num}\s+\d+$", report, re.M), (row, report)
    assert re.search(r"^RandAugment on the same input\s+max \|diff\|\s+0\s", report, re.M), report
    assert re.search(r"^  vs the per-sample float32 resize\s+max \|diff\|\s+[01]\s", report, re.M), report


def test_gpu_check_without_any_python_with_torch_says_what_to_do(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "o")],
                         cwd=ROOT, env=_env(tmp_path, MODASM_VENV=str(tmp_path / "none")), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "no Python with torch" in res.stderr and "make setup" in res.stderr, res.stderr


@pytest.mark.slow
@pytest.mark.multiproc
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
    for name in ("install", "versions", "nvjpeg-order", "bench-vit-h14", "bench-vit-b16", "farm-one-torchrun",
                 "farm-torchrun-per-group", "demo", "aug-batched", "bench-vit-b16-compile", "bench-vit-h14-compile",
                 "host-syncs"):
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
