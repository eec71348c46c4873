"""The whole pipeline through the real entry points; re-runs do nothing; interrupted runs resume exactly."""
import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, launch, launch_cmd, launch_env

pytestmark = pytest.mark.slow


def manifests(run_dir):
    return {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.read_text()) for p in run_dir.rglob("manifest.json")}


def test_pipeline_then_rerun_does_nothing(tmp_path):
    res = launch("pipeline.py", str(TINY), f"run.out_dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "tiny"
    table = res.stdout[res.stdout.index("model "):]
    for row in ("meta model", "hybrid 0 (after incubation)", "hybrid 1 (after incubation)",
                "assembled (after fine-tune)", "E2E baseline"):
        line = next(l for l in table.splitlines() if l.startswith(row))
        top1 = float(line[30:].split()[0])
        assert 0 < top1 <= 100, line
    for phase_dir in (run / "meta", run / "incubate" / "module-01", run / "assemble", run / "e2e"):
        recs = [json.loads(l) for l in (phase_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["kind"] == "train"]
        assert train and all(r["grad_norm"] > 0 and r["img_per_s"] > 0 and r["lr"] > 0 for r in train)
        assert [r["step"] for r in train] == sorted(r["step"] for r in train)
        ev = [r for r in recs if r["kind"] == "eval"][-1]
        assert ev["eval_samples"] == 256 and 0 <= ev["top5"] <= 100 and ev["top1"] <= ev["top5"]
        assert recs[-1]["kind"] == "done" and recs[-1]["device_seconds"] > 0
    before = manifests(run)
    assert len(before) == 5  # meta, 2 incubations, assemble, e2e
    metric_lines = {p: p.read_text() for p in run.rglob("metrics.jsonl")}

    again = launch("pipeline.py", str(TINY), f"run.out_dir={tmp_path}")
    assert again.returncode == 0, again.stderr[-3000:]
    for label in ("meta", "incubate[0]", "incubate[1]", "assemble", "e2e"):
        assert f"[{label}] already complete" in again.stdout
    assert "step " not in again.stdout.replace("at step", "")  # no training line
    assert manifests(run) == before
    assert {p: p.read_text() for p in run.rglob("metrics.jsonl")} == metric_lines

    # evaluating the exported shards reproduces the accuracy recorded at export
    ev = launch("evaluate.py", str(TINY), "--phase", "assemble", f"run.out_dir={tmp_path}")
    assert ev.returncode == 0, ev.stderr[-2000:]
    recorded = json.loads((run / "assemble" / "export" / "manifest.json").read_text())["metrics"]["top1"]
    assert f"top-1 {recorded:.2f}%" in ev.stdout


def test_killed_phase_resumes_to_the_same_weights(tmp_path):
    ov = ["data.train_limit=4096", "e2e.epochs=2", "e2e.ckpt_every_steps=4"]
    straight = launch("e2e.py", str(TINY), f"run.out_dir={tmp_path / 'a'}", *ov)
    assert straight.returncode == 0, straight.stderr[-3000:]

    cmd = launch_cmd("e2e.py", str(TINY), f"run.out_dir={tmp_path / 'b'}", *ov)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "b" / "tiny" / "e2e" / "ckpt"
    deadline = time.time() + 120
    while not list(ckpt.glob("step-*/COMPLETE")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "tiny" / "e2e" / "export" / "manifest.json").exists(), "killed too late"
    killed_at = max(int(p.parent.name.split("-")[1]) for p in ckpt.glob("step-*/COMPLETE"))

    resumed = launch("e2e.py", str(TINY), f"run.out_dir={tmp_path / 'b'}", *ov)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {killed_at}/" in resumed.stdout
    for m in range(2):
        a = load_file(str(tmp_path / "a" / "tiny" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        b = load_file(str(tmp_path / "b" / "tiny" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"module {m} tensor {k} differs after resume"
