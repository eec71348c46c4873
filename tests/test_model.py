"""Module ownership and assembly: the assembled model is the K incubated modules composed."""
import pytest
import torch

from modasm import model as M
from modasm.phases import export_dir, load_incubated
from modasm.shards import save_shards


def run_module(vit, layout, m, h):
    """Module m of ``vit`` alone, using timm's own sub-modules: embeddings, its blocks, norm + head."""
    K = len(layout)
    if m == 0:
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(h))))
    for i in M.block_range(layout, m):
        h = vit.blocks[i](h)
    if m == K - 1:
        h = vit.forward_head(vit.norm(h))
    return h


@pytest.mark.parametrize("split", [[2], [3], [1, 1], [1, 3], [2, 2, 2], [1, 2, 3], [1, 1, 1, 1, 1], [2, 1, 1, 1, 3]])
def test_ownership_covers_every_tensor_once(tiny, split):
    cfg = tiny(f"model.split={split}").model
    target = M.build_target(cfg)
    seen = {}
    for m in range(cfg.K):
        for local in M.module_state(target, cfg.split, m):
            seen.setdefault(M.global_name(local, cfg.split, m), []).append(m)
    assert sorted(seen) == sorted(target.state_dict())
    assert all(len(v) == 1 for v in seen.values())
    # module 0 owns the embeddings, module K-1 the final norm and head
    assert M.owner("pos_embed", cfg.split)[0] == 0 and M.owner("cls_token", cfg.split)[0] == 0
    assert M.owner("head.weight", cfg.split)[0] == cfg.K - 1 and M.owner("norm.bias", cfg.split)[0] == cfg.K - 1


@pytest.mark.parametrize("split", [[2], [1, 2], [2, 2], [1, 2, 1], [2, 2, 2], [1, 1, 1, 1, 1], [2, 1, 3, 1, 2]])
def test_assembled_equals_composition_of_incubated_modules(tiny, split):
    recipe = tiny(f"model.split={split}")
    cfg = recipe.model
    torch.manual_seed(0)
    meta = M.split_modules(M.build_meta(cfg), M.meta_layout(cfg.K))
    hybrids = []
    for k in range(cfg.K):
        h = M.build_hybrid(cfg, k, meta).eval()
        with torch.no_grad():  # stand-in for incubation: module k's weights move, nothing else
            for p in h.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        layout = M.hybrid_layout(cfg.split, k)
        save_shards(export_dir(recipe, "incubate", k), {k: M.module_state(h, layout, k)}, model_cfg=cfg,
                    layout=layout, phase="incubate", step=1, recipe=recipe.to_dict(), metrics={})
        hybrids.append((h, layout))

    assembled = M.build_target(cfg, modules=load_incubated(recipe)).eval()
    assert [len(M.block_range(cfg.split, m)) for m in range(cfg.K)] == cfg.split

    # in float64 (exact from the fp32 weights): the chain and the assembled model differ only in rounding order,
    # < 1e-12 of logits of order 1 (u = 1.1e-16), far below any real difference (the meta model's: > 1e-3)
    x = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size, dtype=torch.float64)
    with torch.no_grad():
        h = x
        for k, (hyb, layout) in enumerate(hybrids):
            h = run_module(hyb.double(), layout, k, h)
        out = assembled.double()(x)
    assert out.shape == (4, cfg.num_classes)
    torch.testing.assert_close(out, h, rtol=0, atol=1e-10)
    # and it is not trivially so: the meta model gives a different output
    meta_model = M.build_vit(cfg, M.meta_layout(cfg.K)).eval().double()
    for m, s in meta.items():
        M.load_module_state(meta_model, M.meta_layout(cfg.K), m, s)
    with torch.no_grad():
        assert not torch.allclose(meta_model(x), out, atol=1e-3)


def test_hybrid_freezes_everything_but_module_k(tiny):
    cfg = tiny("model.split=[2,3,1]").model
    meta = M.split_modules(M.build_meta(cfg), M.meta_layout(cfg.K))
    for k in range(cfg.K):
        h = M.build_hybrid(cfg, k, meta)
        layout = M.hybrid_layout(cfg.split, k)
        for name, p in h.named_parameters():
            assert p.requires_grad == (M.owner(name, layout)[0] == k), name
        # frozen modules hold exactly the meta weights
        for m in range(cfg.K):
            if m != k:
                got = M.module_state(h, layout, m)
                assert all(torch.equal(got[n], meta[m][n]) for n in got)


def test_load_module_state_refuses_wrong_shapes(tiny):
    cfg = tiny("model.split=[1,2]").model
    target = M.build_target(cfg)
    state = M.module_state(target, cfg.split, 1)
    with pytest.raises(ValueError, match="missing"):
        M.load_module_state(target, cfg.split, 0, state, source="x.safetensors")
    state["head.weight"] = torch.zeros(3, cfg.embed_dim)
    with pytest.raises(ValueError, match=r"x.safetensors.*head.weight"):
        M.load_module_state(target, cfg.split, 1, state, source="x.safetensors")


def test_decay_tokens_switch(tiny):
    """Module 0's hybrid: the tokens are exempt from weight decay unless decay_tokens (the paper's incubation)."""
    cfg = tiny().model
    hybrid = M.build_hybrid(cfg, 0, None)
    names = {id(p): n for n, p in hybrid.named_parameters()}

    def decayed(decay_tokens):
        groups = M.param_groups(hybrid, 0.05, decay_tokens)
        return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not {"cls_token", "pos_embed"} & decayed(False)
    assert {"cls_token", "pos_embed"} <= decayed(True)
    assert decayed(True) - decayed(False) == {"cls_token", "pos_embed"}  # biases and norms stay exempt


def test_cls_token_init_switch(tiny):
    import torch
    big = ("model.embed_dim=768", "model.num_heads=12")
    torch.manual_seed(0)
    timm_std = M.build_target(tiny(*big).model).cls_token.std().item()
    torch.manual_seed(0)
    paper_std = M.build_target(tiny(*big, "model.cls_token_init=paper").model).cls_token.std().item()
    assert timm_std < 1e-5 and abs(paper_std - 0.02) < 0.002
