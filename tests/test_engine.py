"""The DeepSpeed engine takes ZeRO stage, precision, clipping and accumulation from the recipe."""
import pytest
import torch

from conftest import assert_export_is_master, random_batches, train_steps
from modasm import engine as ds
from modasm import model as M
from modasm import phases


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16")])
def test_engine_follows_recipe(tiny, dist_info, zero, precision):
    recipe = tiny(f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}",
                  "e2e.accum_steps=2", "e2e.clip_grad=0.5", "e2e.batch_size=32")
    model = M.build_target(recipe.model)
    plan = ds.plan(recipe.e2e, 1, "e2e", n_train=160)
    assert (plan.micro, plan.accum, plan.steps_per_epoch, plan.total) == (16, 2, 5, 5)
    eng, sched = ds.build_engine(model, recipe.e2e, recipe.deepspeed, dist_info, plan)
    assert eng.zero_optimization_stage() == zero
    assert eng.bfloat16_enabled() == (precision == "bf16")
    assert eng.gradient_accumulation_steps() == 2
    assert eng.gradient_clipping() == 0.5
    assert eng.train_micro_batch_size_per_gpu() == 16
    # the lr is scaled per 512 images; without warm-up the first epoch trains at the peak
    assert sched.lr == pytest.approx(recipe.e2e.lr * 32 / 512)


def test_reduce_bucket_size_reaches_the_engine(tiny, dist_info):
    """deepspeed.reduce_bucket_size (the overlap of launch/estimate.py's recommendation) is DeepSpeed's
    zero_optimization.reduce_bucket_size from ZeRO-2 on; null keeps DeepSpeed's 5e8 elements."""
    recipe = tiny("deepspeed.zero_stage=2", "deepspeed.reduce_bucket_size=1000")
    plan = ds.plan(recipe.e2e, 1, "e2e", n_train=512)
    assert ds.ds_config(recipe.e2e, recipe.deepspeed, plan)["zero_optimization"]["reduce_bucket_size"] == 1000
    eng, _ = ds.build_engine(M.build_target(recipe.model), recipe.e2e, recipe.deepspeed, dist_info, plan)
    assert eng.zero_reduce_bucket_size() == 1000 and eng.zero_overlap_comm()
    default = tiny("deepspeed.zero_stage=2")
    assert "reduce_bucket_size" not in ds.ds_config(default.e2e, default.deepspeed, plan)["zero_optimization"]
    with pytest.raises(ValueError, match="reduce_bucket_size must be a positive number"):
        tiny("deepspeed.reduce_bucket_size=0")


def test_micro_batch_must_divide(tiny):
    recipe = tiny("e2e.batch_size=30", "e2e.accum_steps=4")
    with pytest.raises(ValueError, match=r"e2e.batch_size=30 .*accum_steps"):
        ds.accumulation(recipe.e2e, 2, "e2e")


@pytest.mark.parametrize("batch,world,limit,micro,accum", [
    (2048, 8, 64, 64, 4),      # one 8-GPU node: the paper's ViT-B incubation 128 x 2 x 8 at a 64 limit
    (2048, 32, 64, 64, 1),     # four nodes: no accumulation needed
    (2048, 8, 100, 64, 4),     # the largest micro-batch under the limit that divides the rank's share
    (2048, 64, 256, 32, 1),    # the limit is a ceiling, not a target
    (96, 4, 7, 6, 4),          # 24 per rank: 6 x 4 (not 7 x ...)
])
def test_micro_batch_limit_derives_accumulation(tiny, batch, world, limit, micro, accum):
    recipe = tiny(f"e2e.batch_size={batch}", f"e2e.micro_batch={limit}")
    assert ds.accumulation(recipe.e2e, world, "e2e") == (micro, accum)
    assert micro * accum * world == batch and micro <= limit


def test_micro_batch_limit_errors(tiny):
    with pytest.raises(ValueError, match=r"e2e.batch_size=2048 does not split over 24 ranks"):
        ds.accumulation(tiny("e2e.batch_size=2048", "e2e.micro_batch=64").e2e, 24, "e2e")
    with pytest.raises(ValueError, match=r"set micro_batch \(64\) or accum_steps \(2\), not both"):
        tiny("e2e.micro_batch=64", "e2e.accum_steps=2")


@pytest.mark.parametrize("zero,precision", [(3, "bf16"), (2, "fp32")])
def test_zero_export_holds_full_weights(tiny, dist_info, zero, precision):
    """ZeRO partitions the parameters (3) or the fp32 master weights (2, and 3); the exported shards still
    hold every full tensor, and they are the trained fp32 master weights (under bf16 too)."""
    recipe = tiny(f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}", "data.train_limit=128")
    metrics = phases.run_e2e(recipe, dist_info)
    assert metrics["steps"] == 2 and metrics["eval_samples"] == 256
    assert_export_is_master(phases.export_dir(recipe, "e2e"), phases.phase_dir(recipe, "e2e") / "ckpt",
                            recipe.model, recipe.model.split, bf16=precision == "bf16")


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_one_rank_skips_the_allreduce_and_trains_to_the_same_weights(tiny, dist_info, clip):
    """One rank, plain fp32 engine: DeepSpeed's all-reduce of the gradients is skipped (it is a flatten, a
    reduction over one rank and a copy back); the weights after 3 optimizer steps of 2 micro-batches each are
    bit-identical to an engine that does it, with and without clipping."""
    recipe = tiny("e2e.accum_steps=2", "e2e.batch_size=32", f"e2e.clip_grad={clip}")
    plan = ds.plan(recipe.e2e, 1, "e2e", n_train=96)
    batches = random_batches(6, 16, seed=5)
    states = []
    for allreduce in (False, True):
        torch.manual_seed(0)
        eng, _ = ds.build_engine(M.build_target(recipe.model), recipe.e2e, recipe.deepspeed, dist_info, plan)
        assert eng.enable_backward_allreduce is False  # what build_engine chose for one rank
        eng.enable_backward_allreduce = allreduce
        states.append(train_steps(eng, batches))
        assert eng.global_steps == 3
    torch.manual_seed(0)
    start = M.build_target(recipe.model).state_dict()  # the weights both engines started from
    assert any(not torch.equal(states[0][n], start[n]) for n in states[0])  # it trained
    for n in states[0]:
        assert torch.equal(states[0][n], states[1][n]), n


def test_zero_engines_keep_their_reduction(tiny, dist_info):
    """ZeRO (and bf16) engines reduce through their own optimizers: build_engine leaves them alone."""
    for ov in (["deepspeed.zero_stage=1"], ["deepspeed.zero_stage=2"], ["deepspeed.zero_stage=1", "deepspeed.precision=bf16"]):
        recipe = tiny(*ov)
        eng, _ = ds.build_engine(M.build_target(recipe.model), recipe.e2e, recipe.deepspeed, dist_info,
                                 ds.plan(recipe.e2e, 1, "e2e", n_train=256))
        assert eng.enable_backward_allreduce is True, ov
