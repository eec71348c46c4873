"""The hand-off format: round trip, and bad shards refused before any training, naming file and mismatch."""
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import TINY, launch
from modasm import model as M
from modasm import phases, shards
from modasm.config import load_recipe
from modasm.shards import ShardError, _self_digest, load_modules, save_shards, verify


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dist_info):
    """Incubated runs of the tiny recipe: the real one, one of another split, one of another width."""
    made = {}
    for name, ov, todo in [("good", [], [0, 1]), ("split", ["model.split=[2,1]"], [1]),
                           ("width", ["model.embed_dim=48", "model.num_heads=2"], [0])]:
        out = tmp_path_factory.mktemp(name)
        recipe = load_recipe(TINY, [f"run.out_dir={out}", *ov])
        phases.run_meta(recipe, dist_info)
        for k in todo:  # the foreign runs only need the module that is copied from them
            phases.run_incubate(recipe, k, dist_info)
        made[name] = out
    return made


@pytest.fixture
def run(runs, tmp_path):
    """A private copy of the good run, and its recipe."""
    shutil.copytree(runs["good"], tmp_path / "run")
    return tmp_path / "run", load_recipe(TINY, [f"run.out_dir={tmp_path / 'run'}"])


def module_export(run_dir, k):
    return run_dir / "tiny" / "incubate" / f"module-{k:02d}" / "export"


def refused(recipe, dist_info, *patterns):
    with pytest.raises(ShardError) as e:
        phases.run_assemble(recipe, dist_info)
    for p in patterns:
        assert p in str(e.value), f"{p!r} not in {e.value}"
    assemble = phases.phase_dir(recipe, "assemble")
    assert not (assemble / "ckpt").exists() and not (assemble / "metrics.jsonl").exists(), "training started"
    return str(e.value)


def test_flipped_byte_is_refused(run, dist_info):
    run_dir, recipe = run
    f = module_export(run_dir, 1) / "module-01.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    refused(recipe, dist_info, str(f), "sha256")


def test_missing_module_is_refused(run, dist_info):
    run_dir, recipe = run
    shutil.rmtree(run_dir / "tiny" / "incubate" / "module-01")
    refused(recipe, dist_info, str(module_export(run_dir, 1)), "module(s) [1] of K=2", "--module 1",
            "sbatch --array=1 slurm/incubate.sh")


def test_missing_manifest_is_not_a_checkpoint(run, dist_info):
    run_dir, recipe = run
    (module_export(run_dir, 0) / "manifest.json").unlink()  # as after a writer killed mid-way
    refused(recipe, dist_info, str(module_export(run_dir, 0) / "manifest.json"), "module(s) [0]", "is missing")


def test_shard_of_another_split_is_refused(run, runs, dist_info):
    run_dir, recipe = run
    shutil.rmtree(module_export(run_dir, 1))
    shutil.copytree(module_export(runs["split"], 1), module_export(run_dir, 1))
    refused(recipe, dist_info, str(module_export(run_dir, 1) / "manifest.json"), "split [2, 1]", "[1, 2]")


def test_shard_of_another_width_is_refused(run, runs, dist_info):
    run_dir, recipe = run
    shutil.rmtree(module_export(run_dir, 0))
    shutil.copytree(module_export(runs["width"], 0), module_export(run_dir, 0))
    refused(recipe, dist_info, str(module_export(run_dir, 0) / "manifest.json"), "model.embed_dim is 48", "32")


def test_another_modules_shard_in_the_slot_is_refused(run, dist_info):
    run_dir, recipe = run
    shutil.rmtree(module_export(run_dir, 1))
    shutil.copytree(module_export(run_dir, 0), module_export(run_dir, 1))
    refused(recipe, dist_info, str(module_export(run_dir, 1) / "manifest.json"), "module 1 is missing",
            "holds modules [0]")


def test_meta_shard_in_an_incubate_slot_is_refused(run, dist_info):
    run_dir, recipe = run
    shutil.rmtree(module_export(run_dir, 1))
    shutil.copytree(run_dir / "tiny" / "meta" / "export", module_export(run_dir, 1))  # holds modules 0 and 1
    refused(recipe, dist_info, str(module_export(run_dir, 1) / "manifest.json"),
            "written by phase 'meta', expected 'incubate'")


def test_missing_file_under_a_manifest_is_refused(run, dist_info):
    run_dir, recipe = run
    f = module_export(run_dir, 1) / "module-01.safetensors"
    f.unlink()
    refused(recipe, dist_info, str(f), "file of module 1 is missing")


def test_truncated_manifest_is_refused(run, dist_info):
    run_dir, recipe = run
    m = module_export(run_dir, 0) / "manifest.json"
    m.write_bytes(m.read_bytes()[: len(m.read_bytes()) // 2])
    refused(recipe, dist_info, str(m), "not valid JSON")


def test_manifest_tensor_list_checked_against_the_file(run, dist_info):
    run_dir, recipe = run
    m = module_export(run_dir, 1) / "manifest.json"
    manifest = json.loads(m.read_text())
    tensors = manifest["modules"][0]["tensors"]
    tensors["head.weight"] = [tensors["head.weight"][0] + 1, tensors["head.weight"][1]]
    m.write_text(json.dumps(manifest))
    refused(recipe, dist_info, str(m), "manifest_sha256")  # an edited manifest fails its own digest
    manifest["manifest_sha256"] = _self_digest(manifest)  # consistent but wrong: caught against the file
    m.write_text(json.dumps(manifest))
    refused(recipe, dist_info, str(module_export(run_dir, 1) / "module-01.safetensors"), "tensors differ")


def test_flipped_byte_in_a_manifest_key_is_refused(run, dist_info):
    """One flipped bit in the top-level key "split" ("rplit") names the manifest, never a bare KeyError."""
    run_dir, recipe = run
    m = module_export(run_dir, 1) / "manifest.json"
    data = bytearray(m.read_bytes())
    i = data.index(b'\n "split":') + 3  # the top-level key (the recipe inside has one too, indented deeper)
    data[i] ^= 0x01
    m.write_bytes(bytes(data))
    refused(recipe, dist_info, str(m), "split")


def test_every_flipped_manifest_byte_is_refused(run):
    """No single-bit flip that changes a manifest's content is accepted (its own digest covers recipe and
    metrics). A flip in a float's 17th digit can parse to the same value: that content is unchanged."""
    run_dir, recipe = run
    d = module_export(run_dir, 1)
    original = (d / "manifest.json").read_bytes()
    accepted = []
    for i in range(len(original)):  # every byte (~5 000 verifications: a few seconds)
        data = bytearray(original)
        data[i] ^= 0x01
        (d / "manifest.json").write_bytes(bytes(data))
        try:
            got = verify(d, model_cfg=recipe.model, modules=[1], phase="incubate")
        except ShardError:
            continue
        if got != json.loads(original):
            accepted.append(i)
    (d / "manifest.json").write_bytes(original)
    verify(d, model_cfg=recipe.model, modules=[1], phase="incubate")
    assert not accepted, f"flips at bytes {accepted[:10]} were accepted"


def test_meta_shard_refused_before_incubation(run, dist_info):
    run_dir, recipe = run
    f = run_dir / "tiny" / "meta" / "export" / "module-00.safetensors"
    f.write_bytes(f.read_bytes()[:-10])  # truncated
    shutil.rmtree(run_dir / "tiny" / "incubate" / "module-00")
    with pytest.raises(ShardError, match="sha256"):
        phases.run_incubate(recipe, 0, dist_info)
    assert not (phases.phase_dir(recipe, "incubate", 0) / "ckpt").exists()


def test_cli_refuses_with_a_clear_error(run):
    run_dir, _ = run
    f = module_export(run_dir, 1) / "module-01.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    res = launch("assemble.py", str(TINY), f"run.out_dir={run_dir}")
    assert res.returncode == 2
    assert "sha256" in res.stderr and "module-01.safetensors" in res.stderr and "Traceback" not in res.stderr


def test_round_trip_and_manifest(tmp_path):
    recipe = load_recipe(TINY, [f"run.out_dir={tmp_path}"])
    cfg = recipe.model
    model = M.build_target(cfg)
    modules = M.split_modules(model, cfg.split)
    d = tmp_path / "set"
    save_shards(d, modules, model_cfg=cfg, layout=cfg.split, phase="assemble", step=7,
                recipe=recipe.to_dict(), metrics={"top1": 1.5})
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "module-00.safetensors", "module-01.safetensors"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["split"] == [1, 2] and manifest["layout"] == [1, 2]
    assert manifest["phase"] == "assemble" and manifest["step"] == 7 and manifest["metrics"] == {"top1": 1.5}
    assert manifest["recipe"]["model"]["embed_dim"] == 32 and manifest["model"]["embed_dim"] == 32
    assert [e["index"] for e in manifest["modules"]] == [0, 1]
    for e in manifest["modules"]:
        assert e["sha256"] == hashlib.sha256((d / e["file"]).read_bytes()).hexdigest()

    def no_unpickling(*a, **k):
        raise AssertionError("a shard was unpickled")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("load", "loads", "Unpickler"):
            mp.setattr(pickle, name, no_unpickling)
        mp.setattr(torch, "load", no_unpickling)
        loaded, _ = load_modules(d, model_cfg=cfg, modules=[0, 1], phase="assemble")
    for m in (0, 1):
        assert loaded[m].keys() == modules[m].keys()
        assert all(torch.equal(loaded[m][k], modules[m][k]) for k in modules[m])
        with safe_open(str(d / f"module-{m:02d}.safetensors"), "pt") as f:  # plain safetensors, no pickle
            assert set(f.keys()) == set(modules[m])
    # module-local names: module 1's two blocks are blocks.0 and blocks.1, and it owns the head
    assert any(k.startswith("blocks.1.") for k in modules[1]) and "head.weight" in modules[1]
    assert "pos_embed" in modules[0] and not any(k.startswith("blocks.1.") for k in modules[0])
    with pytest.raises(ShardError, match="written by phase 'assemble', expected 'incubate'"):
        load_modules(d, model_cfg=cfg, modules=[0], phase="incubate")


def test_manifest_is_written_last_and_a_rewrite_is_never_half_complete(tmp_path, monkeypatch):
    cfg = load_recipe(TINY, [f"run.out_dir={tmp_path}"]).model
    modules = M.split_modules(M.build_target(cfg), cfg.split)
    d = tmp_path / "set"
    kw = dict(model_cfg=cfg, layout=cfg.split, phase="assemble", recipe={}, metrics={})
    save_shards(d, modules, step=1, **kw)
    renamed, manifest_seen = [], []
    real_replace = os.replace  # every atomic write of the set (modasm.integrity.atomic_write) renames through it

    def replace(src, dst):
        renamed.append(Path(dst).name)
        manifest_seen.append((d / "manifest.json").exists())
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    save_shards(d, modules, step=2, **kw)  # a rewrite of a complete set
    assert renamed == ["module-00.safetensors", "module-01.safetensors", "manifest.json"]
    assert manifest_seen == [False, False, False], "the old manifest outlived part of the rewrite"
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "module-00.safetensors", "module-01.safetensors"]
    assert verify(d, model_cfg=cfg, modules=[0, 1])["step"] == 2

    # a writer that dies between two modules leaves a directory that is not a checkpoint
    real_save = shards.save_file

    def dies_on_module_1(tensors, path):
        if "module-01" in str(path):
            raise KeyboardInterrupt
        return real_save(tensors, path)
    monkeypatch.setattr(shards, "save_file", dies_on_module_1)
    with pytest.raises(KeyboardInterrupt):
        save_shards(d, modules, step=3, **kw)
    with pytest.raises(ShardError, match="no manifest.json"):
        verify(d, model_cfg=cfg, modules=[0, 1])
