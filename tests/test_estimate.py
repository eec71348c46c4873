"""launch/estimate.py: model-state bytes against a hand count, the recipes carry its recommendation."""
import json

import pytest
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from conftest import ROOT, launch
from modasm import comm, estimate, perf
from modasm.config import load_recipe

D = 1280
# qkv (no bias), proj, fc1, fc2, 2 norms
BLOCK = 3 * D * D + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + 4 * D
FIRST = (3 * 14 * 14 * D + D) + D + 257 * D                                      # patch embed, cls token, pos embed
LAST = 2 * D + D * 1000 + 1000                                                    # final norm, head
VIT_H = 32 * BLOCK + FIRST + LAST


@pytest.fixture(scope="module")
def vit_h():
    recipe = load_recipe(ROOT / "recipes" / "vit-h14.yaml")
    return recipe, {pm.label: pm for pm in estimate.phase_models(recipe, 32)}


def test_vit_h_parameter_and_optimizer_bytes(vit_h):
    _, pms = vit_h
    asm, inc0 = pms["assemble"], pms["incubate[0]"]
    assert VIT_H == 631_922_920 and (asm.params, asm.trainable, asm.ranks, asm.share) == (VIT_H, VIT_H, 32, 64)
    assert (inc0.params, inc0.trainable) == (11 * BLOCK + FIRST + LAST, 8 * BLOCK + FIRST) and inc0.ranks == 8
    assert asm.largest == 4 * D * D + 4 * D  # one MLP linear
    T, t, f = VIT_H, inc0.trainable, inc0.params - inc0.trainable
    # ZeRO-2, bf16, 32 ranks: 16-bit weights everywhere; 16-bit + fp32 gradients, fp32 master + Adam moments sharded
    s2 = asm.states(2, "bf16")
    assert (s2.params, s2.grads, s2.optimizer) == (2 * T, 2 * T // 32 + 4 * T // 32, 12 * T // 32)
    assert abs(s2.total - estimate_zero2_model_states_mem_needs(T, 32, cpu_offload=False)[1]) <= 8  # DeepSpeed's
    assert 1.50 < s2.total / 2**30 < 1.51
    # ZeRO-1 also keeps every gradient, accumulated in fp32 (deepspeed.grad_accum_dtype, the default)
    assert asm.states(1, "bf16").grads == 4 * T + 4 * T // 32
    # ZeRO-3: the weights are sharded too, one layer gathered at a time (DeepSpeed's 4 bytes per parameter)
    s3 = asm.states(3, "bf16")
    assert (s3.params, s3.grads, s3.optimizer) == (2 * T // 32 + 4 * asm.largest, 4 * T // 32, 12 * T // 32)
    # incubation of module 0 on 8 ranks: the frozen meta modules cost their 16-bit weights only
    i1 = inc0.states(1, "bf16")
    assert (i1.params, i1.grads, i1.optimizer) == (2 * (t + f), 4 * t + 4 * t // 8, 12 * t // 8)
    # fp32 without ZeRO (the demo's setting): weights, gradients, two Adam moments
    s0 = asm.states(0, "fp32")
    assert (s0.params, s0.grads, s0.optimizer) == (4 * T, 4 * T, 8 * T)


def test_vit_h_activations_and_fit(vit_h):
    recipe, pms = vit_h
    asm = pms["assemble"]
    per_image = asm.trace.activation_bytes_per_image(False)
    assert 300 * 2**20 < per_image < 360 * 2**20   # ~34 bytes x tokens x width per block, 32 blocks, bf16
    assert asm.trace.activation_bytes_per_image(True) < per_image / 5
    a100 = perf.gpu("a100-80gb")
    fit = estimate.largest_micro(asm, 1, "bf16", False, a100.memory_bytes)
    assert fit * per_image + asm.states(1, "bf16").total <= 0.9 * a100.memory_bytes
    assert (fit + 1) * per_image + asm.states(1, "bf16").total > 0.9 * a100.memory_bytes
    assert fit >= asm.share  # the recipe's 64 fits in 90 % of 80 GB


RECIPES = ["vit-b16", "vit-l16", "vit-h14", "vit-b16-384", "vit-l16-384", "vit-h14-392"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_carry_the_recommendation(name):
    """Each ImageNet recipe's micro-batches, ZeRO stage, communication dtype, overlap, reduction bucket and
    checkpointing are what estimate recommends for the hardware its header names, at the default assumed MFU
    (40 %) and the GPU type's default links."""
    path = ROOT / "recipes" / f"{name}.yaml"
    gpus, gpu = estimate.sized_for(path)
    recipe = load_recipe(path)
    rec = estimate.recommend(estimate.phase_models(recipe, gpus), recipe.deepspeed.precision,
                             perf.gpu(gpu).memory_bytes, estimate.timing_for(recipe, gpu))
    ds = recipe.deepspeed
    assert {s: getattr(recipe, s).micro_batch for s in rec.micro} == rec.micro
    assert (ds.zero_stage, recipe.speed.checkpointing) == (rec.zero_stage, rec.checkpointing)
    assert (ds.communication_dtype, estimate.recipe_setting(ds).overlaps) == (rec.communication_dtype, rec.overlap_comm)
    assert ds.reduce_bucket_size == rec.reduce_bucket_size  # null unless overlapping
    assert set(rec.micro) == set(estimate.sections(recipe))
    assert f"ZeRO-{rec.zero_stage}" in path.read_text().split("\nrun:")[0]  # the header says which, and why


class _Hours:
    """A stand-in for estimate.Timing: projected device-hours per (stage, communication dtype, overlap)."""
    def __init__(self, table):
        self.table = table

    def hours(self, models, s, micro):
        return self.table[(s.stage, s.communication_dtype, s.overlaps)]


def test_recommendation_weighs_step_time(tiny):
    """Fastest eligible setting wins; within 2 % of it, fp32 communication, then the lower stage, then no overlap;
    ZeRO-3 only where memory needs it (here every stage fits: 1 TiB)."""
    pm = estimate.phase_model(tiny("model.split=[2,2]"), "e2e", None, 2)
    base = {(1, "fp32", False): 100.0, (1, "bf16", False): 99.0, (2, "fp32", False): 100.0,
            (2, "fp32", True): 99.5, (2, "bf16", False): 99.0, (2, "bf16", True): 98.5,
            (3, "fp32", False): 90.0, (3, "fp32", True): 80.0, (3, "bf16", False): 90.0, (3, "bf16", True): 80.0}
    # all of ZeRO-1/2 within 2 % of the fastest (98.5 x 1.02 = 100.47): ZeRO-1, fp32; ZeRO-3's 80 does not count
    rec = estimate.recommend([pm], "bf16", 2**40, _Hours(base))
    assert rec == estimate.Recommendation(1, False, {"e2e": 32}, "fp32", False, None)
    assert len(rec.candidates) == 10
    # overlap saves 9 %: ZeRO-2 with overlap; bf16 communication's further 1 % is within the tolerance
    rec = estimate.recommend([pm], "bf16", 2**40, _Hours({**base, (1, "fp32", False): 110.0, (1, "bf16", False): 105.0,
                                                          (2, "fp32", False): 110.0, (2, "fp32", True): 101.0,
                                                          (2, "bf16", False): 105.0, (2, "bf16", True): 100.0}))
    assert rec == estimate.Recommendation(2, False, {"e2e": 32}, "fp32", True, 100_000_000)
    assert rec.overrides() == ["deepspeed.zero_stage=2", "deepspeed.communication_dtype=fp32",
                               "deepspeed.overlap_comm=true", "deepspeed.reduce_bucket_size=100000000",
                               "speed.checkpointing=false", "e2e.micro_batch=32"]
    # bf16 communication 3 % faster than anything in fp32: bf16
    rec = estimate.recommend([pm], "bf16", 2**40, _Hours({k: (100.0 if k[1] == "bf16" else 103.0) for k in base}))
    assert (rec.zero_stage, rec.communication_dtype, rec.overlap_comm) == (1, "bf16", False)
    # fp32 training has one communication dtype
    assert {c.setting.communication_dtype for c in estimate.recommend([pm], "fp32", 2**40, _Hours(base)).candidates} \
        == {"fp32"}


def test_recommendation_policy(tiny):
    recipe = tiny("model.split=[2,2]")
    timing = estimate.timing_for(recipe, "a100-80gb")
    pm = estimate.phase_model(recipe, "e2e", None, 2)  # 2 ranks: a share of 32 images each
    pms, act, cap = [pm], pm.trace.activation_bytes_per_image, estimate.CAPACITY
    assert pm.share == 32
    # a tiny model: a single gradient bucket, so overlap hides nothing and ZeRO-2 ties with ZeRO-1
    assert estimate.recommend(pms, "fp32", 2**40, timing) == estimate.Recommendation(1, False, {"e2e": 32})
    one = estimate.phase_model(recipe, "e2e", None, 1)  # a single GPU: nothing to partition, nothing to send
    assert estimate.recommend([one], "fp32", 2**40, timing) == estimate.Recommendation(0, False, {"e2e": 64})
    # room for 20 images without checkpointing (under MIN_MICRO) but for the whole share with it: checkpointing
    mem = int((pm.states(3, "fp32").total + 20.5 * act(False)) / cap)
    assert mem * cap > pm.states(1, "fp32").total + 32 * act(True)
    assert estimate.recommend(pms, "fp32", mem, timing) == estimate.Recommendation(1, True, {"e2e": 32})
    # room for just the share at ZeRO-3 but not at ZeRO-1 (its unsharded gradients and optimizer states)
    mem = int((pm.states(3, "fp32").total + 32 * act(False)) / cap) + 1
    assert mem * cap < pm.states(1, "fp32").total + 32 * act(False)
    rec = estimate.recommend(pms, "fp32", mem, timing)
    assert rec.zero_stage > 1 and rec.micro == {"e2e": 32} and not rec.checkpointing


# (GPUs, GPUs per node, incubate.groups (0: default), K) -> module groups, counted by hand: the farm runs one torchrun
# per node, each holding whole groups (phases.farm_groups), so G must be a multiple of the nodes and each node's
# G / nodes groups must split its GPUs equally; the default is the largest such G <= K.
FARMS = [
    (24, 8, 0, 4, 3),   # 3 nodes: 4 groups would not split over them (4 % 3); 3 groups of 8, one per node
    (32, 8, 0, 4, 4),   # vit-h14's header: 4 nodes, one group of 8 per node
    (16, 8, 0, 4, 4),   # vit-l16's: 2 nodes, 2 groups of 4 on each
    (8, 8, 0, 4, 4),    # vit-b16's: 1 node, 4 groups of 2
    (4, 8, 0, 4, 4),    # fewer GPUs than a node holds: one node, a group per GPU
    (24, 8, 0, 10, 6),  # K=10 on 3 nodes: 8 or 10 groups would not split over them; 6 of 4, two per node
    (12, 4, 0, 4, 3),   # 3 nodes of 4: 3 groups of 4
    (16, 8, 2, 4, 2),   # incubate.groups=2 on 2 nodes: one group of 8 per node
]


@pytest.mark.parametrize("gpus,per_node,groups,K,want", FARMS)
def test_incubation_groups_split_over_the_nodes(tiny, gpus, per_node, groups, K, want):
    recipe = tiny(f"model.split={[1] * K}", f"incubate.groups={groups}")
    assert estimate.incubation_groups(recipe, gpus, per_node) == want


@pytest.mark.parametrize("gpus,per_node,groups,K,message", [
    (24, 8, 4, 4, "does not split over the farm's 3 launches"),   # 4 groups on 3 nodes
    (16, 8, 6, 4, "is more than the K=4 modules"),
    (16, 8, 6, 8, "3 module groups per node do not split its 8 ranks"),   # 6 groups on 2 nodes of 8
    (24, 8, 0, 2, "more nodes than the K=2 modules"),   # K=2 on 3 nodes: no default fits
    (12, 8, 0, 4, "12 GPUs do not fill nodes of 8"),
])
def test_incubation_groups_that_the_farm_would_refuse(tiny, gpus, per_node, groups, K, message):
    recipe = tiny(f"model.split={[1] * K}", f"incubate.groups={groups}")
    with pytest.raises(ValueError, match=message):
        estimate.incubation_groups(recipe, gpus, per_node)


def test_incubation_ranks_per_group_follow_the_nodes(tiny):
    """48 GPUs on 3 nodes of 16, K=4: 3 groups of 16 ranks (not 4 of 12, which the nodes cannot hold)."""
    recipe = tiny("model.split=[1,1,1,1]", *(f"{s}.batch_size=96" for s in ("meta", "incubate", "assemble", "e2e")))
    pms = estimate.phase_models(recipe, 48, gpus_per_node=16)
    assert {pm.ranks for pm in pms if pm.section == "incubate"} == {16}
    assert {pm.ranks for pm in pms if pm.section != "incubate"} == {48}


def test_vit_h_step_time(vit_h):
    """The recipe's ViT-H on 32 x A100-80GB (four nodes): bytes per step of the assembled model and of module 0's
    incubation (its frozen meta modules never reduced), against a hand count."""
    recipe, pms = vit_h
    timing = estimate.timing_for(recipe, "a100-80gb")
    asm, inc0 = pms["assemble"], pms["incubate[0]"]
    t = 8 * BLOCK + FIRST
    z1 = comm.Setting(1, "bf16", "fp32")  # what the recipe had before the step-time model (DeepSpeed's BF16_Optimizer)
    assert estimate.recipe_setting(recipe.deepspeed) == comm.Setting(2, "bf16", "fp32", True, 100_000_000)
    a = timing.step(asm, z1, 64)
    # 32 ranks on 4 nodes: the ring runs at the NICs' 8 x 200/8 x 0.96 = 192 GB/s; fp32 gradients all-reduced
    # (2 x 31/32 x 4 bytes) and bf16 weights all-gathered (31/32 x 2): 9.6875 bytes per parameter
    assert a.volume == pytest.approx(9.6875 * VIT_H) and a.comm == pytest.approx(9.6875 * VIT_H / 192e9)  # 31.9 ms
    # compute: 64 images x the counted FLOPs / (312 TFLOP/s x 40 %)
    assert a.compute == pytest.approx(64 * asm.trace.flops_per_image / (312e12 * 0.4))
    i = timing.step(inc0, z1, 256)
    # 8 ranks in one node (231 GB/s): 2 x 7/8 x 4 + 7/8 x 2 = 8.75 bytes per trainable parameter
    assert i.volume == pytest.approx(8.75 * t) and i.comm == pytest.approx(8.75 * t / 231e9)
    # hybrid(0)'s gradients appear in the last 16/19 of its backward (8 blocks x 2 after 3 frozen blocks x 1)
    assert timing.grad_window(inc0) == pytest.approx(16 / 19) and timing.grad_window(pms["incubate[3]"]) == 1.0
    # the cost of a phase is stretched by step / compute
    c = timing.cost(asm, z1, 64)
    bare = estimate.cost(recipe, asm, 312.0, 0.4, estimate.IMAGENET_TRAIN, estimate.IMAGENET_VAL)
    train_h = asm.trace.flops_per_image * bare.images / (312e12 * 0.4) / 3600
    assert c.device_hours == pytest.approx(bare.device_hours + train_h * a.exposed / a.compute)
    # the recipe's ZeRO-2: the same bytes; what the step waits for: the last bucket of 31 922 920 fp32 gradients
    # (x 4 x 1.9375 / 192e9) and the bf16 weights' all-gather after the step (x 2 x 0.96875 / 192e9)
    z2 = timing.step(asm, estimate.recipe_setting(recipe.deepspeed), 64)
    assert z2.volume == a.volume
    assert z2.exposed == pytest.approx((31_922_920 * 4 * 1.9375 + 2 * VIT_H * 0.96875) / 192e9)  # 7.7 ms


@pytest.mark.slow
def test_estimate_cli(tmp_path):
    res = launch("estimate.py", str(ROOT / "recipes" / "vit-h14.yaml"), "--gpu", "h100-80gb", "--gpus", "32",
                 "--mfu", "0.5", "--budget", "200")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "on 32 x h100-80gb" in out and "MFU 50% (assumed)" in out
    assert ("Recommended for 32 x h100-80gb: deepspeed.zero_stage=2 deepspeed.communication_dtype=fp32 "
            "deepspeed.overlap_comm=true deepspeed.reduce_bucket_size=100000000 speed.checkpointing=false") in out
    assert "assembled 2720 A100-hours, E2E 4790" in out and "858 and 1510 device-hours" in out
    # the assembled model on 4 nodes: a ring at min(450 x 0.82, 8 x 400/8 x 0.94) = 369 GB/s, 9.6875 bytes per
    # parameter (fp32 gradients all-reduced, bf16 weights all-gathered): 6.12 GB, 16.6 ms
    row = next(ln.split() for ln in out.splitlines() if ln.startswith("assemble ") and len(ln.split()) == 12)
    assert row[1:4] == ["32", "4", "369"] and row[7:9] == ["6.12", "0.0166"]
    line = next(ln for ln in out.splitlines() if ln.startswith("assembled pipeline:"))
    assert "h100-80gb device-hours" in line and "94 device-hours at 100 % MFU without communication" in line
    need = float(out.split("it takes an MFU of at least ")[1].split("%")[0])
    assert "budget 200 device-hours: the projection above meets it" in out
    assert 47.2 < need < 50  # more than the 47.2 % the FLOPs alone need: the communication the steps wait for
    # one 400 Gb/s NIC per node (50 Gb/s per GPU): the ring over nodes runs at 8 x 50/8 x 0.94 = 47 GB/s
    slow = launch("estimate.py", str(ROOT / "recipes" / "vit-h14.yaml"), "--gpu", "h100-80gb", "--gpus", "32",
                  "--inter-node-gbps", "50")
    assert slow.returncode == 0, slow.stderr[-2000:]
    row = next(ln.split() for ln in slow.stdout.splitlines() if ln.startswith("assemble ") and len(ln.split()) == 12)
    assert row[3] == "47" and abs(float(row[8]) - 6.1218 / 47) < 1e-4  # 0.130 s: as much as a step computes at 50 % MFU
    # measured figures: the MFU per phase and, optionally, bus bandwidths
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": [{"phase": "assemble", "k": None, "mfu": 0.25}],
                                 "busbw_gbs": {"intra": 300.0, "inter": 100.0}}))
    got = launch("estimate.py", str(ROOT / "recipes" / "vit-h14.yaml"), "--gpu", "h100-80gb", "--gpus", "32",
                 "--measured", str(bench))
    assert got.returncode == 0, got.stderr[-2000:]
    assert "measured intra-node 300 GB/s; measured inter-node 100 GB/s" in got.stdout
    row = next(ln.split() for ln in got.stdout.splitlines() if ln.startswith("assemble ") and len(ln.split()) == 12)
    # compute at the measured 25 %: 64 x 1008.8 GFLOP / (989.4 x 0.25 TFLOP/s) = 0.261 s
    assert row[3] == "100" and abs(float(row[6]) - 64 * 1008.8e9 / (989.4e12 * 0.25)) < 1e-3
    bad = launch("estimate.py", str(ROOT / "recipes" / "vit-h14.yaml"), "--gpu", "v100")
    assert bad.returncode == 2 and "unknown GPU 'v100'" in bad.stderr
