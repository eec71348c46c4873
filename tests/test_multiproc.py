"""launch/assemble.py under torchrun with 2 gloo ranks: a real DeepSpeed data-parallel fine-tune."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, assert_export_is_master, assert_same_training, launch
from modasm.config import load_recipe
from modasm.metrics import read_jsonl

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _assemble(src, dst, *ov, nproc=0):
    shutil.copytree(src, dst)
    res = launch("assemble.py", str(TINY), f"run.out_dir={dst}", *ov, nproc=nproc)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res, dst / "tiny" / "assemble"


# Tolerance of 1 rank vs 2 ranks (ZeRO-2, micro-batch 16 x accum 2 x 2 ranks = the same 64 images a step).
# The runs differ only in the order fp32 sums are taken: the loss/gradient over 64 samples in one batch vs
# four micro-batches of 16 averaged by accumulation and the gloo all-reduce. Each gradient element then
# differs by a few ulp of its magnitude (measured: the logged global gradient norms of the 8 steps agree to
# 1.2e-7 relative, i.e. <= 2 ulp). Adam turns the gradient into an update m/(sqrt(v)+eps) of size <= lr
# (peak 1e-3 * 64/512 = 1.25e-4), so a relative gradient error r moves an update by <= r * lr ~ 1e-11
# (only an element whose gradient cancels to within Adam's eps = 1e-8 of zero amplifies an absolute error
# d, to lr * d / eps): far below the rounding of the weights themselves. That rounding dominates: once the
# runs differ, each step's w + update rounds independently, <= 1 ulp(|w|) apart per step; the largest
# weights are the LayerNorm gains (|w| ~ 1, ulp 1.19e-7), so 8 steps can differ by <= 8 x 1.19e-7 =
# 9.5e-7 (measured: 2.2e-7). ATOL = 2e-6 covers that bound twice over and is 1/300 of the most a weight
# moves in this fine-tune (6.0e-4; the test requires > 100 x ATOL), so a real divergence fails.
# One kind of element does cancel to zero exactly: the key part of every qkv bias (softmax ignores a bias added
# to every key), so its gradient is rounding noise, which Adam turns into lr-sized moves that differ between the
# runs: it is held to what 8 AdamW steps can move it apart, 2 x adam_moves_at_most(lr, 8) = 2.0e-3
# (conftest.assert_same_training).
# The weights alone cannot catch a gradient summed over the ranks instead of averaged: Adam is invariant to
# the gradient's scale and clipping rescales it (measured: summed, the weights still agree to 1.4e-7). The
# logged gradient norm (before clipping) is not: it doubles (one rank's gradient alone: off by ~30 %). The norms
# of the two runs differ by rounding only: every gradient element is an fp32 sum of <= 64 samples x 17 tokens
# ~ 1.1e3 products, taken in another order, so it differs by <= 1.1e3 x u (6.6e-5) of the sum of its terms'
# magnitudes, which the samples' partial cancellation can make a few times the sum itself: GRAD_NORM_RTOL = 1e-3
# holds on any CPU (measured here: 1.2e-7) and is 1/300 of the smallest error it is there to catch.
ATOL, GRAD_NORM_RTOL = 2e-6, 1e-3
LR = 1e-3 * 64 / 512  # the tiny recipe's assemble: peak lr x batch / 512


def test_two_ranks_match_one_rank(incubated, tmp_path):
    """Same global batch of 64: 1 rank x 64 vs 2 ranks x 16 x accum 2 (ZeRO-2, clipping)."""
    log = "assemble.log_every_steps=1"  # a gradient norm per step; inert (not part of the result)
    _, one = _assemble(incubated, tmp_path / "one", "assemble.clip_grad=1.0", log)
    res, two = _assemble(incubated, tmp_path / "two", "assemble.clip_grad=1.0", "assemble.accum_steps=2",
                         "deepspeed.zero_stage=2", log, nproc=2)
    start = next(r for r in read_jsonl(two / "metrics.jsonl") if r["kind"] == "start")
    assert start["world"] == 2 and start["micro_batch"] == 16
    m2 = json.loads((two / "export" / "manifest.json").read_text())["metrics"]
    m1 = json.loads((one / "export" / "manifest.json").read_text())["metrics"]
    assert m2["world"] == 2 and m2["eval_samples"] == 256  # sharded evaluation counts each sample once
    assert m2["device_seconds"] > 0
    moved = 0.0
    for m in (0, 1):
        a = load_file(str(one / "export" / f"module-{m:02d}.safetensors"))
        b = load_file(str(two / "export" / f"module-{m:02d}.safetensors"))
        inc = load_file(str(incubated / "tiny" / "incubate" / f"module-{m:02d}" / "export" /
                            f"module-{m:02d}.safetensors"))
        assert_same_training(a, b, ATOL, LR, 8, f"module {m}")
        for k in a:
            moved = max(moved, (a[k] - inc[k]).abs().max().item())
    assert moved > 100 * ATOL, f"fine-tuning moved the weights by at most {moved:.3g}: too little to compare"
    norms = [[r["grad_norm"] for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "train"] for d in (one, two)]
    assert len(norms[0]) == len(norms[1]) == 8
    for step, (g1, g2) in enumerate(zip(*norms), 1):
        assert g2 == pytest.approx(g1, rel=GRAD_NORM_RTOL), \
            f"step {step}: gradient norm {g2} on 2 ranks, {g1} on 1 (ratio {g2 / g1:.4f})"
    assert abs(m1["top1"] - m2["top1"]) <= 1.0


def test_two_ranks_zero3_bf16(incubated, tmp_path):
    res, two = _assemble(incubated, tmp_path / "z3", "deepspeed.zero_stage=3", "deepspeed.precision=bf16",
                         "assemble.accum_steps=2", nproc=2)
    manifest = json.loads((two / "export" / "manifest.json").read_text())
    assert manifest["metrics"]["world"] == 2 and manifest["step"] == 8
    # every full tensor, gathered from both ranks' partitions: the fp32 master weights (not rounded to bf16)
    recipe = load_recipe(TINY, [f"run.out_dir={tmp_path / 'z3'}"])
    assert_export_is_master(two / "export", two / "ckpt", recipe.model, recipe.model.split, bf16=True)
    evals = [r for r in read_jsonl(two / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and evals[-1]["eval_samples"] == 256
    # one writer per group: a single W&B run and a single set of records for the 2-rank phase
    assert len(list((tmp_path / "z3" / "tiny" / "wandb").glob("offline-run-*-tiny-assemble-*"))) == 1
    assert len([r for r in read_jsonl(two / "metrics.jsonl") if r["kind"] == "start"]) == 1
    # device time counts both ranks
    assert manifest["metrics"]["device_seconds"] == pytest.approx(2 * manifest["metrics"]["wall_seconds"])


def _same_weights(a, b, what):
    for m in range(2):
        x = load_file(str(a / f"module-{m:02d}.safetensors"))
        y = load_file(str(b / f"module-{m:02d}.safetensors"))
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{what}: module {m} tensor {k} differs from the uninterrupted run's"


def test_stop_signal_to_one_rank_checkpoints_all_and_resumes(tmp_path):
    """SIGUSR1 reaching one rank only: all ranks agree, save one complete checkpoint, exit; the re-run
    resumes and ends with exactly the weights of a run that was never interrupted."""
    import signal
    import subprocess
    import threading

    import psutil

    from conftest import ROOT, STARTUP_S, launch_cmd, launch_env, wait_for
    from modasm.engine import complete_steps
    ov = [str(TINY), "data.train_limit=8192", "e2e.epochs=2", "e2e.log_every_steps=1"]
    run = tmp_path / "stopped" / "tiny" / "e2e"
    proc = subprocess.Popen(launch_cmd("e2e.py", *ov, f"run.out_dir={tmp_path / 'stopped'}", nproc=2), cwd=ROOT,
                            env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(r["kind"] == "train" for r in read_jsonl(run / "metrics.jsonl")), STARTUP_S,
                 "training step logged", proc, lambda: "".join(lines))
        ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "e2e.py" in " ".join(c.cmdline())]
        assert len(ranks) == 2, f"expected 2 ranks under torchrun, found {[c.cmdline() for c in ranks]}"
        ranks[1].send_signal(signal.SIGUSR1)
        proc.wait(timeout=STARTUP_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=30)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested: saved step" in out, out[-3000:]
    steps = complete_steps(run / "ckpt")
    assert len(steps) == 1 and 0 < steps[0] < 256, f"checkpoints {steps}: the signal came too late (or never)"
    assert not (run / "export" / "manifest.json").exists()

    res = launch("e2e.py", *ov, f"run.out_dir={tmp_path / 'stopped'}", nproc=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resuming from step {steps[0]}/256" in res.stdout
    straight = launch("e2e.py", *ov, f"run.out_dir={tmp_path / 'straight'}", nproc=2)
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    _same_weights(tmp_path / "straight" / "tiny" / "e2e" / "export", run / "export", "resumed after SIGUSR1")
