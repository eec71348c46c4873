"""Watch the ViTs a phase trains, from the outside: the tests see what really trained without building the
model or the job themselves (in this process, or in a launched rank that dumps what it saw)."""
from __future__ import annotations

import contextlib

import torch
from timm.models.vision_transformer import VisionTransformer


class Watched:
    """One model: its tensors at its first forward pass (the engine holds it by then, nothing has stepped:
    under bf16 that is DeepSpeed's bf16 copy), which parameters may train, which ever received a gradient."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.start = state(model)
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.graded: set[str] = set()
        for n, p in model.named_parameters():
            if p.requires_grad:  # a parameter without requires_grad can never be given a gradient
                p.register_post_accumulate_grad_hook(lambda _p, n=n: self.graded.add(n))

    def final(self) -> dict[str, torch.Tensor]:
        return state(self.model)

    def grads_left(self) -> set[str]:
        return {n for n, p in self.model.named_parameters() if p.grad is not None}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@contextlib.contextmanager
def watch_vits():
    """Yields a list that gets a ``Watched`` for every timm VisionTransformer running a forward in the block,
    in the order they first run (a global forward pre-hook: nothing of the library or DeepSpeed is replaced)."""
    seen: list[Watched] = []

    def hook(module, _args):
        if isinstance(module, VisionTransformer) and not any(w.model is module for w in seen):
            seen.append(Watched(module))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
