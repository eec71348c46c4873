"""Reliability proven by fault injection (issue 14): real processes (torchrun, DeepSpeed, gloo) SIGKILLed mid-phase
and mid-save, a full disk, non-finite losses and gradients, planted pickles, secrets in the environment.

Faults come from the test-only hooks of ``modasm/faults.py`` (inert unless a ``MODASM_FAULT_*`` variable is set:
the process SIGKILLs itself at an exact step or after an exact number of checkpoint / shard files), a real tmpfs
that fills up, and files planted on disk. ``make reliability-report`` runs these tests (and the older refusal and
resume tests) and writes docs/reliability.md from their results.
"""
import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, launch
from modasm import engine, integrity, phases, train
from modasm.config import load_recipe
from modasm.engine import complete_steps
from wandb_reader import read_wandb_offline

FAULTS = ("KILL_AT_STEP", "KILL_IN_CKPT", "KILL_IN_EXPORT", "NONFINITE", "PHASE", "RANK")


def run(script, *args, nproc=0, faults=None, env=None, timeout=600):
    """An entry point as a user runs it, with ``faults`` as MODASM_FAULT_* variables (the others unset)."""
    extra = {**{f"MODASM_FAULT_{k}": "" for k in FAULTS}, **(env or {})}
    extra.update({f"MODASM_FAULT_{k}": str(v) for k, v in (faults or {}).items()})
    return launch(script, *args, nproc=nproc, timeout=timeout, env=extra)


def out_of(res) -> str:
    return res.stdout[-3000:] + res.stderr[-4000:]


def assert_same_shards(a: Path, b: Path, modules):
    for m in modules:
        x, y = load_file(str(a / f"module-{m:02d}.safetensors")), load_file(str(b / f"module-{m:02d}.safetensors"))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"module {m} tensor {k} differs from the uninterrupted run"


def wandb_steps(path: Path) -> set[int]:
    """Steps of the history records in an offline W&B run file (one a SIGKILL cut short is read up to the cut)."""
    steps = set()
    try:
        for rec in read_wandb_offline(path):
            if rec.WhichOneof("record_type") == "history":
                steps.add(rec.history.step.num)
    except Exception:  # noqa: BLE001 - a record cut by the kill ends the file
        pass
    return steps


def record(record_property, **row):
    """What a row of docs/reliability.md says about this test (tests/reliability_report.py collects them)."""
    record_property("reliability", json.dumps(row))


# ---------------------------------------------------------------- 1 + 2 + 8: killed ranks, killed saves, one W&B run


@pytest.mark.multiproc
@pytest.mark.slow
def test_zero2_assemble_killed_rank_killed_saves_resume_bit_exact(incubated, tmp_path, dist_info, record_property):
    """A 2-rank ZeRO-2 assemble under torchrun, SIGKILLed three times: rank 1 in the middle of writing the step-4
    checkpoint (its optimizer partition written, its RNG file and rank 0's not all), rank 0 between checkpoints
    (after step 5), rank 0 in the middle of the export (module 0 written, module 1 and the manifest not). Each re-run
    of the same command resumes from the newest complete checkpoint, never from the half-written one, and the final
    shards equal an uninterrupted run's bit for bit; all four starts log to one W&B run."""
    record(record_property, fault="a rank killed in a DeepSpeed save (2-rank ZeRO-2 assemble)",
           injected="MODASM_FAULT_KILL_IN_CKPT=4:1 on rank 1: SIGKILL after its first file of step 4",
           checks="step 4 left without COMPLETE (rank 1's partition there, its RNG file not); step 2 intact and "
                  "used; the half-written step never picked up")
    record(record_property, fault="a rank killed mid-phase under torchrun (2-rank ZeRO-2 assemble)",
           injected="MODASM_FAULT_KILL_AT_STEP=5 on rank 0 (torchrun ends rank 1)",
           checks="re-run resumes from step 4, the newest complete checkpoint")
    record(record_property, fault="killed while the shard set is exported",
           injected="MODASM_FAULT_KILL_IN_EXPORT=1: SIGKILL after module 0's file, before the manifest",
           checks="the set has no manifest, so it is not taken as done; re-run exports it; final shards equal an "
                  "uninterrupted run's bit for bit (fp32, CPU)")
    record(record_property, fault="one W&B run per phase across kills and restarts",
           injected="the three SIGKILLs above, four starts in all",
           checks="every offline run file of the phase has the run id recorded in its checkpoints; together they "
                  "log every step")
    ov = ["deepspeed.zero_stage=2", "assemble.ckpt_every_steps=2", "assemble.log_every_steps=1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    shutil.copytree(incubated, ref)
    shutil.copytree(incubated, cut)
    res = run("assemble.py", str(TINY), f"run.out_dir={ref}", *ov, nproc=2)
    assert res.returncode == 0, out_of(res)
    phase = cut / "tiny" / "assemble"
    ckpt, export = phase / "ckpt", phase / "export"
    args = ("assemble.py", str(TINY), f"run.out_dir={cut}", *ov)

    res = run(*args, nproc=2, faults={"KILL_IN_CKPT": "4:1", "RANK": 1})
    assert res.returncode != 0 and "[fault]" in res.stdout, out_of(res)
    assert complete_steps(ckpt) == [2]
    half = ckpt / engine.tag(4)
    assert (half / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file(), sorted(os.listdir(half))
    assert not (half / "rng-rank00001.pt").exists() and not (half / "COMPLETE").exists()
    engine.verify(ckpt, 2, engine.latest(ckpt)[1], dist_info)  # the previous checkpoint is intact

    res = run(*args, nproc=2, faults={"KILL_AT_STEP": 5, "RANK": 0})
    assert res.returncode != 0 and "[fault]" in res.stdout, out_of(res)
    assert "resuming from step 2/8" in res.stdout, out_of(res)
    assert complete_steps(ckpt) == [2, 4]

    res = run(*args, nproc=2, faults={"KILL_IN_EXPORT": 1})
    assert res.returncode != 0 and "resuming from step 4/8" in res.stdout, out_of(res)
    assert (export / "module-00.safetensors").is_file() and not (export / "manifest.json").exists()
    assert complete_steps(ckpt)[-1] == 8

    res = run(*args, nproc=2)
    assert res.returncode == 0, out_of(res)
    assert "resuming from step 8/8" in res.stdout
    assert_same_shards(ref / "tiny" / "assemble" / "export", export, (0, 1))
    assert not [p.name for p in ckpt.iterdir() if p.is_dir() and not (p / "COMPLETE").exists()], \
        "a half-written checkpoint was left behind"

    # one W&B run id in all four starts (each start writes its own offline file, named after the id): the id in
    # the checkpoints; the last start re-sent what the killed ones' W&B service dropped, so it has every step
    stored = engine.latest(ckpt)[1]["wandb_run_id"]
    files = sorted((cut / "tiny" / "wandb").glob("offline-run-*/run-*assemble*.wandb"))
    assert len(files) == 4 and {f.name for f in files} == {f"run-{stored}.wandb"}, [str(f) for f in files]
    assert wandb_steps(files[-1]) >= set(range(1, 9)), sorted(wandb_steps(files[-1]))


@pytest.fixture(scope="module")
def meta3(tmp_path_factory, dist_info):
    out = tmp_path_factory.mktemp("meta3")
    phases.run_meta(load_recipe(TINY, [f"run.out_dir={out}", "model.split=[1,1,1]"]), dist_info)
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_farmed_incubation_group_killed_resumes_bit_exact(meta3, tmp_path, dist_info, one_thread, record_property):
    """Farmed incubation, 2 groups x 1 rank in one torchrun (group 1: modules 0 then 2; group 2: module 1). Group
    1's rank is SIGKILLed at step 3 of module 2, after module 0 was exported; torchrun ends group 2 too, wherever it
    was. The same command again skips module 0, resumes module 2 from its checkpoint, finishes module 1, and every
    module equals an uninterrupted run's bit for bit."""
    record(record_property, fault="a rank of one module group killed in a farmed incubation",
           injected="torchrun, incubate.groups=2 (2 x 1 rank); MODASM_FAULT_PHASE=incubate[2] "
                    "MODASM_FAULT_KILL_AT_STEP=3 (torchrun ends the other group)",
           checks="re-run skips exported module 0, resumes module 2 from step 2, finishes module 1; all 3 modules "
                  "equal an uninterrupted run's bit for bit")
    ov = ["model.split=[1,1,1]", "incubate.ckpt_every_steps=2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for d in (ref, cut):
        shutil.copytree(meta3 / "tiny" / "meta", d / "tiny" / "meta")
    # the uninterrupted run: modules one after the other, in this process (one thread: what a launch computes)
    phases.run_incubate_all(load_recipe(TINY, [f"run.out_dir={ref}", *ov]), dist_info)
    args = ("incubate.py", str(TINY), f"run.out_dir={cut}", *ov, "incubate.groups=2")
    mod = lambda k: cut / "tiny" / "incubate" / f"module-{k:02d}"  # noqa: E731

    res = run(*args, nproc=2, faults={"PHASE": "incubate[2]", "KILL_AT_STEP": 3})
    assert res.returncode != 0 and "[fault] incubate[2]" in res.stdout, out_of(res)
    assert "group 1/2 (rank 0): modules [0, 2]" in res.stdout
    assert (mod(0) / "export" / "manifest.json").is_file() and not (mod(2) / "export" / "manifest.json").exists()
    assert complete_steps(mod(2) / "ckpt") == [2]

    res = run(*args, nproc=2)
    assert res.returncode == 0, out_of(res)
    assert "[incubate[0]] already complete" in res.stdout and "[incubate[2]] resuming from step 2/8" in res.stdout
    for k in range(3):
        assert_same_shards(ref / "tiny" / "incubate" / f"module-{k:02d}" / "export", mod(k) / "export", (k,))


# ---------------------------------------------------------------- 3: a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the disk-full test mounts a tmpfs and needs root")
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.slow
def test_disk_full_names_path_and_bytes_then_resumes(small_disk, dist_info, record_property):
    """On a file system with room for one checkpoint (~560 kB) but not two, the second save fails: one line naming
    the checkpoint's path and the bytes it needs, exit 2, the partial files removed, the first checkpoint intact.
    With space freed, the same command resumes from it and finishes."""
    record(record_property, fault="the disk fills up during a checkpoint",
           injected="a 2 MiB tmpfs mounted by the test, a filler file leaving room for one checkpoint",
           checks="one line naming the path and bytes needed, exit 2, no traceback, previous checkpoint intact and "
                  "verified, partial files removed; after freeing space the re-run resumes and finishes")
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024 - 900 * 1024))
    args = ("e2e.py", str(TINY), f"run.out_dir={small_disk}", "e2e.ckpt_every_steps=2")
    res = run(*args, env={"WANDB_MODE": "disabled"})  # W&B's own files would fill the disk at their own pace
    assert res.returncode == 2, out_of(res)
    ckpt = small_disk / "tiny" / "e2e" / "ckpt"
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    size = sum(p.stat().st_size for p in (ckpt / engine.tag(2)).iterdir())
    assert f"{ckpt / engine.tag(4)}: writing the checkpoint of step 4 failed" in errors[0], errors[0]
    assert f"needs about {size} bytes" in errors[0] and "step 2) is intact" in errors[0], errors[0]
    assert complete_steps(ckpt) == [2] and not (ckpt / engine.tag(4)).exists()
    engine.verify(ckpt, 2, engine.latest(ckpt)[1], dist_info)

    filler.unlink()
    done = phases.run_e2e(load_recipe(TINY, [*args[2:], "logging.wandb.mode=disabled"]), dist_info)  # here, in-process
    recs = [json.loads(line) for line in (small_disk / "tiny" / "e2e" / "metrics.jsonl").read_text().splitlines()]
    assert done["steps"] == 8 and [r["step"] for r in recs if r["kind"] == "resume"] == [2]
    assert (small_disk / "tiny" / "e2e" / "export" / "manifest.json").is_file()


# ---------------------------------------------------------------- 4: non-finite loss and gradients


@pytest.mark.slow
def test_nonfinite_loss_stops_the_phase_at_that_step(tmp_path, dist_info, record_property):
    """NaN loss at step 5 (checkpoints every 2 steps): exit 2 with one line naming phase, step and 'loss'; no
    checkpoint or shard of that step; the re-run resumes from step 4."""
    record(record_property, fault="non-finite loss",
           injected="MODASM_FAULT_NONFINITE=loss@5 (the loss of step 5 times NaN)",
           checks="exit 2, one line naming phase, step 5 and 'loss'; nothing saved from step 5; re-run resumes "
                  "from step 4 and finishes")
    args = ("e2e.py", str(TINY), f"run.out_dir={tmp_path}", "e2e.ckpt_every_steps=2")
    res = run(*args, faults={"NONFINITE": "loss@5"})
    assert res.returncode == 2 and "Traceback" not in res.stderr, out_of(res)
    ckpt = tmp_path / "tiny" / "e2e" / "ckpt"
    assert "error: e2e: non-finite loss at step 5/8 (epoch 1); stopped before this step changed the weights" \
        in res.stderr and f"(step 4, {ckpt / engine.tag(4)})" in res.stderr, res.stderr[-2000:]
    assert complete_steps(ckpt) == [2, 4] and not (tmp_path / "tiny" / "e2e" / "export").exists()
    recs = [json.loads(line) for line in (tmp_path / "tiny" / "e2e" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["what"]) for r in recs if r["kind"] == "nonfinite"] == [(5, "loss")]
    done = phases.run_e2e(load_recipe(TINY, args[2:]), dist_info)  # the same command again (here, in-process)
    recs = [json.loads(line) for line in (tmp_path / "tiny" / "e2e" / "metrics.jsonl").read_text().splitlines()]
    assert done["steps"] == 8 and [r["step"] for r in recs if r["kind"] == "resume"] == [4]


def _module_state(ckpt: Path, step: int) -> dict:
    # the test's own checkpoint, just written: unpickled here to compare the weights DeepSpeed saved
    return torch.load(ckpt / engine.tag(step) / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.mark.slow
def test_nonfinite_gradients_stop_or_are_skipped_within_the_limit(tiny, dist_info, monkeypatch, record_property):
    """Finite loss, inf/NaN gradients: the plain engine (our check before its step) and ZeRO-2 (DeepSpeed skips the
    step, we see it) both stop with 'grad norm' at that step. With e2e.max_nonfinite_steps=1 one such step is
    skipped (the weights after it equal those before it) and a second one stops the phase."""
    record(record_property, fault="non-finite gradients (finite loss)",
           injected="MODASM_FAULT_NONFINITE=grad@3 (the backward multiplies the gradients by inf); plain fp32 "
                    "engine and ZeRO-2",
           checks="NonFiniteError naming phase, step 3 and 'grad norm'; checkpoint of step 2 stays the newest")
    record(record_property, fault="non-finite weights after a step (an update that overflows)",
           injected="MODASM_FAULT_NONFINITE=weights@4 (an inf weight left by step 4), checkpoints every 2 steps",
           checks="the check before every save stops the phase at step 4; checkpoint of step 2 stays the newest")
    record(record_property, fault="a few non-finite steps allowed (<section>.max_nonfinite_steps)",
           injected="MODASM_FAULT_NONFINITE=loss@3,grad@6 with e2e.max_nonfinite_steps=1",
           checks="step 3 skipped: the weights saved after it equal those before it; step 6 stops the phase")
    for zero in (0, 2):
        monkeypatch.setenv("MODASM_FAULT_NONFINITE", "grad@3")
        recipe = tiny("e2e.ckpt_every_steps=2", f"deepspeed.zero_stage={zero}", f"run.name=z{zero}")
        with pytest.raises(train.NonFiniteError, match=r"^e2e: non-finite grad norm at step 3/8 \(epoch 1\)"):
            phases.run_e2e(recipe, dist_info)
        assert complete_steps(phases.phase_dir(recipe, "e2e") / "ckpt") == [2], zero

    # an update that overflows with finite gradients: the weights are checked before every save
    monkeypatch.setenv("MODASM_FAULT_NONFINITE", "weights@4")
    recipe = tiny("e2e.ckpt_every_steps=2", "run.name=weights")
    with pytest.raises(train.NonFiniteError, match=r"^e2e: non-finite weights at step 4/8 .* stopped before they were"):
        phases.run_e2e(recipe, dist_info)
    assert complete_steps(phases.phase_dir(recipe, "e2e") / "ckpt") == [2]

    monkeypatch.setenv("MODASM_FAULT_NONFINITE", "loss@3,grad@6")
    recipe = tiny("e2e.ckpt_every_steps=1", "e2e.keep_ckpts=8", "e2e.max_nonfinite_steps=1", "run.name=skip")
    with pytest.raises(train.NonFiniteError, match=r"non-finite grad norm at step 6/8 .* more than e2e\.max_nonfin"):
        phases.run_e2e(recipe, dist_info)
    ckpt = phases.phase_dir(recipe, "e2e") / "ckpt"
    assert complete_steps(ckpt) == [1, 2, 3, 4, 5]
    before, after, later = (_module_state(ckpt, s) for s in (2, 3, 4))
    assert all(torch.equal(before[k], after[k]) for k in before), "the skipped step changed the weights"
    assert any(not torch.equal(after[k], later[k]) for k in after)
    recs = [json.loads(line) for line in (phases.phase_dir(recipe, "e2e") / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["what"]) for r in recs if r["kind"] == "nonfinite"] == [(3, "loss"), (6, "grad norm")]


# ---------------------------------------------------------------- 5: planted pickles never run


class _Payload:
    """Unpickling this creates a file: what a planted checkpoint file could do (and worse)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _plant(path: Path, payload: Path) -> None:
    torch.save({"module": _Payload(payload)}, path)


def test_planted_pickle_is_refused_and_never_runs(tiny, dist_info, tmp_path, record_property):
    """A checkpoint of step 1, then four plantings, each refused before DeepSpeed (or its universal conversion)
    unpickles anything: a replaced model file, an extra optimizer file, a whole planted checkpoint directory with a
    forged marker, and a planted file in a checkpoint that would be converted (saved by 2 ranks). The payload, which
    demonstrably runs when unpickled, never ran."""
    record(record_property, fault="a planted malicious pickle in a checkpoint directory",
           injected="torch.save of an object whose unpickling creates a file: replacing the model states, as an "
                    "extra optimizer file, as a whole planted step directory with a forged marker, and in a "
                    "checkpoint due for universal conversion",
           checks="CheckpointError naming the file (digest mismatch / not saved / unsigned marker); the payload's "
                  "file never exists; nothing converted; the genuine checkpoint then resumes")
    control, payload = tmp_path / "control", tmp_path / "payload"
    _plant(tmp_path / "demo.pt", control)
    torch.load(tmp_path / "demo.pt", weights_only=False)  # what DeepSpeed's loader would do with it
    assert control.exists(), "the payload does not run: this test would show nothing"

    recipe = tiny()
    train.request_stop()  # checkpoint at the next optimizer step and return
    assert phases.run_e2e(recipe, dist_info) == {"interrupted": True, "step": 1}
    ckpt = phases.phase_dir(recipe, "e2e") / "ckpt"
    step1 = ckpt / engine.tag(1)
    model = step1 / "mp_rank_00_model_states.pt"
    genuine = model.read_bytes()

    def refused(path, what):
        with pytest.raises(integrity.CheckpointError, match="^" + re.escape(f"{path}: {what}")):
            phases.run_e2e(recipe, dist_info)
        assert not payload.exists(), "the planted payload ran"

    _plant(model, payload)
    refused(model, "sha256 ")
    model.write_bytes(genuine)

    extra = step1 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _plant(extra, payload)
    refused(extra, "not part of the checkpoint as saved")
    extra.unlink()

    forged = ckpt / engine.tag(99)
    forged.mkdir()
    _plant(forged / "mp_rank_00_model_states.pt", payload)
    marker = json.loads((step1 / "COMPLETE").read_text())
    marker.update(step=99, files={"mp_rank_00_model_states.pt": integrity.sha256(forged / "mp_rank_00_model_states.pt")})
    (forged / "COMPLETE").write_text(json.dumps(marker))
    refused(forged / "COMPLETE", "not signed with this machine's checkpoint key")
    shutil.rmtree(forged)

    # saved by 2 ranks (a marker this machine signs), then a planted partition: the conversion never starts
    marker = {k: v for k, v in json.loads((step1 / "COMPLETE").read_text()).items() if k not in ("files", "mac")}
    integrity.write_marker(step1, {**marker, "world": 2}, {})
    _plant(extra, payload)
    refused(extra, "not part of the checkpoint as saved")
    assert not any(p.name.endswith(("-universal", ".tmp")) for p in ckpt.iterdir()), "a conversion started"
    extra.unlink()
    integrity.write_marker(step1, marker, {})

    done = phases.run_e2e(recipe, dist_info)
    assert done["steps"] == 8 and not payload.exists()


def test_every_load_in_the_library_is_weights_only_or_safetensors():
    """Audit: no ``pickle.load``/``loads``/``Unpickler`` and no ``torch.load`` without ``weights_only=True`` in the
    library and entry points (DeepSpeed's own loads are guarded by integrity.verify)."""
    bad = []
    for path in sorted([*(ROOT / "modasm").rglob("*.py"), *(ROOT / "launch").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "marshal.load"):
                bad.append(f"{where}: {name}")
            if name.endswith("torch.load") or name == "load" and "torch" in ast.unparse(node):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if kw.get("weights_only") != "True":
                    bad.append(f"{where}: torch.load without weights_only=True")
    assert not bad, bad


# ---------------------------------------------------------------- 6: no secret leaves the process

SECRETS = {"WANDB_API_KEY": "0f1e2d3c4b5a69788796a5b4c3d2e1f0deadbeef", "HF_TOKEN": "hf_plantedTokenForModasmTests",
           "AWS_SECRET_ACCESS_KEY": "aws/Planted+SecretKey/0123456789", "GITHUB_TOKEN": "ghp_plantedGithubToken0123",
           "DB_PASSWORD": "planted-password-42"}


def leaks(texts: dict[str, bytes]) -> list[str]:
    return [f"{where}: {name}" for where, data in texts.items() for name, value in SECRETS.items()
            if value.encode() in data]


@pytest.mark.slow
def test_no_secret_leaves_the_process(tmp_path, record_property):
    """Known tokens in the environment, one of them also expanded into an override by the shell (a token in a shard
    URL), another given by mistake as a recipe value: after a phase (W&B offline, a skipped non-finite step), a
    refused recipe and the report, no value appears in anything the run wrote (manifests, checkpoint markers,
    metrics.jsonl, the offline run-*.wandb files and W&B's logs, report.md) or printed (errors included). The
    recipe keeps saying where the value came from: ``$HF_TOKEN``."""
    record(record_property, fault="secrets in the environment (and expanded into arguments)",
           injected="WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN, DB_PASSWORD set; HF_TOKEN's value "
                    "in a data.train_shards override, AWS_SECRET_ACCESS_KEY's as a bad e2e.lr",
           checks="no value in any file the run wrote (manifests, markers, metrics.jsonl, run-*.wandb, W&B logs, "
                  "report.md) nor in stdout/stderr; the recorded recipe says $HF_TOKEN")
    url = f"pipe:curl -s https://example.invalid/train-0.tar?token={SECRETS['HF_TOKEN']}"
    ov = [str(TINY), f"run.out_dir={tmp_path}", f"data.train_shards={url}"]
    results = {"e2e": run("e2e.py", *ov, "e2e.ckpt_every_steps=4", "e2e.max_nonfinite_steps=1",
                          faults={"NONFINITE": "loss@6"}, env=SECRETS),
               "bad recipe": run("e2e.py", *ov, f"e2e.lr={SECRETS['AWS_SECRET_ACCESS_KEY']}", env=SECRETS),
               "report": run("report.py", str(tmp_path / "tiny"), env=SECRETS)}
    assert results["e2e"].returncode == 0 and results["report"].returncode == 0, out_of(results["e2e"])
    assert "step 6: non-finite loss; step skipped" in results["e2e"].stdout
    assert results["bad recipe"].returncode == 2 and "got '$AWS_SECRET_ACCESS_KEY'" in results["bad recipe"].stderr
    written = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert any(name.endswith(".wandb") for name in written) and "tiny/report/report.md" in written
    assert any(name.endswith("COMPLETE") for name in written)
    printed = {f"{what} {stream}": getattr(res, stream).encode() for what, res in results.items()
               for stream in ("stdout", "stderr")}
    assert not leaks(written) and not leaks(printed), leaks(written) + leaks(printed)
    manifest = json.loads((tmp_path / "tiny" / "e2e" / "export" / "manifest.json").read_text())
    assert manifest["recipe"]["data"]["train_shards"] == url.replace(SECRETS["HF_TOKEN"], "$HF_TOKEN")
