"""The whole pipeline through the real entry points; re-runs do nothing; interrupted runs resume exactly."""
import json
import re
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, STARTUP_S, TINY, launch, launch_cmd, launch_env, wait_for

pytestmark = pytest.mark.slow


def manifests(run_dir):
    return {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.read_text()) for p in run_dir.rglob("manifest.json")}


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """The comparison table printed by pipeline.py / report.py: {model: {column header: cell}}, columns found by
    the header line (cells are separated by 2+ spaces; every row must have a cell under every header)."""
    lines = text.splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith("model "))
    header = re.split(r"\s{2,}", lines[at].strip())
    rows = {}
    for line in lines[at + 2:]:  # after the header and its rule
        if not line.strip() or not re.search(r"\S\s{2,}\S", line):
            break  # the footnote
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), f"row {line!r} does not fit the header {header}"
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_pipeline_then_rerun_does_nothing(tmp_path):
    res = launch("pipeline.py", str(TINY), f"run.out_dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "tiny"
    phases = {"meta model": run / "meta", "hybrid 0 (after incubation)": run / "incubate" / "module-00",
              "hybrid 1 (after incubation)": run / "incubate" / "module-01",
              "assembled (after fine-tune)": run / "assemble", "E2E baseline": run / "e2e"}
    # every row of the printed table is its phase's recorded metrics; cumulative = the pipeline up to that row
    table = parse_table(res.stdout)
    assert list(table) == list(phases)
    spent = flops = 0.0
    for row, d in phases.items():
        m = json.loads((d / "export" / "manifest.json").read_text())["metrics"]
        spent = m["device_hours"] if row == "E2E baseline" else spent + m["device_hours"]
        mfu = sorted(r["mfu"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                     if r["kind"] == "train")
        assert mfu and all(0 < x < 1 for x in mfu), row  # MFU against the measured CPU peak
        flops = m["train_flops"] if row == "E2E baseline" else flops + m["train_flops"]
        assert table[row] == {"model": row, "top-1 %": f"{m['top1']:.2f}", "top-5 %": f"{m['top5']:.2f}",
                              "device-h": f"{m['device_hours']:.4f}", "cumul. device-h": f"{spent:.4f}",
                              "train FLOPs": f"{m['train_flops']:.3e}", "cumul. FLOPs": f"{flops:.3e}",
                              "MFU %": f"{100 * mfu[len(mfu) // 2]:.1f}"}, row
        assert 0 < m["top1"] <= m["top5"] <= 100 and m["eval_samples"] == 256, (row, m)
    for row, phase_dir in phases.items():
        recs = [json.loads(l) for l in (phase_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["kind"] == "train"]
        assert train and all(r["grad_norm"] > 0 and r["img_per_s"] > 0 and r["lr"] > 0 for r in train), row
        assert [r["step"] for r in train] == list(range(4, recs[0]["total_steps"] + 1, 4)), row
        ev = [r for r in recs if r["kind"] == "eval"][-1]
        assert ev["eval_samples"] == 256 and 0 <= ev["top5"] <= 100 and ev["top1"] <= ev["top5"], row
        assert recs[-1]["kind"] == "done" and recs[-1]["device_seconds"] > 0, row
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
    assert parse_table(again.stdout) == table

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
    log = tmp_path / "b.out"
    ckpt = tmp_path / "b" / "tiny" / "e2e" / "ckpt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: list(ckpt.glob("step-*/COMPLETE")), STARTUP_S, "complete checkpoint", proc, log.read_text)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "b" / "tiny" / "e2e" / "export" / "manifest.json").exists(), "killed too late"
    killed_at = max(int(p.parent.name.split("-")[1]) for p in ckpt.glob("step-*/COMPLETE"))
    assert killed_at < 128, f"killed at step {killed_at} of 128: nothing left to resume"

    resumed = launch("e2e.py", str(TINY), f"run.out_dir={tmp_path / 'b'}", *ov)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {killed_at}/" in resumed.stdout
    for m in range(2):
        a = load_file(str(tmp_path / "a" / "tiny" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        b = load_file(str(tmp_path / "b" / "tiny" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"module {m} tensor {k} differs after resume"
