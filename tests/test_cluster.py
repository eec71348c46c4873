"""The cluster path on one machine: several torchrun agents stand for several nodes.

A farm over nodes is one torchrun per node, each with its own rendezvous (``--part p/P``): a node whose groups
finish leaves, and the others train on. One torchrun world over several nodes holding several groups is
refused (it would die with its first node). A phase stopped on one number of ranks resumes on another.
"""
import json
import socket
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import K4, ROOT, TINY, assert_same_training, copy_meta, launch, launch_cmd, launch_env
from modasm import phases
from modasm.config import load_recipe

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _export(out, k):
    return out / "tiny" / "incubate" / f"module-{k:02d}" / "export"


def test_a_node_that_finishes_first_does_not_stop_the_other(meta4, tmp_path, dist_info):
    """Two 'nodes' (two torchrun agents, --part 0/2 and 1/2) farm K=4 over 2 groups: node 0's group has no work
    left (its modules were incubated before), its torchrun leaves, and node 1's group still trains both its
    modules to their shards. (One torchrun world over both nodes would lose node 1's ranks with node 0's agent.)"""
    out = copy_meta(meta4, tmp_path)
    ov = [str(TINY), f"run.out_dir={out}", *K4, "incubate.groups=2", "data.train_limit=2048", "incubate.epochs=2"]
    for k in (0, 2):  # group 0 = modules [0, 2]
        phases.run_incubate(load_recipe(TINY, ov[1:]), k, dist_info)
    procs = {p: subprocess.Popen(launch_cmd("incubate.py", *ov, f"--part={p}/2", nproc=1), cwd=ROOT,
                                 env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in (0, 1)}
    out0, _ = procs[0].communicate(timeout=600)
    node0_left = time.time()
    assert procs[0].returncode == 0, out0[-3000:]
    assert "group 1/2 (rank 0 of launch 1/2): modules [0, 2]" in out0
    assert procs[1].poll() is None, "node 1 had 2 modules to train but ended with node 0"
    out1, _ = procs[1].communicate(timeout=600)
    assert procs[1].returncode == 0, out1[-3000:]
    assert "group 2/2 (rank 0 of launch 2/2): modules [1, 3]" in out1
    for k in (1, 3):  # node 1's modules were exported after node 0 had gone
        manifest = _export(out, k) / "manifest.json"
        assert manifest.stat().st_mtime > node0_left - 1, k
        assert json.loads(manifest.read_text())["metrics"]["eval_samples"] == 256
    assert all((_export(out, k) / "manifest.json").exists() for k in range(4))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_world_over_two_nodes_with_two_groups_is_refused(meta4, tmp_path):
    out = copy_meta(meta4, tmp_path)
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes", str(ROOT / "launch" / "incubate.py"),
           str(TINY), f"run.out_dir={out}", *K4, "incubate.groups=2"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, outs):
        assert p.returncode != 0, text[-2000:]
    text = "".join(outs)
    assert "this torchrun spans 2 nodes and would hold 2 module groups" in text and "--part i/N" in text
    assert not any((out / "tiny" / "incubate").glob("module-*/ckpt")), "training started before the refusal"


def test_a_module_stopped_on_two_ranks_resumes_on_one(meta4, tmp_path):
    """ZeRO-2: a farm group of 2 ranks stops at step 3 (stop file); the module resumes as an array task on 1
    rank (DeepSpeed's universal checkpoint) and ends where an uninterrupted 2-rank run ends."""
    ov = [*K4, "deepspeed.zero_stage=2", "incubate.log_every_steps=1", "--module=1"]
    ref = copy_meta(meta4, tmp_path / "ref")
    res = launch("incubate.py", str(TINY), f"run.out_dir={ref}", *ov, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]

    out = copy_meta(meta4, tmp_path / "cut")
    stop = tmp_path / "stop"
    metrics = out / "tiny" / "incubate" / "module-01" / "metrics.jsonl"
    proc = subprocess.Popen(launch_cmd("incubate.py", str(TINY), f"run.out_dir={out}", *ov, nproc=2), cwd=ROOT,
                            env=launch_env(MODASM_STOP_FILE=str(stop)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2):
        assert time.time() < deadline and proc.poll() is None, "no training step in 300 s"
        time.sleep(0.05)
    stop.touch()
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]
    saved = int(text.split("stop requested: saved step ")[1].split(";")[0])
    assert 2 <= saved < 8, text[-2000:]
    stop.unlink()
    res = launch("incubate.py", str(TINY), f"run.out_dir={out}", *ov)  # one rank, another world
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"resuming from step {saved}/8" in res.stdout and "on 1 ranks (saved by 2)" in res.stdout
    a, b = load_file(str(_export(ref, 1) / "module-01.safetensors")), load_file(str(_export(out, 1) / "module-01.safetensors"))
    # the same samples make every step (the position is global); only the order of the fp32 sums differs
    # (2 partial gradients summed vs one): a gradient element, an fp32 sum of ~1e3 products, by r <~ 1e-4 of
    # itself; AdamW's update then differs by <= r x lr (2.5e-8) and each step's rounding by <= 1 ulp of the weight
    # (<= 1.2e-7 for |w| <= 1): 8 steps stay below 1e-6, a tenth of the 1e-5 allowed. The key rows of the qkv
    # biases (their gradient is rounding noise) within what 8 AdamW steps at the incubation's lr move them apart.
    recipe = load_recipe(TINY, ov[:-1])
    assert_same_training(a, b, 1e-5, recipe.incubate.lr * recipe.incubate.batch_size / 512, 8, "module 1:")
