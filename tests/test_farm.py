"""Farmed incubation: one torchrun world split into module groups that train independently."""
import json
import os
import signal
import subprocess
import threading

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import K4, ROOT, STARTUP_S, TINY, copy_meta, launch, launch_cmd, launch_env, wait_for
from modasm import dist, phases
from modasm.errors import UserError
from wandb_reader import offline_runs



def test_deal_longest_first():
    assert phases.deal([3, 3, 3, 3], 2) == [[0, 2], [1, 3]]  # equal depths: g, g+G, ...
    assert phases.deal([2] * 6, 3) == [[0, 3], [1, 4], [2, 5]]
    uneven = [4, 3, 3, 3, 3, 3, 3, 3, 3, 4]  # the paper's ViT-H alternative, K=10, on 4 groups
    plan = phases.deal(uneven, 4)
    assert sorted(k for g in plan for k in g) == list(range(10))
    load = [sum(phases.module_cost(uneven, k) for k in g) for g in plan]
    # 10 hybrids of cost 12-13 on 4 groups: two groups must take 3 -> 36 is the best possible makespan
    assert max(load) == 36 and plan[0][0] == 0 and plan[1][0] == 9  # the two deep modules start first
    assert phases.deal([1, 5, 1, 1], 2) == [[1, 3], [0, 2]]  # costs 4,8,4,4 (+K-1 frozen blocks): 12 | 8


def test_default_groups_and_bad_group_count():
    assert [dist.default_groups(4, w) for w in (1, 2, 3, 4, 8, 32)] == [1, 2, 3, 4, 4, 4]
    assert dist.default_groups(10, 8) == 8 and dist.default_groups(3, 8) == 2
    info = dist.DistInfo(rank=0, world=4, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"incubate.groups=3 must divide the number of ranks \(4\); valid: 1, 2, 4"):
        dist.split_world(info, 3)


def test_one_module_with_a_part_of_a_farm_is_refused(tiny):
    """`--module k --part p/P` (P > 1) would train module k once per launch into the same directory (the launches
    delete each other's checkpoint steps and write the same export): refused before any training, naming the fix."""
    info = dist.DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(UserError, match=r"--module 1 with --part 0/2: .*one torchrun world over all the nodes"):
        phases.run_incubate_all(tiny(), info, module=1, part=(0, 2))


def test_farm_over_more_nodes_than_modules_is_refused(tiny):
    """Each launch of a farm (one per node) holds whole module groups, at most K of them in all."""
    with pytest.raises(UserError, match=r"a farm over 3 nodes .* K=2 modules.*--farm-nodes 2.*--array"):
        phases.check_farm(tiny(), 3)
    with pytest.raises(UserError, match=r"incubate.groups=1 does not split over the farm's 2 launches"):
        phases.check_farm(tiny("incubate.groups=1"), 2)
    with pytest.raises(UserError, match=r"a farm needs at least one node, got 0"):
        phases.check_farm(tiny(), 0)
    phases.check_farm(tiny(), 2)
    phases.check_farm(tiny("incubate.groups=2"), 2)


@pytest.mark.parametrize("local_rank,gpus,index", [(0, 1, 0), (1, 1, 0), (3, 2, 1), (5, 8, 5)])
def test_ranks_beyond_the_gpus_share_them_and_deepspeed_is_told(local_rank, gpus, index):
    """More ranks than GPUs on a node (gpu_check.sh's farm: 2 ranks on 1 GPU) share them round robin, and DeepSpeed
    gets the same GPU: it takes the device from LOCAL_RANK (engine._set_distributed_vars, zero.Init), through its
    CUDA accelerator's device_name (used here as DeepSpeed uses it; no GPU needed to name one). Before, rank 1 of two
    on one GPU kept LOCAL_RANK=1 and DeepSpeed asked for cuda:1: an invalid device ordinal."""
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
    env = {"LOCAL_RANK": str(local_rank)}
    device = dist.bind_device(local_rank, gpus, env)
    assert device == torch.device("cuda", index)
    assert torch.device(CUDA_Accelerator().device_name(int(env["LOCAL_RANK"]))) == device
    assert env["LOCAL_RANK"] == str(index)  # unchanged when every rank has a GPU of its own


def _shards(out, k):
    return load_file(str(out / "tiny" / "incubate" / f"module-{k:02d}" / "export" / f"module-{k:02d}.safetensors"))


@pytest.mark.multiproc
@pytest.mark.slow
def test_farm_of_two_groups_matches_each_module_alone(meta4, tmp_path):
    """4 ranks as 2 groups x 2 ranks == each module trained alone by 2 ranks, as a Slurm array task does
    (--module k; the last one through SLURM_ARRAY_TASK_ID), same seeds, fp32: bit for bit."""
    farm = copy_meta(meta4, tmp_path / "farm")
    res = launch("incubate.py", str(TINY), f"run.out_dir={farm}", *K4, "incubate.groups=2", nproc=4)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "group 1/2 (ranks 0-1): modules [0, 2]" in res.stdout
    assert "group 2/2 (ranks 2-3): modules [1, 3]" in res.stdout
    alone = copy_meta(meta4, tmp_path / "alone")
    for k in range(4):
        how = {"env": {"SLURM_ARRAY_TASK_ID": str(k)}} if k == 3 else {}
        args = [] if k == 3 else ["--module", str(k)]
        res = launch("incubate.py", str(TINY), f"run.out_dir={alone}", *K4, *args, nproc=2, **how)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert "[incubate] group" not in res.stdout  # array mode: no farm
        trained = {j for j in range(4) if (alone / "tiny" / "incubate" / f"module-{j:02d}" / "export").exists()}
        assert trained == set(range(k + 1)), f"array task {k} left module shard sets {sorted(trained)}"
    meta = load_file(str(meta4 / "tiny" / "meta" / "export" / "module-00.safetensors"))
    for k in range(4):
        a, b = _shards(alone, k), _shards(farm, k)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(b[name], a[name]), f"module {k} {name}: the farm's differs from the array task's"
        for out in (farm, alone):
            m = json.loads((out / "tiny" / "incubate" / f"module-{k:02d}" / "export" / "manifest.json").read_text())
            assert m["metrics"]["world"] == 2 and m["metrics"]["eval_samples"] == 256
    assert not torch.equal(_shards(farm, 0)["blocks.0.attn.qkv.weight"], meta["blocks.0.attn.qkv.weight"])
    # each group's first rank (global ranks 0 and 2) writes its modules' W&B runs, and only it: one run each
    runs = offline_runs(farm / "tiny")
    names = sorted(r["name"] for r in runs.values())
    assert names == [f"incubate[{k}]" for k in range(4)], f"W&B runs (by id) of the farm: {names}"
    assert all(len(r["files"]) == 1 for r in runs.values()), {r["name"]: r["files"] for r in runs.values()}


@pytest.mark.multiproc
@pytest.mark.slow
def test_group_finishes_while_the_other_is_frozen(meta4, tmp_path):
    """SIGSTOP group 2 right after the split: group 1 still builds its engines, trains, checkpoints,
    evaluates and exports both its modules, which it could not if any collective crossed groups."""
    out = copy_meta(meta4, tmp_path)
    proc = subprocess.Popen(launch_cmd("incubate.py", str(TINY), f"run.out_dir={out}", *K4, "incubate.groups=2", nproc=4),
                            cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    output = lambda: "".join(lines)  # noqa: E731
    done = lambda k: (out / "tiny" / "incubate" / f"module-{k:02d}" / "export" / "manifest.json").exists()  # noqa: E731
    ranks = {}
    try:
        wait_for(lambda: any("group 2/2" in l for l in lines), STARTUP_S, "split into groups", proc, output)
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "incubate.py" in " ".join(c.cmdline()) and "RANK" in c.environ():
                    ranks[int(c.environ()["RANK"])] = c
            except psutil.NoSuchProcess:
                pass
        assert sorted(ranks) == [0, 1, 2, 3], f"ranks found under torchrun: {sorted(ranks)}\n{output()[-3000:]}"
        for r in (2, 3):
            ranks[r].send_signal(signal.SIGSTOP)
        assert not done(1) and not done(3), "group 2 finished a module before it was frozen"
        wait_for(lambda: done(0) and done(2), STARTUP_S, "group 1's modules 0 and 2 while group 2 was frozen",
                 proc, output)
        assert not done(1) and not done(3)
        for r in (2, 3):
            ranks[r].send_signal(signal.SIGCONT)
        try:
            proc.wait(timeout=STARTUP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launch did not end within {STARTUP_S} s after group 2 was resumed:\n{output()[-3000:]}")
        assert proc.returncode == 0, output()[-3000:]
    finally:
        if proc.poll() is None:
            for c in ranks.values():
                try:
                    c.send_signal(signal.SIGCONT)
                except psutil.NoSuchProcess:
                    pass
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=30)
    assert all(done(k) for k in range(4))
