"""FLOPs counted from what runs (against a closed-form ViT count), peaks, and MFU in the logs and W&B."""
import pytest
import torch

from conftest import ROOT
from modasm import model as M
from modasm import perf, phases
from modasm.config import load_recipe
from modasm.metrics import read_jsonl


def closed_form(cfg, layout: list[int], trained: int | None) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs per image of a timm ViT with this layout, written out by hand.

    ``trained``: the one module with requires_grad (hybrid(k)), or None when everything trains. Matmuls
    and convolutions only (2 FLOPs per multiply-add); attention as torch counts the fused kernel, whose
    backward re-computes the scores: 5 N x N x d matmuls per head against the forward's 2.
    """
    P = (cfg.img_size // cfg.patch_size) ** 2
    N, D, r, K = P + 1, cfg.embed_dim, cfg.mlp_ratio, len(layout)
    lin = 2 * N * D * (3 * D + D + 2 * int(r * D))   # qkv, proj, fc1, fc2
    att = 2 * 2 * N * N * D                           # q k^T and (softmax) v, summed over heads
    patch = 2 * P * D * cfg.in_chans * cfg.patch_size ** 2
    head = 2 * D * cfg.num_classes                    # the class token only
    forward = sum(layout) * (lin + att) + patch + head
    backward = 0
    for m, depth in enumerate(layout):
        if trained is None or m == trained:           # weight and input gradients
            backward += depth * (2 * lin + 2.5 * att)
        elif m > trained:                             # frozen after k: input gradients only, to reach module k
            backward += depth * (lin + 2.5 * att)
        # frozen before k: no backward at all
    if trained in (None, 0):
        backward += patch                             # weight gradient only: the image needs none
    if trained in (None, K - 1):
        backward += 2 * head
    elif trained < K - 1:
        backward += head                              # input gradient only
    return forward, int(forward + backward)


CASES = [("meta", None), ("incubate", 0), ("incubate", "last"), ("assemble", None), ("e2e", None)]


@pytest.mark.parametrize("split", [[1, 2], [2, 1, 3]])
@pytest.mark.parametrize("phase,k", CASES)
def test_flops_match_closed_form(tiny, phase, k, split):
    recipe = tiny(f"model.split={split}", f"{phase}.drop_path=0.2")
    k = len(split) - 1 if k == "last" else k
    model = phases.PHASES[phase].build(recipe, k, None)
    layout = phases.PHASES[phase].layout(recipe, k)
    trace = perf.trace_step(model, batch=3)
    forward, train = closed_form(recipe.model, layout, k)
    assert trace.forward_flops == 3 * forward
    assert trace.train_flops == 3 * train
    assert trace.flops_per_image == train


def test_hybrid_counts_what_autograd_does(tiny):
    """Unfreezing the meta modules (the paper's code) costs the weight gradients of the modules after k."""
    recipe = tiny("model.split=[2,2,2]")
    frozen = M.build_hybrid(recipe.model, 0, None)
    paper = M.build_hybrid(recipe.model, 0, None)
    for p in paper.parameters():
        p.requires_grad_(True)
    f, p = perf.trace_step(frozen).flops_per_image, perf.trace_step(paper).flops_per_image
    _, target = closed_form(recipe.model, [2, 1, 1], None)
    assert p == target and f < p
    cfg = recipe.model  # the difference: the weight gradients of the two later blocks and of the head
    N = (cfg.img_size // cfg.patch_size) ** 2 + 1
    later = 2 * (2 * N * cfg.embed_dim * (4 * cfg.embed_dim + 2 * int(cfg.mlp_ratio * cfg.embed_dim))) \
        + 2 * cfg.embed_dim * cfg.num_classes
    assert p - f == later


def test_vit_h_counts():
    """ViT-H/14 at 224: ~334.6 GFLOPs forward (the 167 GMACs usually quoted), ~3x for a training step."""
    recipe = load_recipe(ROOT / "recipes" / "vit-h14.yaml")
    with torch.device("meta"):
        target = M.build_target(recipe.model)
    trace = perf.trace_step(target, dtype=torch.bfloat16)
    assert (trace.forward_flops_per_image, trace.flops_per_image) == closed_form(recipe.model, recipe.model.split, None)
    assert 334e9 < trace.forward_flops_per_image < 335e9
    assert 3.0 < trace.flops_per_image / trace.forward_flops_per_image < 3.03


def test_trace_touches_nothing(tiny):
    """The count runs on a meta copy: no RNG draw (drop path is on), no gradient, no weight change."""
    recipe = tiny("e2e.drop_path=0.5")
    torch.manual_seed(0)
    model = M.build_target(recipe.model, recipe.e2e.drop_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    trace = perf.trace_step(model)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None and torch.equal(p, before[n]) and p.device.type == "cpu"
               for n, p in model.named_parameters())
    assert trace.train_flops > 0 and set(trace.saved) == {"other", "blocks.0", "blocks.1", "blocks.2"}


def test_saved_activations_follow_requires_grad(tiny):
    """hybrid(K-1): the frozen modules before it keep nothing for a backward; checkpointing keeps less."""
    recipe = tiny("model.split=[2,2]")
    trace = perf.trace_step(M.build_hybrid(recipe.model, 1, None), batch=2)
    assert trace.saved["blocks.0"] == 0 and trace.saved["blocks.1"] > 0 and trace.saved["blocks.2"] > 0
    assert trace.activation_bytes_per_image(True) < trace.activation_bytes_per_image(False)
    # linear in the micro-batch: per image the same at 2 and 4
    four = perf.trace_step(M.build_hybrid(recipe.model, 1, None), batch=4)
    assert four.activation_bytes_per_image(False) == pytest.approx(trace.activation_bytes_per_image(False), rel=0.02)


def test_peaks():
    h100 = perf.gpu_by_name("NVIDIA H100 80GB HBM3")
    assert (h100.key, h100.bf16) == ("h100-80gb", 989.4)
    assert perf.gpu_by_name("NVIDIA H100 PCIe").key == "h100-pcie"
    assert perf.gpu_by_name("NVIDIA H200").key == "h200" and perf.gpu_by_name("NVIDIA H200 NVL").key == "h200-nvl"
    assert perf.gpu_by_name("NVIDIA A100-SXM4-40GB").key == "a100-40gb"
    assert perf.gpu_by_name("NVIDIA A100 80GB PCIe").key == "a100-80gb"
    assert perf.gpu_by_name("NVIDIA L40S").key == "l40s" and perf.gpu_by_name("NVIDIA L4").key == "l4"
    assert perf.gpu_by_name("Tesla V100-SXM2-16GB") is None
    assert perf.peak(torch.device("cpu"), "bf16", 123.0) == perf.Peak(123.0, "run.peak_tflops")
    cpu = perf.peak(torch.device("cpu"), "fp32")
    assert 1e-4 < cpu.tflops < 100 and "probe" in cpu.source
    meter = perf.Meter(2e9, perf.Peak(4.0, "x"))
    assert meter.fields(1000) == {"tflops": 2.0, "mfu": 0.5}
    assert perf.Meter(2e9, perf.Peak(None, "unknown")).fields(1000)["mfu"] is None


@pytest.mark.slow
def test_mfu_in_metrics_and_wandb(tiny, dist_info):
    """Every training line of metrics.jsonl carries tflops and mfu; the W&B run has perf/tflops, perf/mfu;
    the report's table has an MFU column."""
    from modasm.report import collect, markdown_table
    from wandb_reader import offline_runs
    recipe = tiny("meta.log_every_steps=2")
    phases.run_meta(recipe, dist_info)
    recs = read_jsonl(phases.phase_dir(recipe, "meta") / "metrics.jsonl")
    start = next(r for r in recs if r["kind"] == "start")
    expected = perf.trace_step(M.build_meta(recipe.model)).flops_per_image
    assert start["flops_per_image"] == expected and start["peak_tflops"] > 0 and "probe" in start["peak_source"]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 4
    for r in train:
        assert r["tflops"] == pytest.approx(expected * r["img_per_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / start["peak_tflops"]) and 0 < r["mfu"] < 1
    (run,) = [r for r in offline_runs(recipe.run_dir).values() if r["name"] == "meta"]  # one run of the phase
    history = run["history"]
    assert {"perf/tflops", "perf/mfu"} <= history
    row = collect(recipe.run_dir)[0]
    assert row["mfu"] == sorted(r["mfu"] for r in train)[2]
    assert "| MFU % |" in markdown_table([row]) and f"{100 * row['mfu']:.1f} |" in markdown_table([row])
