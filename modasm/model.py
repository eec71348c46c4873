"""Meta, hybrid(k), assembled and E2E ViTs, all plain timm ``VisionTransformer``s.

Every model here is a timm ViT whose blocks are grouped into K modules by a *layout*: the number of
blocks each module has in that model. The meta model's layout is ``[1]*K``; hybrid(k)'s is the meta
layout with ``split[k]`` at position k; the target (assembled or E2E) has layout ``split``.
Module 0 also owns the patch embedding, class token and position embedding; module K-1 also owns
the final norm and the head. Module-local tensor names start their block index at 0, so a module
trained inside hybrid(k) loads unchanged into the target.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from .config import ModelConfig
from .errors import UserError

# Top-level children of timm's VisionTransformer and the module that owns them.
_FIRST = ("cls_token", "reg_token", "pos_embed", "patch_embed", "pos_drop", "patch_drop", "norm_pre")
_LAST = ("norm", "fc_norm", "head_drop", "head", "attn_pool")


def meta_layout(K: int) -> list[int]:
    return [1] * K


def hybrid_layout(split: list[int], k: int) -> list[int]:
    layout = meta_layout(len(split))
    layout[k] = split[k]
    return layout


def build_vit(cfg: ModelConfig, layout: list[int], drop_path: float = 0.0) -> VisionTransformer:
    """A timm ViT of depth ``sum(layout)``; drop path grows linearly over that whole depth."""
    vit = VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, embed_dim=cfg.embed_dim, depth=sum(layout),
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps), drop_path_rate=drop_path,
    )
    if cfg.cls_token_init == "paper":  # the paper's timm 0.3.2; timm >= 0.9 draws N(0, 1e-6)
        trunc_normal_(vit.cls_token, std=0.02)
    return vit


def block_range(layout: list[int], m: int) -> range:
    start = sum(layout[:m])
    return range(start, start + layout[m])


def owner(name: str, layout: list[int]) -> tuple[int, str]:
    """(module index, module-local name) of a parameter/buffer name of a model with this layout."""
    head, _, rest = name.partition(".")
    if head == "blocks":
        idx_s, _, tail = rest.partition(".")
        idx = int(idx_s)
        for m in range(len(layout)):
            r = block_range(layout, m)
            if idx in r:
                return m, f"blocks.{idx - r.start}.{tail}"
        raise AssertionError(f"block {idx} outside layout {layout}")
    if head in _FIRST:
        return 0, name
    if head in _LAST:
        return len(layout) - 1, name
    raise AssertionError(f"tensor {name!r} has no owning module; update model._FIRST/_LAST")


def module_state(model: nn.Module | dict, layout: list[int], m: int) -> dict[str, torch.Tensor]:
    """Module m's tensors under module-local names (detached, contiguous CPU copies); ``model`` is a model
    or a state dict of one (e.g. the fp32 master weights of a bf16 engine, ``engine.master_state``)."""
    out = {}
    for name, t in (model.items() if isinstance(model, dict) else model.state_dict().items()):
        mod, local = owner(name, layout)
        if mod == m:
            out[local] = t.detach().to("cpu", copy=True).contiguous()
    return out


def global_name(local: str, layout: list[int], m: int) -> str:
    if local.startswith("blocks."):
        _, idx_s, tail = local.split(".", 2)
        return f"blocks.{block_range(layout, m).start + int(idx_s)}.{tail}"
    return local


def expected_module_shapes(model: nn.Module, layout: list[int], m: int) -> dict[str, tuple]:
    owned = ((owner(n, layout), t) for n, t in model.state_dict().items())
    return {local: tuple(t.shape) for (mod, local), t in owned if mod == m}


@torch.no_grad()
def load_module_state(model: nn.Module, layout: list[int], m: int, state: dict[str, torch.Tensor],
                      source: str = "state") -> None:
    """Copy module m's tensors into ``model``; names and shapes must match exactly."""
    expected = expected_module_shapes(model, layout, m)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise UserError(f"{source}: module {m} tensors do not match the model "
                         f"(missing {missing[:5]}, unexpected {extra[:5]})")
    target = model.state_dict()
    for local, t in state.items():
        if tuple(t.shape) != expected[local]:
            raise UserError(f"{source}: tensor {local!r} of module {m} has shape {tuple(t.shape)}, "
                             f"the model expects {expected[local]}")
        target[global_name(local, layout, m)].copy_(t)


def freeze_all_but(model: nn.Module, layout: list[int], k: int) -> None:
    """Only module k trains: every other parameter gets ``requires_grad=False``.

    (The paper's code leaves the meta blocks after k trainable, so their weight gradients are
    computed and all-reduced but never applied.)
    """
    for name, p in model.named_parameters():
        p.requires_grad_(owner(name, layout)[0] == k)


def build_meta(cfg: ModelConfig, drop_path: float = 0.0) -> VisionTransformer:
    return build_vit(cfg, meta_layout(cfg.K), drop_path)


def build_hybrid(cfg: ModelConfig, k: int, meta_modules: dict[int, dict[str, torch.Tensor]] | None,
                 drop_path: float = 0.0) -> VisionTransformer:
    """Meta model with meta block k replaced by ``split[k]`` fresh blocks; only module k trains.

    ``meta_modules`` maps module index -> module-local tensors of the trained meta model (module k's
    entry, if present, is ignored: module k starts fresh). ``None`` leaves everything fresh (used to
    count parameters on the meta device).
    """
    layout = hybrid_layout(cfg.split, k)
    model = build_vit(cfg, layout, drop_path)
    if meta_modules is not None:
        for m in range(cfg.K):
            if m != k:
                load_module_state(model, layout, m, meta_modules[m], source=f"meta module {m}")
    freeze_all_but(model, layout, k)
    return model


def build_target(cfg: ModelConfig, drop_path: float = 0.0,
                 modules: dict[int, dict[str, torch.Tensor]] | None = None) -> VisionTransformer:
    """The full-depth ViT: from scratch (E2E) or assembled from K module states."""
    model = build_vit(cfg, cfg.split, drop_path)
    if modules is not None:
        for m in range(cfg.K):
            load_module_state(model, cfg.split, m, modules[m], source=f"module {m}")
    return model


def split_modules(model: nn.Module | dict, layout: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    return {m: module_state(model, layout, m) for m in range(len(layout))}


def param_groups(model: nn.Module, weight_decay: float, decay_tokens: bool = False) -> list[dict]:
    """AdamW groups: no decay on biases and norms, nor (unless ``decay_tokens``) on the class/register
    tokens and position embedding (as timm/DeiT)."""
    tokens = () if decay_tokens else ("cls_token", "pos_embed", "reg_token")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in tokens else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
