"""The slurm/ scripts' own decisions, without a cluster: which launch form phase.sh picks, the exit code the batch shell
reports, what pipeline.sh refuses before submitting anything.

Slurm's commands (srun, sbatch, scontrol) are replaced on PATH by stand-ins that record their arguments: they are
not ours, and what is checked here is what our scripts ask of them. The jobs themselves are in tests/test_slurm.py
(a real local Slurm).
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TINY, launch_env

RECORDER = """#!/usr/bin/env bash
# stand-in for Slurm's {name}: records its arguments, then does what FAKE_{upper} says
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' {name} "$@" >> "$FAKE_SLURM_LOG"
{body}
"""


def fake_slurm(tmp_path: Path, srun: str = "exit 0") -> tuple[dict, Path]:
    """A bin directory with recording srun / sbatch / scontrol first on PATH; (environment, log of calls)."""
    bin_dir, log = tmp_path / "fake-bin", tmp_path / "slurm-calls.jsonl"
    bin_dir.mkdir()
    scontrol = 'if [ "$1" = show ]; then echo "JobId=$SLURM_JOB_ID JobState=${FAKE_JOB_STATE:-RUNNING}"; fi'
    bodies = {"srun": srun, "sbatch": 'echo "$((900000 + RANDOM))"', "scontrol": scontrol}
    for name, body in bodies.items():
        path = bin_dir / name
        path.write_text(RECORDER.format(name=name, upper=name.upper(), body=body))
        path.chmod(0o755)
    log.touch()
    env = launch_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_LOG=str(log),
                     MODASM_ROOT=str(ROOT), MODASM_MASTER_ADDR="127.0.0.1")
    return env, log


def calls(log: Path, name: str) -> list[list[str]]:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [row[1:] for row in rows if row[0] == name]


def batch_job(env: dict, *args: str, nodes: int = 1, job_id: int | None = None, **extra) -> subprocess.CompletedProcess:
    """slurm/phase.sh ARGS as the batch shell of a job on ``nodes`` nodes ($FAKE_BATCH_PID: that shell's pid)."""
    job = str(job_id or 990000000 + os.getpid() % 100000)
    env = {**env, "SLURM_JOB_ID": job, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": "node-[1-9]",
           "SLURM_SUBMIT_DIR": str(ROOT), "MODASM_NPROC_PER_NODE": "2", **extra}
    res = subprocess.run(["bash", "-c", 'export FAKE_BATCH_PID=$$; exec bash slurm/phase.sh "$@"', "job", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert not list((ROOT / "runs" / ".stop").glob(f"job-{job}*")), "the job's stop files were left behind"
    return res


def torchruns(log: Path) -> list[list[str]]:
    """The torchrun command line of each srun step (what follows 'torchrun' in srun's arguments)."""
    return [argv[argv.index("torchrun") + 1:] for argv in calls(log, "srun")]


def test_phase_sh_runs_one_module_on_several_nodes_as_one_world(tmp_path):
    """`sbatch --nodes=2 slurm/incubate.sh RECIPE --module 1`: one torchrun world over both nodes (one srun step of
    two tasks, one rendezvous), not one torchrun per node (two worlds training module 1 into the same directory).
    A farm (no --module) on two nodes still gets one torchrun per node, each told its --part."""
    env, log = fake_slurm(tmp_path)
    res = batch_job(env, "incubate", str(TINY), "--module", "1", nodes=2)
    assert res.returncode == 0, res.stdout + res.stderr
    steps = calls(log, "srun")
    assert len(steps) == 1, f"{len(steps)} srun steps (one torchrun world each) for one module: {steps}"
    assert "--ntasks=2" in steps[0], steps
    (run,) = torchruns(log)
    assert "--nnodes=2" in run and "--standalone" not in run and not any(a.startswith("--part") for a in run), run
    assert run[run.index("launch/incubate.py"):] == ["launch/incubate.py", str(TINY), "--module", "1"], run

    log.write_text("")
    res = batch_job(env, "incubate", str(TINY), "--module=0", nodes=2)
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = torchruns(log)
    assert "--nnodes=2" in run and "--module=0" in run and not any(a.startswith("--part") for a in run), run

    log.write_text("")
    res = batch_job(env, "incubate", str(TINY), nodes=2)  # the farm
    assert res.returncode == 0, res.stdout + res.stderr
    runs = torchruns(log)
    assert len(runs) == 2 and all("--standalone" in r for r in runs), runs
    assert sorted(r[r.index("--part") + 1] for r in runs) == ["0/2", "1/2"], runs


def test_batch_shell_reports_the_steps_exit_code_when_a_signal_arrives_as_it_ends(tmp_path):
    """The time limit's USR1 reaching the batch shell just as its srun step ends (here: the step sends it, then
    exits 3): bash's `wait`, interrupted by the trapped signal, returns 138 (128 + SIGUSR1) for a step that is already
    gone. The job's exit code must be the step's own (3), and a step that failed is not requeued."""
    env, log = fake_slurm(tmp_path, srun='kill -USR1 "$FAKE_BATCH_PID"; exit 3')
    for attempt in range(5):  # the old loop lost the status on (nearly) every try; none may here
        log.write_text("")
        res = batch_job(env, "e2e", str(TINY))
        assert res.returncode == 3, f"try {attempt}: exit {res.returncode}, not the step's 3:\n{res.stdout}{res.stderr}"
        assert "[slurm] USR1" in res.stdout, res.stdout
        assert not calls(log, "scontrol"), f"a failed step was requeued: {calls(log, 'scontrol')}"
        assert "failed: the step exited 3" in res.stdout, res.stdout


# a preempted step as Slurm leaves it: slurmstepd's SIGTERM reaches slurm/step.sh (and torchrun, whose ranks save
# and which then exits 1): here a stand-in for torchrun sends it and exits 1 after marking the save
PREEMPTED = ('bash "$MODASM_ROOT/slurm/step.sh" bash -c '
             '\'kill -TERM $PPID; touch "$MODASM_STOP_FILE.saved"; exit 1\'')


@pytest.mark.parametrize("job_state", ["RUNNING", "COMPLETING"])
def test_a_preempted_step_requeues_the_job_only_while_slurm_keeps_it_running(tmp_path, job_state):
    """Slurm's SIGTERM to the steps (slurm/step.sh marks it) with the ranks saved: the job requeues itself while the
    controller reports it RUNNING (a preemption's grace time); not when Slurm is already ending it (COMPLETING:
    scancel, the time limit), even if the batch shell's own TERM has not arrived yet."""
    env, log = fake_slurm(tmp_path, srun=PREEMPTED)
    res = batch_job(env, "e2e", str(TINY), FAKE_JOB_STATE=job_state)
    assert res.returncode == 1, res.stdout + res.stderr
    requeues = [c for c in calls(log, "scontrol") if c[0] == "requeue"]
    if job_state == "RUNNING":
        assert len(requeues) == 1 and "[slurm] requeueing job" in res.stdout, res.stdout + res.stderr
    else:
        assert not requeues and "not requeueing: Slurm is ending job" in res.stdout, res.stdout + res.stderr
        assert "failed" not in res.stdout, res.stdout


def test_bad_stop_timeout_is_refused(tmp_path):
    env, log = fake_slurm(tmp_path)
    res = batch_job(env, "e2e", str(TINY), MODASM_STOP_TIMEOUT="4m")
    assert res.returncode == 2 and not calls(log, "srun"), res.stdout + res.stderr
    assert "MODASM_STOP_TIMEOUT='4m'" in res.stderr and "whole number of seconds" in res.stderr, res.stderr


def pipeline(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "slurm" / "pipeline.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_pipeline_sh_refuses_more_farm_nodes_than_modules_before_submitting(tmp_path):
    """`--farm-nodes N` with N > K: each node's torchrun must hold at least one module group, so the incubation job
    could only fail, after the meta model had trained. pipeline.sh says so and submits nothing."""
    env, log = fake_slurm(tmp_path)
    res = pipeline(env, "--farm-nodes", "3", str(TINY), f"run.out_dir={tmp_path}")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "--farm-nodes 3" in res.stderr and "K=2" in res.stderr and "--array" in res.stderr, res.stderr
    assert not calls(log, "sbatch"), calls(log, "sbatch")

    res = pipeline(env, "--farm-nodes", "2", str(TINY), f"run.out_dir={tmp_path}")  # as many nodes as modules
    assert res.returncode == 0, res.stdout + res.stderr
    incubate = [c for c in calls(log, "sbatch") if "slurm/incubate.sh" in c]
    assert len(incubate) == 1 and "--nodes=2" in incubate[0], calls(log, "sbatch")

    log.write_text("")
    res = pipeline(env, "--farm-nodes", "2", str(TINY), f"run.out_dir={tmp_path}", "incubate.groups=1")
    assert res.returncode == 2 and not calls(log, "sbatch"), res.stdout + res.stderr
    assert "incubate.groups=1 does not split over the farm's 2 launches" in res.stderr, res.stderr


def test_pipeline_sh_refuses_array_with_farm_nodes(tmp_path):
    """`--array` (one job per module) and `--farm-nodes N` (one farm job over N nodes) are alternatives: given both,
    pipeline.sh used to drop --farm-nodes without a word. It says so and submits nothing."""
    env, log = fake_slurm(tmp_path)
    for args in (["--array", "--farm-nodes", "2"], ["--farm-nodes", "2", "--array"]):
        res = pipeline(env, *args, str(TINY), f"run.out_dir={tmp_path}")
        assert res.returncode == 2 and not calls(log, "sbatch"), res.stdout + res.stderr
        assert "--array and --farm-nodes 2 are alternatives" in res.stderr, res.stderr
    res = pipeline(env, "--array", str(TINY), f"run.out_dir={tmp_path}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert any("--array=0-1" in c for c in calls(log, "sbatch")), calls(log, "sbatch")


@pytest.mark.parametrize("nodes", ["0", "two"])
def test_pipeline_sh_refuses_a_bad_node_count(tmp_path, nodes):
    env, log = fake_slurm(tmp_path)
    res = pipeline(env, "--farm-nodes", nodes, str(TINY), f"run.out_dir={tmp_path}")
    assert res.returncode == 2 and not calls(log, "sbatch"), res.stdout + res.stderr
    assert "--farm-nodes" in res.stderr, res.stderr
