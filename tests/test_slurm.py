"""The slurm/ scripts against a real one-node Slurm (slurmctld + slurmd + munge, fake GPUs as gres).

The cluster comes from ../shared/slurm-local (or $SLURM_LOCAL_DIR); it needs root. Jobs run on CPU:
each fake GPU Slurm hands a job becomes one gloo rank.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, launch, launch_cmd, launch_env
from modasm import phases
from modasm.config import fingerprint, load_recipe

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SLURM_LOCAL = Path(os.environ.get("SLURM_LOCAL_DIR", ROOT.parent / "shared" / "slurm-local"))
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests start a local cluster and need root; run as root or deselect: -m 'not slurm'")
    start = SLURM_LOCAL / "start.sh"
    assert start.is_file(), f"{start} is missing; set SLURM_LOCAL_DIR to the slurm-local directory"
    res = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    yield
    if "already running" not in res.stdout:  # leave a cluster someone else started alone
        subprocess.run(["bash", str(SLURM_LOCAL / "stop.sh")], capture_output=True, timeout=120)


def slurm_env(gpus=2):
    # each job: `gpus` fake GPUs = ranks, 1 CPU each (the cluster has 8 CPUs and 4 GPUs)
    return launch_env(SBATCH_GPUS_PER_NODE=str(gpus), SBATCH_CPUS_PER_GPU="1", MODASM_ROOT=str(ROOT))


def job_states(job: str) -> dict[str, dict]:
    """JobId -> fields of every job (array task) of ``job``, from `scontrol show job -o`."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    jobs = {}
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def wait(jobs: list[str], timeout: float = 900) -> dict[str, list[dict]]:
    deadline = time.time() + timeout
    while True:
        states = {j: list(job_states(j).values()) for j in jobs}
        if all(s and all(t["JobState"] in DONE for t in s) for s in states.values()):
            return states
        assert time.time() < deadline, f"jobs not finished in {timeout} s: " + json.dumps(
            {j: [(t["JobId"], t["JobState"], t.get("Reason")) for t in s] for j, s in states.items()})
        time.sleep(1)


def state(states, job) -> str:
    return ",".join(sorted({t["JobState"] for t in states[job]}))


def pipeline(*args, env=None):
    res = subprocess.run([str(ROOT / "slurm" / "pipeline.sh"), *args], cwd=ROOT, capture_output=True, text=True,
                         env=env or slurm_env(), timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    names = ["meta", "incubate", "assemble", "e2e", "report", "check"]
    got = {n: m.group(1) for n in names if (m := re.search(rf"^  {n}\s+(\d+)", res.stdout, re.M))}
    return res.stdout, got


def test_pipeline_sh_runs_every_phase(cluster, tmp_path):
    out, jobs = pipeline(str(TINY), f"run.out_dir={tmp_path}")
    run = tmp_path / "tiny"
    assert f"logs:    {run / 'slurm'}/" in out and "report.md" in out
    states = wait(list(jobs.values()))
    logs = "\n".join(p.read_text() for p in sorted((run / "slurm").glob("*.out")))
    for name in ("meta", "incubate", "assemble", "e2e", "report"):
        assert state(states, jobs[name]) == "COMPLETED", f"{name}: {states[jobs[name]]}\n{logs[-4000:]}"
    assert state(states, jobs["check"]) == "CANCELLED"  # nothing failed: the check job never ran
    incubate_log = next((run / "slurm").glob("incubate-*.out")).read_text()
    assert "group 1/2 (rank 0): modules [1]" in incubate_log  # farmed: K=2 modules over 2 ranks
    assert "group 2/2 (rank 1): modules [0]" in incubate_log
    for phase in ("meta", "incubate/module-00", "incubate/module-01", "assemble", "e2e"):
        manifest = json.loads((run / phase / "export" / "manifest.json").read_text())
        assert manifest["metrics"]["eval_samples"] == 256, phase
        assert any('"kind": "done"' in line for line in (run / phase / "metrics.jsonl").read_text().splitlines())
    assert json.loads((run / "assemble" / "export" / "manifest.json").read_text())["metrics"]["world"] == 2
    assert "assembled (after fine-tune)" in (run / "report" / "report.md").read_text()
    assert "E2E baseline" in next((run / "slurm").glob("report-*.out")).read_text()


def test_pipeline_sh_of_a_fine_tune_from_another_run_submits_no_meta_or_incubation(cluster, tmp_path):
    """A recipe whose fine-tunes start from another run's target (assemble.init_from / e2e.init_from, as the
    high-resolution recipes) has no meta model or incubation: pipeline.sh submits assemble (with no dependency
    on an incubation), e2e, report and check only. Submitted held, then cancelled: what is checked is the jobs."""
    ov = [f"run.out_dir={tmp_path}", f"assemble.init_from={tmp_path / 'lowres' / 'assemble' / 'export'}",
          f"e2e.init_from={tmp_path / 'lowres' / 'e2e' / 'export'}"]
    out, jobs = pipeline(str(TINY), *ov, env={**slurm_env(), "MODASM_SBATCH": "--hold"})
    try:
        assert set(jobs) == {"assemble", "e2e", "report", "check"}, out
        assert "incubation: none" in out and "no meta model or incubation" in out, out
        fields = {n: next(iter(job_states(j).values())) for n, j in jobs.items()}
        assert {n: f["JobName"] for n, f in fields.items()} == {
            "assemble": "modasm-assemble", "e2e": "modasm-e2e", "report": "modasm-check", "check": "modasm-check"}
        assert fields["assemble"]["Dependency"] == "(null)", fields["assemble"]  # nothing to wait for
        assert jobs["assemble"] in fields["report"]["Dependency"] and jobs["e2e"] in fields["report"]["Dependency"]
        queued = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
        assert "modasm-meta" not in queued and "modasm-incubate" not in queued, queued
    finally:
        subprocess.run(["scancel", *jobs.values()], capture_output=True)


@pytest.fixture
def with_meta(tmp_path, dist_info):
    recipe = load_recipe(TINY, [f"run.out_dir={tmp_path}"])
    phases.run_meta(recipe, dist_info)
    return tmp_path


def test_usr1_checkpoints_requeues_and_resumes(cluster, with_meta):
    """The time-limit signal (B:USR1) to a running incubation: checkpoint, requeue, resume, finish, and end
    with exactly the weights of the same incubation never interrupted."""
    run = with_meta / "tiny"
    log = with_meta / "incubate.out"
    ov = ["data.train_limit=8192", "incubate.epochs=2", "incubate.log_every_steps=1"]
    # the uninterrupted reference: the same phase as one rank (what the 1-GPU job runs), on the other core
    # while the job runs; it starts from the same meta shards
    ref = with_meta / "ref"
    shutil.copytree(run / "meta", ref / "tiny" / "meta")
    ref_log = with_meta / "ref.out"
    with open(ref_log, "w") as f:
        straight = subprocess.Popen(launch_cmd("incubate.py", str(TINY), f"run.out_dir={ref}", *ov), cwd=ROOT,
                                    env=launch_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        job = subprocess.run(["sbatch", "--parsable", f"--output={log}", "slurm/incubate.sh", str(TINY),
                              f"run.out_dir={with_meta}", *ov], cwd=ROOT, env=slurm_env(gpus=1),
                             capture_output=True, text=True, check=True).stdout.strip()
        metrics = run / "incubate" / "module-01" / "metrics.jsonl"  # K=2 on one rank: module 1 (deeper) first
        deadline = time.time() + 600
        while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
            assert time.time() < deadline and job_states(job)[job]["JobState"] not in DONE, \
                "no training step logged: " + (log.read_text()[-3000:] if log.exists() else "(no job output yet)")
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        states = wait([job])
        straight.wait(timeout=900)
    finally:
        if straight.poll() is None:
            os.killpg(straight.pid, signal.SIGKILL)
            straight.wait()
    text = log.read_text()
    assert state(states, job) == "COMPLETED", text[-4000:]
    assert states[job][0]["Restarts"] == "1"
    assert "restart 0:" in text and "restart 1:" in text  # SLURM_RESTART_COUNT of each run
    saved = re.search(r"\[incubate\[1\]\] stop requested: saved step (\d+)", text)
    assert saved, text[-4000:]
    assert 0 < int(saved.group(1)) < 256
    assert f"[incubate[1]] resuming from step {saved.group(1)}/256" in text
    assert "[incubate[0]]" not in text[:text.index("restart 1:")]  # the stop ended the job, not only module 1
    assert not any((ROOT / "runs" / ".stop").glob(f"job-{job}"))
    assert straight.returncode == 0, ref_log.read_text()[-3000:]
    for k in (0, 1):
        a = run / "incubate" / f"module-{k:02d}" / "export"
        b = ref / "tiny" / "incubate" / f"module-{k:02d}" / "export"
        assert (a / "manifest.json").exists()
        x, y = load_file(str(a / f"module-{k:02d}.safetensors")), load_file(str(b / f"module-{k:02d}.safetensors"))
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), f"module {k} {name} after the requeue differs from the uninterrupted run's"


def test_failed_array_task_keeps_assemble_from_running(cluster, with_meta):
    """Array mode: module 1's job fails (a stale checkpoint of other settings in its directory)."""
    other = fingerprint(load_recipe(TINY, ["incubate.lr=0.5"]).to_dict(), "incubate")
    stale = with_meta / "tiny" / "incubate" / "module-01" / "ckpt" / "step-00000004"
    stale.mkdir(parents=True)
    (stale / "COMPLETE").write_text(json.dumps({"step": 4, "fingerprint": other}))
    out, jobs = pipeline("--array", "--no-e2e", str(TINY), f"run.out_dir={with_meta}")
    assert "e2e" not in jobs and "(array 0-1)" in out
    states = wait(list(jobs.values()))
    tasks = {t["ArrayTaskId"]: t["JobState"] for t in states[jobs["incubate"]]}
    assert tasks == {"0": "COMPLETED", "1": "FAILED"}
    assert state(states, jobs["meta"]) == "COMPLETED"  # already done: a no-op
    for name in ("assemble", "report"):
        assert state(states, jobs[name]) == "CANCELLED"
        assert states[jobs[name]][0]["Reason"] == "DependencyNeverSatisfied"
    assert not (with_meta / "tiny" / "assemble").exists()
    logs = with_meta / "tiny" / "slurm"
    task_log = (logs / f"incubate-{jobs['incubate']}_1.out").read_text()
    assert "was made with other settings (incubate.lr: 0.5 -> 0.002)" in task_log
    check = (logs / f"check-{jobs['check']}.out").read_text()
    assert state(states, jobs["check"]) == "FAILED"  # the check job ran, said what is missing, exited 1
    assert "incubate[1] not started" not in check and "incubate[1] resumable at step 4" in check
    assert "incubate[0]" not in check.split("not complete:")[1].split("\n")[0]
    assert f"sbatch --array=1 slurm/incubate.sh {TINY} run.out_dir={with_meta}" in check
    assert "then assemble and fine-tune: sbatch slurm/assemble.sh" in check


def test_rendezvous_host_is_the_jobs_first_node(cluster):
    """slurm/env.sh: MASTER_ADDR is the first host of the job's node list (not `hostname --ip-address`, which is
    127.0.1.1 on Debian hosts), unless the site sets MODASM_MASTER_ADDR."""
    def addr(**env):
        res = subprocess.run(["bash", "-c", 'source slurm/env.sh && echo "$MASTER_ADDR"'], cwd=ROOT, capture_output=True,
                             text=True, env={**launch_env(MODASM_ROOT=str(ROOT)), "SLURM_JOB_ID": "77", **env})
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()
    assert addr(SLURM_JOB_NODELIST="gpu-[07-09],gpu-12") == "gpu-07"
    assert addr(SLURM_JOB_NODELIST="a100n[003,001]") == "a100n003"  # Slurm's order, as the batch host
    assert addr(SLURM_JOB_NODELIST="gpu-[07-09]", MODASM_MASTER_ADDR="10.1.2.3") == "10.1.2.3"


def test_sigterm_checkpoints_requeues_and_resumes_to_the_same_weights(cluster, tmp_path):
    """Preemption: SIGTERM to the job's steps (what Slurm sends at preemption with a GraceTime, as
    `scancel --signal=TERM`; torchrun forwards it too). The ranks save at their next step (not at the epoch's
    end), the job requeues itself (the batch shell never saw the signal: slurm/step.sh's mark tells it), and the
    rerun resumes from that step to the weights of an uninterrupted run."""
    ov = [str(TINY), "data.train_limit=8192", "e2e.log_every_steps=1"]
    ref = launch("e2e.py", *ov, f"run.out_dir={tmp_path / 'ref'}", timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    log, run = tmp_path / "e2e.out", tmp_path / "cut" / "tiny"
    job = subprocess.run(["sbatch", "--parsable", f"--output={log}", "slurm/e2e.sh", *ov, f"run.out_dir={tmp_path / 'cut'}"],
                         cwd=ROOT, env=slurm_env(gpus=1), capture_output=True, text=True, check=True).stdout.strip()
    metrics = run / "e2e" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
        assert time.time() < deadline, "no training step in 300 s:\n" + (log.read_text()[-3000:] if log.exists() else "")
        assert job_states(job)[job]["JobState"] not in DONE, log.read_text()[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    states = wait([job])
    text = log.read_text()
    assert state(states, job) == "COMPLETED" and states[job][0]["Restarts"] == "1", text[-4000:]
    assert f"[slurm] requeueing job {job}" in text
    saved = int(re.search(r"\[e2e\] stop requested: saved step (\d+)", text).group(1))
    assert 3 <= saved < 128, text[-3000:]  # at a step, not at the end of the epoch (128 steps)
    assert f"[e2e] resuming from step {saved}/128" in text
    assert "plan: global batch 64 = micro-batch 64 x accumulation 1 x 1 rank(s)" in text
    from safetensors.torch import load_file
    for m in (0, 1):
        a = load_file(str(tmp_path / "ref" / "tiny" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        b = load_file(str(run / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"module {m} differs after the requeue"


def test_node_death_requeue_resumes_from_the_newest_complete_checkpoint(cluster, tmp_path, dist_info, one_thread,
                                                                        record_property):
    """A node that dies under a running phase: every process of the job (batch shell, srun, torchrun, the rank, W&B's
    service) SIGKILLed at once, so no trap runs and nothing is saved; then `scontrol requeue`. (Not `scancel
    --signal=KILL`: Slurm turns that into a cancellation, SIGTERM first; the ranks may save at their next step, and
    the job ends CANCELLED.) The next start resumes from the newest complete checkpoint and ends with the weights of
    an uninterrupted run; it continues the same W&B run; no secret of the job's environment (nor one expanded into an argument) reaches the Slurm log or
    anything the run wrote."""
    import signal

    import psutil

    from test_faults import SECRETS, leaks, record, wandb_steps
    from modasm.engine import complete_steps, latest
    record(record_property, fault="a node dies under a Slurm job, which is requeued",
           injected="SIGKILL of every process of the job (scontrol listpids) once a checkpoint is complete, then "
                    "scontrol requeue; secrets "
                    "in the job's environment and one in an argument",
           checks="restart 1 resumes from the newest complete checkpoint; weights equal an uninterrupted run's; "
                  "one W&B run id, the last start logs every step; no secret in the log or the run directory")
    url = f"pipe:curl -s https://example.invalid/train-0.tar?token={SECRETS['HF_TOKEN']}"
    ov = [str(TINY), "data.train_limit=8192", "e2e.ckpt_every_steps=8", f"data.train_shards={url}"]
    # the uninterrupted run, in this process (one thread: what the job's process computes)
    phases.run_e2e(load_recipe(TINY, [*ov[1:], f"run.out_dir={tmp_path / 'ref'}", "logging.wandb.mode=disabled"]),
                   dist_info)
    log, run = tmp_path / "e2e.out", tmp_path / "cut" / "tiny"
    ckpt = run / "e2e" / "ckpt"
    job = subprocess.run(["sbatch", "--parsable", f"--output={log}", "slurm/e2e.sh", *ov, f"run.out_dir={run.parent}"],
                         cwd=ROOT, env={**slurm_env(gpus=1), **SECRETS}, capture_output=True, text=True,
                         check=True).stdout.strip()
    deadline = time.time() + 300
    while not complete_steps(ckpt):
        assert time.time() < deadline, "no checkpoint in 300 s:\n" + (log.read_text()[-3000:] if log.exists() else "")
        assert job_states(job)[job]["JobState"] not in DONE, log.read_text()[-3000:]
        time.sleep(0.2)
    listed = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True, check=True).stdout
    pids = [int(line.split()[0]) for line in listed.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(pids) >= 4, listed  # batch shell, srun, torchrun, the rank (and W&B's service)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait([job])
    deadline = time.time() + 120  # requeue only once none of the killed job runs
    while any(str(run.parent) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        assert time.time() < deadline, "the killed job's processes are still running"
        time.sleep(0.5)
    killed_at = complete_steps(ckpt)[-1]
    assert killed_at < 128 and not (run / "e2e" / "export" / "manifest.json").exists(), "killed too late"
    subprocess.run(["scontrol", "requeue", job], check=True)
    states = wait([job])
    text = log.read_text()
    assert state(states, job) == "COMPLETED" and states[job][0]["Restarts"] == "1", text[-4000:]
    assert "restart 0:" in text and "restart 1:" in text and "stop requested" not in text
    assert f"[e2e] resuming from step {killed_at}/128" in text, text[-3000:]
    from safetensors.torch import load_file
    for m in (0, 1):
        a = load_file(str(tmp_path / "ref" / "tiny" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        b = load_file(str(run / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"module {m} differs after the requeue"
    stored = latest(ckpt)[1]["wandb_run_id"]
    files = sorted((run / "wandb").glob("offline-run-*/run-*e2e*.wandb"))
    assert len(files) == 2 and {f.name for f in files} == {f"run-{stored}.wandb"}, [str(f) for f in files]
    logged = {json.loads(line)["step"] for line in (run / "e2e" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "train"' in line}
    assert wandb_steps(files[-1]) >= logged
    written = {str(p): p.read_bytes() for p in [log, *run.rglob("*")] if p.is_file()}  # the job's (not ref's)
    assert not leaks(written), leaks(written)
    assert "token=$HF_TOKEN" in text  # the job line shows the argument, redacted


def submit(script: str, log: Path, *args: str, gpus: int = 1, **env) -> str:
    return subprocess.run(["sbatch", "--parsable", f"--output={log}", f"slurm/{script}", *args], cwd=ROOT,
                          env={**slurm_env(gpus=gpus), **env}, capture_output=True, text=True, check=True).stdout.strip()


def wait_until_settled(job: str, timeout: float = 600) -> dict:
    """The job's fields once it has ended, or as soon as it was requeued (Restarts > 0: a job that requeues itself
    after every run never ends; the test fails on the first requeue instead of waiting for it)."""
    deadline = time.time() + timeout
    while True:
        fields = job_states(job)[job]
        if fields["JobState"] in DONE or fields["Restarts"] != "0":
            return fields
        assert time.time() < deadline, f"job {job} still {fields['JobState']} after {timeout} s"
        time.sleep(0.5)


def cancel_for_good(job: str) -> None:
    """Cleanup: cancel the job, and again if it requeued itself instead of ending (what these tests look for)."""
    for _ in range(3):
        if job_states(job)[job]["JobState"] in DONE:
            return
        subprocess.run(["scancel", job], capture_output=True)
        deadline = time.time() + 60
        while job_states(job)[job]["JobState"] not in DONE | {"PENDING"} and time.time() < deadline:
            time.sleep(0.5)


def wait_for_steps(job: str, log: Path, metrics: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= steps):
        assert time.time() < deadline, f"no {steps} training steps in {timeout} s:\n" + (
            log.read_text()[-3000:] if log.exists() else "(no job output yet)")
        assert job_states(job)[job]["JobState"] not in DONE, log.read_text()[-3000:]
        time.sleep(0.2)


def test_scancel_cancels_the_job_instead_of_requeueing_it(cluster, tmp_path):
    """A plain `scancel JOB` of a running phase: Slurm sends SIGTERM to every step and to the batch shell. The job
    ends CANCELLED; the batch shell does not put it back in the queue (a user must not have to cancel twice),
    whether or not the ranks managed to save before Slurm's KillWait ran out."""
    log, run = tmp_path / "e2e.out", tmp_path / "tiny"
    job = submit("e2e.sh", log, str(TINY), "data.train_limit=8192", "e2e.log_every_steps=1", f"run.out_dir={tmp_path}")
    try:
        wait_for_steps(job, log, run / "e2e" / "metrics.jsonl", 2)
        subprocess.run(["scancel", job], check=True)
        fields = wait_until_settled(job)
        time.sleep(3)  # a requeue would show by now
        fields = job_states(job)[job]
        text = log.read_text()
        assert (fields["JobState"], fields["Restarts"]) == ("CANCELLED", "0"), f"{fields['JobState']}, " \
            f"restarts {fields['Restarts']}:\n{text[-3000:]}"
        assert "requeueing" not in text and "restart 1:" not in text, text[-3000:]
        assert "[slurm] TERM: the job is ending" in text, text[-3000:]
    finally:
        cancel_for_good(job)
    assert not any((ROOT / "runs" / ".stop").glob(f"job-{job}*"))


def test_a_failing_module_of_a_farm_fails_the_job_instead_of_requeueing_it(cluster, with_meta):
    """A one-node farm (one torchrun, two module groups) where module 0's group hits a non-finite loss, a failure that
    recurs on every run: torchrun stops the healthy group with SIGTERM (it may save), and the job must end FAILED with
    the error as the last lines of its log, not requeue itself into the same failure again and again (its
    afternotok check job would never run)."""
    log = with_meta / "incubate.out"
    # module 1's group must still be training when module 0's fails at its first step: 256 steps of its own
    job = submit("incubate.sh", log, str(TINY), f"run.out_dir={with_meta}", "data.train_limit=16384",
                 "incubate.log_every_steps=1", gpus=2,
                 MODASM_FAULT_NONFINITE="loss@1", MODASM_FAULT_PHASE="incubate[0]")
    try:
        fields = wait_until_settled(job)
        text = log.read_text()
        assert (fields["JobState"], fields["Restarts"]) == ("FAILED", "0"), f"{fields['JobState']}, " \
            f"restarts {fields['Restarts']}:\n{text[-4000:]}"
        assert fields["ExitCode"] != "0:0", fields["ExitCode"]
        assert "group 2/2 (rank 1): modules [0]" in text  # the failing module had a group of its own
        assert "requeueing" not in text, text[-4000:]
        tail = text.rstrip().splitlines()[-3:]
        assert "failed: the step exited" in "\n".join(tail), "\n".join(tail)
        assert "incubate[0]: non-finite loss at step 1/256" in tail[-1], "\n".join(tail)
    finally:
        cancel_for_good(job)
    assert not any((ROOT / "runs" / ".stop").glob(f"job-{job}*"))


def test_a_rank_that_never_stops_is_killed_and_the_job_requeues(cluster, tmp_path):
    """The time limit's USR1 while a rank hangs (stuck in I/O or a collective: it never reaches its next step): the
    batch shell waits MODASM_STOP_TIMEOUT seconds, kills the job's steps and requeues the job (instead of waiting
    into the time limit, a TIMEOUT); the rerun resumes from the newest complete checkpoint and finishes."""
    log, run = tmp_path / "e2e.out", tmp_path / "tiny"
    job = submit("e2e.sh", log, str(TINY), "data.train_limit=1024", "e2e.ckpt_every_steps=2", "e2e.log_every_steps=1",
                 f"run.out_dir={tmp_path}", MODASM_STOP_TIMEOUT="5", MODASM_FAULT_HANG_AT_STEP="3",
                 MODASM_FAULT_RESTART="0")
    try:
        deadline = time.time() + 300
        while "hanging after step 3" not in (log.read_text() if log.exists() else ""):
            assert time.time() < deadline and job_states(job)[job]["JobState"] not in DONE, \
                log.read_text()[-3000:] if log.exists() else "(no job output)"
            time.sleep(0.2)
        signalled = time.time()
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        deadline = signalled + 60
        while job_states(job)[job]["Restarts"] == "0":
            assert time.time() < deadline, f"not requeued {time.time() - signalled:.0f} s after USR1 (a rank hangs; " \
                f"stop timeout 5 s): {job_states(job)[job]['JobState']}\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        states = wait([job])
    finally:
        cancel_for_good(job)
    text = log.read_text()
    assert state(states, job) == "COMPLETED" and states[job][0]["Restarts"] == "1", text[-4000:]
    assert "the ranks did not stop within 5 s" in text and f"[slurm] requeueing job {job}" in text, text[-4000:]
    assert "[e2e] resuming from step 2/16" in text, text[-4000:]
    assert (run / "e2e" / "export" / "manifest.json").exists()
