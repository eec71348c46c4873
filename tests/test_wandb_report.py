"""W&B offline runs read back with wandb's own protobufs; device-hours accounting; the report."""
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TINY, launch, launch_cmd, launch_env
from modasm import phases
from modasm.config import load_recipe
from modasm.metrics import CostClock, Progress, read_jsonl
from modasm.report import collect, write_report
from modasm.shards import read_manifest
from wandb_reader import read_wandb_offline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, dist_info):
    out = tmp_path_factory.mktemp("wb")
    recipe = load_recipe(TINY, [f"run.out_dir={out}"])
    phases.run_pipeline(recipe, dist_info)
    return recipe


def offline_runs(run_dir):
    """{run name: {group, job_type, config, history keys, artifacts}} from every run-*.wandb file."""
    runs = {}
    for f in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        info = {"history": set(), "config": {}, "artifacts": []}
        for rec in read_wandb_offline(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(group=rec.run.run_group, job_type=rec.run.job_type, name=rec.run.display_name)
                info["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "config":
                info["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif kind == "history":
                info["history"] |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
            elif kind == "artifact":
                info["artifacts"].append((rec.artifact.type, {c.path: c.ref for c in rec.artifact.manifest.contents}))
        runs[info["name"]] = info
    return runs


def test_offline_runs_have_group_job_types_config_and_metrics(pipeline):
    runs = offline_runs(pipeline.run_dir)
    assert set(runs) == {"meta", "incubate[0]", "incubate[1]", "assemble", "e2e"}  # one run per module
    assert {r["group"] for r in runs.values()} == {"tiny"}
    assert {n: r["job_type"] for n, r in runs.items()} == {
        "meta": "meta", "incubate[0]": "incubate", "incubate[1]": "incubate", "assemble": "assemble", "e2e": "e2e"}
    for name, r in runs.items():
        assert r["config"]["model"]["split"] == [1, 2] and r["config"]["assemble"]["clip_grad"] == 1.0, name
        assert {"train/loss", "train/lr", "train/img_per_s", "train/grad_norm", "eval/top1", "eval/top5",
                "cost/pipeline_device_hours", "cost/device_hours"} <= r["history"], name
        shards = [files for kind, files in r["artifacts"] if kind == "shards"]
        assert len(shards) == 1 and "manifest.json" in shards[0], name
        refs = {p: ref for p, ref in shards[0].items() if p.startswith("weights/")}  # by reference, not copied
        assert {p for p in refs if p.endswith(".safetensors")} and \
            all(ref.startswith("file://") and ref.endswith(p[len("weights"):]) for p, ref in refs.items())


def test_cost_clock_counts_device_time_across_ranks():
    t = [100.0]
    clock = CostClock(world=2, base_hours=0.5, now=lambda: t[0])
    t[0] += 30
    clock.tick()
    assert clock.wall == 30 and clock.device == 60  # two ranks for 30 s count 60 device-seconds
    assert clock.pipeline_hours == pytest.approx(0.5 + 60 / 3600)
    resumed = CostClock(world=4, wall=clock.wall, device=clock.device, now=lambda: t[0])  # resumed on 4 ranks
    t[0] += 10
    resumed.tick()
    assert resumed.wall == 40 and resumed.device == 100


def test_phases_add_up(pipeline):
    hours = {label: read_manifest(d)["metrics"]["device_hours"] for label, d in [
        ("meta", phases.export_dir(pipeline, "meta")), ("inc0", phases.export_dir(pipeline, "incubate", 0)),
        ("inc1", phases.export_dir(pipeline, "incubate", 1)), ("asm", phases.export_dir(pipeline, "assemble")),
        ("e2e", phases.export_dir(pipeline, "e2e"))]}
    assert all(h > 0 for h in hours.values())
    recs = read_jsonl(phases.phase_dir(pipeline, "assemble") / "metrics.jsonl")
    start, done = recs[0], recs[-1]
    assert start["base_hours"] == pytest.approx(hours["meta"] + hours["inc0"] + hours["inc1"])
    assert done["pipeline_device_hours"] == pytest.approx(start["base_hours"] + hours["asm"])
    inc = read_jsonl(phases.phase_dir(pipeline, "incubate", 1) / "metrics.jsonl")
    assert inc[0]["base_hours"] == pytest.approx(hours["meta"])
    assert read_jsonl(phases.phase_dir(pipeline, "e2e") / "metrics.jsonl")[-1]["pipeline_device_hours"] == \
        pytest.approx(hours["e2e"])
    rows = {r["label"]: r for r in collect(pipeline.run_dir)}
    assert rows["assemble"]["cumulative"] == pytest.approx(done["pipeline_device_hours"])
    assert rows["e2e"]["cumulative"] == pytest.approx(hours["e2e"])


def test_report_has_plots_and_table(pipeline):
    report = write_report(pipeline.run_dir)
    text = report.read_text()
    for row in ("meta model", "hybrid 0 (after incubation)", "hybrid 1 (after incubation)",
                "assembled (after fine-tune)", "E2E baseline"):
        assert f"| {row} |" in text
    for png in ("accuracy_vs_cost.png", "incubation.png", "loss.png"):
        assert f"]({png})" in text
        data = (report.parent / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    res = subprocess.run([os.sys.executable, str(ROOT / "launch" / "report.py"), str(pipeline.run_dir)],
                         capture_output=True, text=True, env=launch_env(), timeout=120)
    assert res.returncode == 0 and "assembled (after fine-tune)" in res.stdout and "report.md" in res.stdout


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    plain = io.StringIO()
    p = Progress("meta", 10, mode="auto", stream=plain)
    p.advance(5)
    p.show("step 5/10")
    p.close()
    assert plain.getvalue() == "[meta] step 5/10\n"  # a log file gets plain lines, no bar
    assert p.meter.n == 5 and p.rate > 0 and p.eta > 0
    bar = io.StringIO()
    p = Progress("meta", 10, mode="bar", stream=bar)
    p.advance(5)
    p.show("step 5/10")
    p.say("eval")
    p.close()
    out = bar.getvalue()
    assert "\r[meta]" in out and "50%" in out and "5/10" in out and "step 5/10" in out  # tqdm's live bar
    assert "[meta] eval\n" in out


def test_no_wandb_configured_no_network_no_prompt(tmp_path):
    """A fresh user: no W&B account, no network, no terminal: nothing hangs, prompts or warns."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in launch_env().items() if not k.startswith("WANDB")}
    env.update(HOME=str(home), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               # DeepSpeed's JIT-built ops stay where they are (a fresh HOME would rebuild them: ~50 s each run)
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "torch_extensions")))
    res = subprocess.run(launch_cmd("meta.py", str(TINY), f"run.out_dir={tmp_path}"), cwd=ROOT, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "wandb:" not in out and "API key" not in out and "W&B" not in out
    assert list((tmp_path / "tiny" / "wandb").glob("offline-run-*/run-*.wandb"))

    online = subprocess.run(launch_cmd("meta.py", str(TINY), f"run.out_dir={tmp_path / 'o'}",
                                       "logging.wandb.mode=online"), cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert online.returncode == 2 and "no W&B API key" in online.stderr and "wandb login" in online.stderr

    off = launch("meta.py", str(TINY), f"run.out_dir={tmp_path / 'd'}", env={"WANDB_MODE": "disabled"})
    assert off.returncode == 0 and not (tmp_path / "d" / "tiny" / "wandb").exists()
