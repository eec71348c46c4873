"""Farmed incubation: one torchrun world split into module groups that train independently."""
import json
import shutil
import signal
import subprocess
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, launch, launch_cmd, launch_env
from modasm import dist, phases
from modasm.config import load_recipe

K4 = ["model.split=[1,1,1,1]"]


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


@pytest.fixture(scope="module")
def meta4(tmp_path_factory, dist_info):
    """A trained K=4 meta model of the tiny recipe."""
    out = tmp_path_factory.mktemp("meta4")
    phases.run_meta(load_recipe(TINY, [f"run.out_dir={out}", *K4]), dist_info)
    return out


def _copy_meta(src, dst):
    shutil.copytree(src / "tiny" / "meta", dst / "tiny" / "meta")
    return dst


def _shards(out, k):
    return load_file(str(out / "tiny" / "incubate" / f"module-{k:02d}" / "export" / f"module-{k:02d}.safetensors"))


@pytest.mark.multiproc
@pytest.mark.slow
def test_farm_of_two_groups_matches_each_module_alone(meta4, tmp_path):
    """4 ranks as 2 groups x 2 ranks == each module trained by 2 ranks alone (same seeds, fp32)."""
    farm = _copy_meta(meta4, tmp_path / "farm")
    res = launch("incubate.py", str(TINY), f"run.out_dir={farm}", *K4, "incubate.groups=2", nproc=4)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "group 1/2 (ranks 0-1): modules [0, 2]" in res.stdout
    assert "group 2/2 (ranks 2-3): modules [1, 3]" in res.stdout
    alone = _copy_meta(meta4, tmp_path / "alone")
    res = launch("incubate.py", str(TINY), f"run.out_dir={alone}", *K4, "incubate.groups=1", nproc=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    meta = load_file(str(meta4 / "tiny" / "meta" / "export" / "module-00.safetensors"))
    for k in range(4):
        a, b = _shards(alone, k), _shards(farm, k)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"module {k} {name}")
        m = json.loads((farm / "tiny" / "incubate" / f"module-{k:02d}" / "export" / "manifest.json").read_text())
        assert m["metrics"]["world"] == 2 and m["metrics"]["eval_samples"] == 256
    assert not torch.equal(_shards(farm, 0)["blocks.0.attn.qkv.weight"], meta["blocks.0.attn.qkv.weight"])


@pytest.mark.multiproc
@pytest.mark.slow
def test_group_finishes_while_the_other_is_frozen(meta4, tmp_path):
    """SIGSTOP group 2 right after the split: group 1 still builds its engines, trains, checkpoints,
    evaluates and exports both its modules, which it could not if any collective crossed groups."""
    out = _copy_meta(meta4, tmp_path)
    proc = subprocess.Popen(launch_cmd("incubate.py", str(TINY), f"run.out_dir={out}", *K4, "incubate.groups=2", nproc=4),
                            cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    done = lambda k: (out / "tiny" / "incubate" / f"module-{k:02d}" / "export" / "manifest.json").exists()  # noqa: E731
    try:
        deadline = time.time() + 120
        while not any("group 2/2" in l for l in lines):
            assert time.time() < deadline and proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.02)
        ranks = {int(c.environ()["RANK"]): c for c in psutil.Process(proc.pid).children(recursive=True)
                 if "incubate.py" in " ".join(c.cmdline()) and "RANK" in c.environ()}
        assert sorted(ranks) == [0, 1, 2, 3]
        for r in (2, 3):
            ranks[r].send_signal(signal.SIGSTOP)
        deadline = time.time() + 240
        while not (done(0) and done(2)):
            assert time.time() < deadline, "group 1 did not finish while group 2 was frozen:\n" + "".join(lines)[-3000:]
            time.sleep(0.2)
        assert not done(1) and not done(3)
        for r in (2, 3):
            ranks[r].send_signal(signal.SIGCONT)
        assert proc.wait(timeout=240) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            for c in psutil.Process(proc.pid).children(recursive=True):
                c.send_signal(signal.SIGCONT)
            proc.kill()
    reader.join(timeout=10)
    assert all(done(k) for k in range(4))
