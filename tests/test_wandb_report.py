"""W&B offline runs read back with wandb's own protobufs; device-hours accounting; the report."""
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TINY, launch, launch_cmd, launch_env
from modasm import phases
from modasm.config import load_recipe
from modasm.metrics import CostClock, Progress, read_jsonl
from modasm.report import collect, write_report
from modasm.shards import read_manifest
from wandb_reader import offline_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, dist_info):
    out = tmp_path_factory.mktemp("wb")
    recipe = load_recipe(TINY, [f"run.out_dir={out}"])
    phases.run_pipeline(recipe, dist_info)
    return recipe


@pytest.fixture(scope="module")
def farm(pipeline, tmp_path_factory):
    """Both incubations by one launch of 2 ranks (farm mode, one module group of 2 ranks), from the pipeline's meta."""
    out = tmp_path_factory.mktemp("wbfarm")
    shutil.copytree(phases.phase_dir(pipeline, "meta"), out / "tiny" / "meta")
    ov = [f"run.out_dir={out}", "incubate.groups=1"]
    res = launch("incubate.py", str(TINY), *ov, nproc=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return load_recipe(TINY, ov)


def assert_one_run_per_phase(recipe, job_types: dict[str, str]):
    """Exactly one W&B run (one id, written once) per phase or module, grouped per pipeline, with the whole
    recipe as its config, the training and cost metrics, and its shard set as an artifact by reference."""
    runs = offline_runs(recipe.run_dir)
    names = sorted(r["name"] for r in runs.values())
    assert names == sorted(job_types), f"W&B runs by id: {names}"
    config = json.loads(json.dumps(recipe.to_dict()))
    for run in runs.values():
        name = run["name"]
        assert len(run["files"]) == 1, f"{name}: {len(run['files'])} writers: {run['files']}"
        assert run["group"] == "tiny" and run["job_type"] == job_types[name], name
        assert {k: v for k, v in run["config"].items() if k != "_wandb"} == config, name
        assert {"train/loss", "train/lr", "train/img_per_s", "train/grad_norm", "eval/top1", "eval/top5",
                "cost/pipeline_device_hours", "cost/device_hours", "cost/train_flops",
                "cost/pipeline_train_flops"} <= run["history"], name
        shards = [files for kind, files in run["artifacts"] if kind == "shards"]
        assert len(shards) == 1 and "manifest.json" in shards[0], name
        refs = {p: ref for p, ref in shards[0].items() if p.startswith("weights/")}  # by reference, not copied
        assert {p for p in refs if p.endswith(".safetensors")} and \
            all(ref.startswith("file://") and ref.endswith(p[len("weights"):]) for p, ref in refs.items())


def test_offline_runs_have_group_job_types_config_and_metrics(pipeline, farm):
    assert_one_run_per_phase(pipeline, {"meta": "meta", "incubate[0]": "incubate", "incubate[1]": "incubate",
                                        "assemble": "assemble", "e2e": "e2e"})
    assert_one_run_per_phase(farm, {"incubate[0]": "incubate", "incubate[1]": "incubate"})


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


# How far a phase's clock may be from its records' own timestamps: each clock reading is taken just before
# its record is written (microseconds apart; timestamps are rounded to 1 ms), the first just after the start
# record; the slack is for a loaded 2-core machine descheduling the writer in between.
CLOCK_SLACK_S = 0.5


def own_device_seconds(phase_dir) -> tuple[float, float]:
    """A phase's device time as its own run's wall clock measures it: the time stamps of its records
    (time.time(), not the phase's CostClock) x the ranks it ran on, as a bracket (low, high). The clock's
    last reading comes after the last evaluation (and the checkpoint after it) and before the export, so
    it lies between the eval record and the done record (written after the export). Checks the clock's
    readings on the way: every train/eval record's wall_seconds is its time since the start record."""
    recs = read_jsonl(phase_dir / "metrics.jsonl")
    (start,), (done,) = [r for r in recs if r["kind"] == "start"], [r for r in recs if r["kind"] == "done"]
    for r in recs:
        if r["kind"] in ("train", "eval"):
            assert r["wall_seconds"] == pytest.approx(r["time"] - start["time"], abs=CLOCK_SLACK_S), (phase_dir, r)
            assert r["device_seconds"] == pytest.approx(r["wall_seconds"] * start["world"], rel=1e-9), (phase_dir, r)
    last_eval = [r for r in recs if r["kind"] == "eval"][-1]
    low = (last_eval["time"] - start["time"] - CLOCK_SLACK_S) * start["world"]
    high = (done["time"] - start["time"] + CLOCK_SLACK_S) * start["world"]
    assert low <= done["device_seconds"] <= high, (phase_dir, low, done["device_seconds"], high)
    return low, high


def test_phases_add_up(pipeline, farm):
    dirs = {"meta": phases.phase_dir(pipeline, "meta"), "inc0": phases.phase_dir(pipeline, "incubate", 0),
            "inc1": phases.phase_dir(pipeline, "incubate", 1), "asm": phases.phase_dir(pipeline, "assemble"),
            "e2e": phases.phase_dir(pipeline, "e2e")}
    hours = {k: read_manifest(d / "export")["metrics"]["device_hours"] for k, d in dirs.items()}
    own = {k: tuple(s / 3600 for s in own_device_seconds(d)) for k, d in dirs.items()}
    for k in dirs:
        assert own[k][0] <= hours[k] <= own[k][1], f"{k}: {hours[k]} device-h recorded, measured {own[k]}"
    recs = read_jsonl(dirs["asm"] / "metrics.jsonl")
    start, done = recs[0], recs[-1]
    assert start["base_hours"] == pytest.approx(hours["meta"] + hours["inc0"] + hours["inc1"])
    upstream = [own[k] for k in ("meta", "inc0", "inc1")]
    assert sum(lo for lo, _ in upstream) <= start["base_hours"] <= sum(hi for _, hi in upstream)
    assert done["pipeline_device_hours"] == pytest.approx(start["base_hours"] + hours["asm"])
    inc = read_jsonl(dirs["inc1"] / "metrics.jsonl")
    assert inc[0]["base_hours"] == pytest.approx(hours["meta"])
    assert read_jsonl(dirs["e2e"] / "metrics.jsonl")[-1]["pipeline_device_hours"] == pytest.approx(hours["e2e"])
    # counted training FLOPs add up the same way: each phase's is its FLOPs per image x the images it trained on
    flops = {k: read_manifest(d / "export")["metrics"]["train_flops"] for k, d in dirs.items()}
    for k, d in dirs.items():
        first = read_jsonl(d / "metrics.jsonl")[0]
        assert flops[k] == pytest.approx(first["flops_per_image"] * first["total_steps"] * 64, rel=1e-12), k
    assert start["base_flops"] == pytest.approx(flops["meta"] + flops["inc0"] + flops["inc1"], rel=1e-12)
    assert done["pipeline_train_flops"] == pytest.approx(start["base_flops"] + flops["asm"], rel=1e-12)
    assert read_jsonl(dirs["e2e"] / "metrics.jsonl")[-1]["pipeline_train_flops"] == pytest.approx(flops["e2e"])
    rows = {r["label"]: r for r in collect(pipeline.run_dir)}
    assert rows["assemble"]["cumulative"] == pytest.approx(done["pipeline_device_hours"])
    assert rows["e2e"]["cumulative"] == pytest.approx(hours["e2e"])
    # 2 ranks: device time is each run's wall clock x 2
    for k in range(2):
        d = phases.phase_dir(farm, "incubate", k)
        metrics = read_manifest(d / "export")["metrics"]
        low, high = own_device_seconds(d)
        assert metrics["world"] == 2 and low <= metrics["device_seconds"] <= high, (k, low, metrics, high)


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
                         capture_output=True, text=True, env=launch_env(), timeout=600)
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
    from torch.utils.cpp_extension import _get_build_directory
    env.update(HOME=str(home), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               # DeepSpeed's JIT-built ops stay where they are (a fresh HOME would rebuild them: ~50 s each run).
               # Torch adds a py<ver>_<cuda> level below its default root, not below $TORCH_EXTENSIONS_DIR: name
               # the directory it really uses, the parent of the build directory of the op DeepSpeed builds here.
               TORCH_EXTENSIONS_DIR=str(Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent))
    res = subprocess.run(launch_cmd("meta.py", str(TINY), f"run.out_dir={tmp_path}"), cwd=ROOT, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    assert "wandb:" not in out and "API key" not in out and "W&B" not in out
    assert list((tmp_path / "tiny" / "wandb").glob("offline-run-*/run-*.wandb"))

    online = subprocess.run(launch_cmd("meta.py", str(TINY), f"run.out_dir={tmp_path / 'o'}",
                                       "logging.wandb.mode=online"), cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert online.returncode == 2 and "no W&B API key" in online.stderr and "wandb login" in online.stderr

    off = launch("meta.py", str(TINY), f"run.out_dir={tmp_path / 'd'}", env={"WANDB_MODE": "disabled"})
    assert off.returncode == 0 and not (tmp_path / "d" / "tiny" / "wandb").exists()
