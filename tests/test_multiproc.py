"""launch/assemble.py under torchrun with 2 gloo ranks: a real DeepSpeed data-parallel fine-tune."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, launch
from modasm import phases
from modasm.metrics import read_jsonl

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def incubated(tmp_path_factory, dist_info):
    """Meta model and both incubated modules of the tiny recipe (trained in this process)."""
    from modasm.config import load_recipe
    out = tmp_path_factory.mktemp("incubated")
    recipe = load_recipe(TINY, [f"run.out_dir={out}"])
    phases.run_meta(recipe, dist_info)
    phases.run_incubate_all(recipe, dist_info)
    return out


def _assemble(src, dst, *ov, nproc=0):
    shutil.copytree(src, dst)
    res = launch("assemble.py", str(TINY), f"run.out_dir={dst}", *ov, nproc=nproc)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res, dst / "tiny" / "assemble"


def test_two_ranks_match_one_rank(incubated, tmp_path):
    """Same global batch of 64: 1 rank x 64 vs 2 ranks x 16 x accum 2 (ZeRO-2, clipping)."""
    _, one = _assemble(incubated, tmp_path / "one", "assemble.clip_grad=1.0")
    res, two = _assemble(incubated, tmp_path / "two", "assemble.clip_grad=1.0", "assemble.accum_steps=2",
                         "deepspeed.zero_stage=2", nproc=2)
    start = next(r for r in read_jsonl(two / "metrics.jsonl") if r["kind"] == "start")
    assert start["world"] == 2 and start["micro_batch"] == 16
    m2 = json.loads((two / "export" / "manifest.json").read_text())["metrics"]
    m1 = json.loads((one / "export" / "manifest.json").read_text())["metrics"]
    assert m2["world"] == 2 and m2["eval_samples"] == 256  # sharded evaluation counts each sample once
    assert m2["device_seconds"] > 0
    for m in (0, 1):
        a = load_file(str(one / "export" / f"module-{m:02d}.safetensors"))
        b = load_file(str(two / "export" / f"module-{m:02d}.safetensors"))
        inc = load_file(str(incubated / "tiny" / "incubate" / f"module-{m:02d}" / "export" /
                            f"module-{m:02d}.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-4, msg=f"module {m} {k}")
        assert any(not torch.equal(a[k], inc[k]) for k in a), "fine-tuning changed nothing"
    assert abs(m1["top1"] - m2["top1"]) <= 1.0


def test_two_ranks_zero3_bf16(incubated, tmp_path):
    res, two = _assemble(incubated, tmp_path / "z3", "deepspeed.zero_stage=3", "deepspeed.precision=bf16",
                         "assemble.accum_steps=2", nproc=2)
    manifest = json.loads((two / "export" / "manifest.json").read_text())
    assert manifest["metrics"]["world"] == 2 and manifest["step"] == 8
    ref = load_file(str(incubated / "tiny" / "incubate" / "module-01" / "export" / "module-01.safetensors"))
    got = load_file(str(two / "export" / "module-01.safetensors"))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    evals = [r for r in read_jsonl(two / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and evals[-1]["eval_samples"] == 256
    # one writer per group: a single W&B run and a single set of records for the 2-rank phase
    assert len(list((tmp_path / "z3" / "tiny" / "wandb").glob("offline-run-*-tiny-assemble-*"))) == 1
    assert len([r for r in read_jsonl(two / "metrics.jsonl") if r["kind"] == "start"]) == 1
    # device time counts both ranks
    assert manifest["metrics"]["device_seconds"] == pytest.approx(2 * manifest["metrics"]["wall_seconds"])


def test_stop_signal_to_one_rank_checkpoints_all_and_resumes(tmp_path):
    """SIGUSR1 reaching one rank only: all ranks agree, save one complete checkpoint, exit; re-run resumes."""
    import signal
    import subprocess
    import time

    import psutil

    from conftest import ROOT, launch_cmd, launch_env
    ov = [f"run.out_dir={tmp_path}", "data.train_limit=8192", "e2e.epochs=2", "e2e.log_every_steps=1"]
    proc = subprocess.Popen(launch_cmd("e2e.py", str(TINY), *ov, nproc=2), cwd=ROOT, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "tiny" / "e2e" / "metrics.jsonl"
    deadline = time.time() + 120
    while not any(r["kind"] == "train" for r in read_jsonl(metrics)) and time.time() < deadline:
        time.sleep(0.05)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "e2e.py" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested: saved step" in out
    from modasm.engine import complete_steps
    steps = complete_steps(tmp_path / "tiny" / "e2e" / "ckpt")
    assert len(steps) == 1 and 0 < steps[0] < 256
    assert not (tmp_path / "tiny" / "e2e" / "export" / "manifest.json").exists()

    res = launch("e2e.py", str(TINY), *ov, nproc=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resuming from step {steps[0]}/256" in res.stdout
    assert (tmp_path / "tiny" / "e2e" / "export" / "manifest.json").exists()
