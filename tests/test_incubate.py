"""Incubation trains module k only: every other tensor stays bit-identical and never holds a .grad.

Both tests run the real incubate path (phases in this process; launch/incubate.py under torchrun) and watch
the hybrid from the outside (tests/spy.py), so what is checked is the model the phase built and trained.
"""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, run_cmd
from modasm import model as M
from modasm import phases
from modasm.config import load_recipe
from modasm.shards import load_modules, read_manifest
from spy import watch_vits


def assert_only_module_k_trained(k, layout, start, final, trainable, graded, grads_left, meta, dtype):
    """start/final: the hybrid's tensors at its first forward and after the phase; meta: the meta shards."""
    owner = {n: M.owner(n, layout)[0] for n in start}
    own = {n for n in start if owner[n] == k}  # a timm ViT has no buffers: every tensor is a parameter
    assert trainable == own, (f"trainable outside module {k}: {sorted(trainable - own)[:5]}; "
                              f"frozen in module {k}: {sorted(own - trainable)[:5]}")
    # no weight gradient was ever computed for a meta parameter, and none is left on one
    assert graded and {owner[n] for n in graded} == {k}, f"gradients reached {sorted(set(graded))[:5]}"
    assert not {n for n in grads_left if owner[n] != k}, f"frozen tensors hold a .grad: {sorted(grads_left)[:5]}"
    for name, t in final.items():
        m, local = M.owner(name, layout)
        if m == k:
            continue
        # the meta tensor as the engine holds it (bf16: DeepSpeed's cast is the only change), never touched
        assert torch.equal(start[name], meta[m][local].to(dtype)), f"frozen {name} did not start as the meta's"
        assert torch.equal(t, start[name]), f"frozen {name} changed: max |diff| {(t.float() - start[name].float()).abs().max()}"
    assert any(not torch.equal(final[n], start[n]) for n in final if owner[n] == k), f"module {k} did not train"


@pytest.fixture(scope="module")
def meta3(tmp_path_factory, dist_info):
    """A trained meta model of a K=3 split, so that k=1 has frozen modules on both sides."""
    out = tmp_path_factory.mktemp("meta3")
    phases.run_meta(load_recipe(TINY, [f"run.out_dir={out}", "model.split=[1,2,1]", "data.train_limit=256"]), dist_info)
    return out


@pytest.mark.parametrize("k", [0, 1, 2])
def test_incubating_module_k_changes_only_module_k(meta3, tmp_path, dist_info, k):
    shutil.copytree(meta3 / "tiny" / "meta", tmp_path / "tiny" / "meta")
    recipe = load_recipe(TINY, [f"run.out_dir={tmp_path}", "model.split=[1,2,1]", "data.train_limit=256"])
    meta = phases.load_meta(recipe)
    with watch_vits() as seen:
        metrics = phases.run_incubate_all(recipe, dist_info, module=k)[k]  # what launch/incubate.py --module k runs
    assert metrics["steps"] == 4 and len(seen) == 1
    hybrid, layout = seen[0], M.hybrid_layout(recipe.model.split, k)
    final = hybrid.final()
    assert_only_module_k_trained(k, layout, hybrid.start, final, hybrid.trainable, hybrid.graded,
                                 hybrid.grads_left(), meta, torch.float32)
    # the export holds module k alone, and it equals the trained tensors
    out = phases.export_dir(recipe, "incubate", k)
    assert [e["index"] for e in read_manifest(out)["modules"]] == [k]
    exported, _ = load_modules(out, model_cfg=recipe.model, modules=[k], phase="incubate")
    trained = M.module_state(hybrid.model, layout, k)
    assert exported[k].keys() == trained.keys() and all(torch.equal(v, trained[n]) for n, v in exported[k].items())


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_zero2_bf16_change_only_module_k(tmp_path, dist_info):
    """launch/incubate.py under torchrun, 2 ranks, ZeRO-2, bf16: both modules in turn by both ranks."""
    ov = [f"run.out_dir={tmp_path}", "deepspeed.zero_stage=2", "deepspeed.precision=bf16"]
    recipe = load_recipe(TINY, ov)
    phases.run_meta(recipe, dist_info)
    meta = phases.load_meta(recipe)
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "incubate_probe.py"), str(probe), str(TINY), *ov, "incubate.groups=1"]
    res = run_cmd(cmd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    split = recipe.model.split
    depth_of = {sum(M.hybrid_layout(split, k)): k for k in range(recipe.model.K)}
    assert len(depth_of) == recipe.model.K, "the test tells the hybrids apart by depth"
    finals = {}
    for rank in (0, 1):
        for i in range(recipe.model.K):
            seen = json.loads((probe / f"rank{rank}-model{i}.json").read_text())
            tensors = load_file(str(probe / f"rank{rank}-model{i}.safetensors"))
            start = {n[6:]: t for n, t in tensors.items() if n.startswith("start/")}
            final = {n[6:]: t for n, t in tensors.items() if n.startswith("final/")}
            k = depth_of[seen["depth"]]
            assert all(t.dtype == torch.bfloat16 for t in final.values())
            assert_only_module_k_trained(k, M.hybrid_layout(split, k), start, final, set(seen["trainable"]),
                                         set(seen["graded"]), set(seen["grads_left"]), meta, torch.bfloat16)
            finals[rank, k] = final
        assert not (probe / f"rank{rank}-model{recipe.model.K}.json").exists()
    for k in range(recipe.model.K):
        layout = M.hybrid_layout(split, k)
        assert finals[0, k].keys() == finals[1, k].keys()
        for n in finals[0, k]:  # data-parallel replicas end identical
            assert torch.equal(finals[0, k][n], finals[1, k][n]), f"ranks differ on hybrid {k} {n}"
        # the export is module k's trained weights (bf16-rounded, as docs/method.md says, stored as fp32)
        exported, manifest = load_modules(phases.export_dir(recipe, "incubate", k), model_cfg=recipe.model,
                                          modules=[k], phase="incubate")
        assert manifest["metrics"]["world"] == 2
        trained = {M.owner(n, layout)[1]: t.float() for n, t in finals[0, k].items() if M.owner(n, layout)[0] == k}
        assert exported[k].keys() == trained.keys()
        for n, v in exported[k].items():
            assert torch.equal(v, trained[n]), f"export of module {k} {n} differs from the trained weights"
