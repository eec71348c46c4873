"""Incubation trains module k only: every other tensor stays bit-identical and never holds a .grad."""
import pytest
import torch

from modasm import model as M
from modasm import phases
from modasm.data import build_datasets
from modasm.shards import load_modules, read_manifest
from modasm.train import Job, train


@pytest.mark.parametrize("k", [0, 1, 2])
def test_incubating_module_k_changes_only_module_k(tiny, dist_info, k):
    recipe = tiny("model.split=[1,2,1]", "incubate.epochs=1", "data.train_limit=256")
    cfg = recipe.model
    phases.run_meta(recipe, dist_info)
    meta = phases.load_meta(recipe)

    torch.manual_seed(1)
    hybrid = M.build_hybrid(cfg, k, meta)
    layout = M.hybrid_layout(cfg.split, k)
    before = {n: t.clone() for n, t in hybrid.state_dict().items()}
    out = phases.phase_dir(recipe, "incubate", k)
    seen_grads = []
    # Record, after every backward, which parameters got a gradient.
    for name, p in hybrid.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p, name=name: seen_grads.append(name))
    job = Job(label=f"incubate[{k}]", section="incubate", out=out, model=hybrid, cfg=recipe.incubate,
              ds=recipe.deepspeed, seed=0, eval_batch=128,
              export=phases._exporter(recipe, "incubate", layout, out, only=k))
    metrics = train(job, *build_datasets(recipe.data, cfg.img_size, 0), dist_info)
    assert metrics["steps"] == 4

    after = hybrid.state_dict()
    for name, p in hybrid.named_parameters():
        owner = M.owner(name, layout)[0]
        if owner == k:
            assert not torch.equal(after[name], before[name]), f"module {k} tensor {name} did not train"
        else:
            assert p.grad is None, f"frozen {name} holds a .grad"
            assert not p.requires_grad
            assert torch.equal(after[name], before[name]), f"frozen {name} changed"
    # no weight gradient was ever computed for a meta parameter
    assert seen_grads and {M.owner(n, layout)[0] for n in seen_grads} == {k}

    # the export holds module k alone, and it equals the trained tensors
    manifest = read_manifest(out / "export")
    assert [e["index"] for e in manifest["modules"]] == [k]
    exported, _ = load_modules(out / "export", model_cfg=cfg, modules=[k], phase="incubate")
    assert all(torch.equal(v, M.module_state(hybrid, layout, k)[n]) for n, v in exported[k].items())
