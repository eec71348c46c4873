"""Fast paths give the plain path's results (on CPU here; measured on GPUs by benchmarks/gpu_check.sh)."""
import pytest
import torch

from modasm import model as M
from modasm import speed
from modasm.config import SpeedConfig


@pytest.mark.parametrize("k", [0, 1])
def test_checkpointing_gives_identical_gradients(tiny, k):
    """hybrid(k) with activation checkpointing: the same loss and bit-identical gradients of module k."""
    cfg = tiny("model.split=[2,2]").model
    x, y = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3, 4])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = speed.prepare_model(M.build_hybrid(cfg, k, None), SpeedConfig(checkpointing=ckpt, compile=False),
                                    torch.device("cpu"))
        assert model.grad_checkpointing == ckpt
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert grads[0][0] == grads[1][0]
    assert grads[0][1].keys() == grads[1][1].keys() and all(torch.equal(grads[0][1][n], grads[1][1][n])
                                                            for n in grads[0][1])


def test_auto_flags_follow_the_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not speed.wanted(None, cpu) and speed.wanted(None, gpu) and speed.wanted(True, cpu)
    assert speed.optimizer_kwargs(SpeedConfig(), cpu) == {} and speed.optimizer_kwargs(SpeedConfig(), gpu) == {"fused": True}
